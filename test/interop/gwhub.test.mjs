// Interop scenario: the official Azure IoT SDKs for Node.js (service SDK
// azure-iothub, device SDK azure-iot-device over azure-iot-device-mqtt)
// against gwhub, used exactly as an application uses them against Azure IoT
// Hub: no option, header or code path here exists for gwhub's sake.
//
// What the SDKs put on the wire (from the pinned SDK sources, see
// package-lock.json, and confirmed on a run with
// DEBUG=azure-iot-mqtt-base:MqttBase,azure-iot-http-base.RestApiClient,mqttjs:client;
// gwhub must accept exactly this):
//   service SDK (azure-iothub 1.16.6): REST on https://{HostName}:443 (no port can be given), api-version=2021-04-12,
//     Authorization: SharedAccessSignature sr=localhost&sig=RwSH3Sy2…%3D&skn=iothubowner&se=1700000000
//     (that order; sr and skn encodeURIComponent'd, sig = encodeURIComponent(base64(HMAC-SHA256(key, sr + "\n" + se))))
//     Registry.create      PUT    /devices/{id}?api-version=2021-04-12  Content-Type: application/json; charset=utf-8, no If-Match;
//                          body {"deviceId":…,"status":…,"authentication":{"type":"sas","symmetricKey":{"primaryKey":"","secondaryKey":""}}}
//                          when the caller gives no keys: the hub generates them, as IoT Hub does
//     Registry.update      PUT    /devices/{id}?api-version=2021-04-12  If-Match: "*"   (a QUOTED star)
//     Registry.get         GET    /devices/{id}?api-version=2021-04-12
//     Registry.delete      DELETE /devices/{id}?api-version=2021-04-12  If-Match: "*"   (a QUOTED star)
//     Registry.getTwin     GET    /twins/{id}?api-version=2021-04-12
//     Registry.updateTwin  PATCH  /twins/{id}?api-version=2021-04-12    If-Match: "{etag}" (quoted by the SDK)
//     Client.invokeDeviceMethod
//                          POST   /twins/{id}/methods?api-version=2021-04-12
//                          body {"methodName":…,"payload":…|null,"responseTimeoutInSeconds":N,"connectTimeoutInSeconds":0}
//                          (the SDK's own HTTP timeout is exactly (response+connect timeout) s, but it only
//                          arms a 'timeout' event nobody listens to, so a 504 sent after N s still arrives)
//     Errors: 404 becomes a plain Error('Not found') unless the body is the legacy "ErrorCode:DeviceNotFound;…"
//     form, 412 an InvalidEtagError, 504 a GatewayTimeoutError; the default retry policy retries none of
//     them. err.responseBody keeps IoT Hub's error body.
//   device SDK (azure-iot-device 1.18.4 + azure-iot-device-mqtt 1.16.4 on mqtt.js 4.3.8): MQTT 3.1.1 over TLS
//     to mqtts://{HostName}:8883:
//     ClientId  {deviceId}
//     Username  localhost/{deviceId}/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4%20(node%20v20.20.2%3B%20Debian%2012%3B%20x64)
//     Password  SharedAccessSignature sr=localhost%2Fdevices%2F{encodeURIComponent(deviceId)}&sig=…%3D&se={now+3600} (no skn)
//     CleanSession 0, keepalive 180 s
//     twin:     SUBSCRIBE $iothub/twin/res/# (QoS 0), PUBLISH $iothub/twin/GET/?$rid={uuid} (QoS 0, empty body),
//               PUBLISH $iothub/twin/PATCH/properties/reported/?$rid={uuid} (QoS 0). The SDK ignores the
//               response status: a body with "errorCode" is its only failure signal.
//     desired:  SUBSCRIBE $iothub/twin/PATCH/properties/desired/# (QoS 0) when a 'properties.desired' listener is added
//     methods:  SUBSCRIBE $iothub/methods/POST/# (QoS 0) on onDeviceMethod; answers on
//               $iothub/methods/res/{status}/?$rid={rid} (QoS 0) with JSON.stringify(payload). A request with an
//               empty body makes JSON.parse('') throw and the SDK itself answers 400 "Invalid request format",
//               so a hub must send "null" for a null payload.
//     MqttWs transport: the same MQTT session over wss://{HostName}:443/$iothub/websocket (subprotocol mqtt).
//     Wrong key: CONNACK return code 5 surfaces as UnauthorizedError ("Connection refused: Not authorized").
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';

import {
  DeviceClient,
  DeviceSAS,
  Mqtt,
  MqttWs,
  NoRetry,
  Registry,
  ServiceClient,
  deviceConnectionString,
  hubHostName,
  newKey,
  rejectionOf,
  reportProperties,
  sendMethodResponse,
  serviceConnectionString,
  serviceError,
  uniqueId,
  waitFor,
  withTimeout,
} from './lib/peers.mjs';

// Generous bounds: the SDKs' own timeouts are much longer than any of these.
const STEP_MS = 20000;

describe('gwhub with the official Azure IoT SDKs for Node.js', { timeout: 120000 }, () => {
  const serviceCS = serviceConnectionString();
  const hostName = hubHostName(serviceCS);
  const registry = Registry.fromConnectionString(serviceCS);
  const service = ServiceClient.fromConnectionString(serviceCS);

  const deviceId = uniqueId('interop-dev');
  let primaryKey;
  let device; // azure-iot-device Client, connected
  let twin; // its Twin
  let initialReportedVersion;
  const desiredEvents = []; // every 'properties.desired' event the device SDK raised
  const hangingCalls = []; // requests the 'hang' handler received and never answered

  after(async () => {
    if (device) {
      await withTimeout(device.close(), STEP_MS, 'device close');
    }
  });

  test('registry creates a device with hub-generated SAS keys and reads it back', async () => {
    const created = (await registry.create({ deviceId, status: 'enabled' })).responseBody;
    assert.equal(created.deviceId, deviceId);
    assert.equal(created.status, 'enabled');
    assert.equal(created.authentication.type, 'sas');
    primaryKey = created.authentication.symmetricKey.primaryKey;
    const secondaryKey = created.authentication.symmetricKey.secondaryKey;
    for (const key of [primaryKey, secondaryKey]) {
      assert.ok(key, 'IoT Hub generates both keys when the request leaves them empty');
      assert.ok(Buffer.from(key, 'base64').length >= 16, `key ${key} is not a base64 key of 16+ bytes`);
    }
    assert.notEqual(primaryKey, secondaryKey);
    assert.ok(created.etag, 'a created device has an etag');

    const read = (await registry.get(deviceId)).responseBody;
    assert.equal(read.deviceId, deviceId);
    assert.equal(read.authentication.symmetricKey.primaryKey, primaryKey);
    assert.equal(read.authentication.symmetricKey.secondaryKey, secondaryKey);
    assert.equal(read.etag, created.etag);
  });

  test('device connects over MQTT/TLS with a connection string built from the registry keys', async () => {
    assert.ok(primaryKey, 'needs the device registered by the previous test');
    device = DeviceClient.fromConnectionString(deviceConnectionString(hostName, deviceId, primaryKey), Mqtt);
    device.on('error', (err) => {
      throw new Error(`device client error: ${err.stack || err}`);
    });
    await withTimeout(device.open(), STEP_MS, 'device open');

    // Register the method handlers right after connecting; the SDK subscribes
    // to $iothub/methods/POST/# at once on this same connection, so the twin
    // round trips below (answered by the hub after it processed the earlier
    // SUBSCRIBE) also prove the subscription is in place.
    device.onDeviceMethod('echo', (request, response) => {
      sendMethodResponse(response, 200, { method: request.methodName, echo: request.payload ?? null }).catch((err) => {
        throw err;
      });
    });
    device.onDeviceMethod('status', (request, response) => {
      // The device picks the status; the hub passes it through untouched.
      sendMethodResponse(response, request.payload.status, request.payload.body).catch((err) => {
        throw err;
      });
    });
    device.onDeviceMethod('hang', (request) => {
      hangingCalls.push(request.requestId);
    });
  });

  test('device gets its twin', async () => {
    twin = await withTimeout(device.getTwin(), STEP_MS, 'device getTwin');
    const { desired, reported } = twin.properties;
    assert.equal(typeof desired.$version, 'number', `desired.$version in ${JSON.stringify(desired)}`);
    assert.equal(typeof reported.$version, 'number', `reported.$version in ${JSON.stringify(reported)}`);
    assert.equal(desired.$metadata, undefined, 'the device view of the twin carries no $metadata');
    initialReportedVersion = reported.$version;

    // Listen for desired patches now; the SDK subscribes to
    // $iothub/twin/PATCH/properties/desired/# and first replays the current
    // desired document to the new listener.
    twin.on('properties.desired', (patch) => desiredEvents.push(structuredClone(patch)));
  });

  test('device reports properties and the hub acknowledges them', async () => {
    await withTimeout(
      reportProperties(twin, {
        interop: { sdk: 'azure-iot-device', count: 42, ok: true, nested: { level: 2, list: [1, 'two'] } },
        firmwareStatus: 'standBy',
        doomed: 'deleted by the next patch',
      }),
      STEP_MS,
      'reported patch 1',
    );
    // A member set to null is deleted (JSON merge patch).
    await withTimeout(reportProperties(twin, { doomed: null, interop: { count: 43 } }), STEP_MS, 'reported patch 2');

    const reported = (await registry.getTwin(deviceId)).responseBody.properties.reported;
    assert.equal(reported.firmwareStatus, 'standBy');
    assert.deepEqual(
      { ...reported.interop },
      { sdk: 'azure-iot-device', count: 43, ok: true, nested: { level: 2, list: [1, 'two'] } },
    );
    assert.equal(reported.doomed, undefined, 'null deleted the member');
    assert.ok(reported.$version > initialReportedVersion, `reported $version ${reported.$version} grew from ${initialReportedVersion}`);
  });

  test('device receives the desired patches the service sets with Registry.updateTwin', async () => {
    const before = (await registry.getTwin(deviceId)).responseBody;
    const startVersion = before.properties.desired.$version;

    const updated = (
      await registry.updateTwin(
        deviceId,
        { tags: { site: 'lab' }, properties: { desired: { interop: { interval: 5, mode: 'fast' } } } },
        before.etag,
      )
    ).responseBody;
    assert.equal(updated.properties.desired.$version, startVersion + 1);
    assert.deepEqual({ ...updated.properties.desired.interop }, { interval: 5, mode: 'fast' });
    assert.equal(updated.tags.site, 'lab');

    const first = await waitFor('the first desired patch on the device', () =>
      desiredEvents.find((p) => p.interop && p.$version === startVersion + 1),
    );
    assert.deepEqual(first, { interop: { interval: 5, mode: 'fast' }, $version: startVersion + 1 });

    // A null in the service's patch reaches the device as a null and deletes
    // the member; the etag is the one the previous update returned.
    await registry.updateTwin(deviceId, { properties: { desired: { interop: { mode: null } } } }, updated.etag);
    const second = await waitFor('the second desired patch on the device', () =>
      desiredEvents.find((p) => p.interop && p.$version === startVersion + 2),
    );
    assert.deepEqual(second, { interop: { mode: null }, $version: startVersion + 2 });
    assert.deepEqual({ ...twin.properties.desired.interop }, { interval: 5 }, 'the SDK merged both patches');

    // An etag that is no longer current is refused (optimistic concurrency).
    const stale = await rejectionOf(
      registry.updateTwin(deviceId, { properties: { desired: { interop: { mode: 'slow' } } } }, before.etag),
      'updateTwin with a stale etag',
    );
    assert.equal(stale.name, 'InvalidEtagError', stale.stack);
    assert.equal(stale.response.statusCode, 412);
  });

  // Payloads of every JSON type round-trip through the hub unchanged.
  const payloads = [
    ['an object', { fwPackageUri: 'https://example.invalid/fw.bin', n: 1.5, deep: { list: [true, null, 'ü€'] } }],
    ['an array', [1, 'two', { three: 3 }]],
    ['a string', 'hello "quoted" \\ world'],
    ['a number', 12345],
    ['null', null],
  ];
  for (const [name, payload] of payloads) {
    test(`service invokes a direct method with ${name} as payload and gets the device's answer`, async () => {
      const { result } = await service.invokeDeviceMethod(deviceId, {
        methodName: 'echo',
        payload,
        responseTimeoutInSeconds: 10,
      });
      assert.deepEqual(result, { status: 200, payload: { method: 'echo', echo: payload } });
    });
  }

  test('the device chooses the method status and the service sees it unchanged', async () => {
    const { result } = await service.invokeDeviceMethod(deviceId, {
      methodName: 'status',
      payload: { status: 409, body: { error: 'busy', updateId: 'u-1' } },
      responseTimeoutInSeconds: 10,
    });
    assert.deepEqual(result, { status: 409, payload: { error: 'busy', updateId: 'u-1' } });
  });

  test('a method the device never answers fails with 504101 after responseTimeoutInSeconds', async () => {
    const started = Date.now();
    const err = await rejectionOf(
      service.invokeDeviceMethod(deviceId, { methodName: 'hang', payload: {}, responseTimeoutInSeconds: 5 }),
      'invoking a method the device never answers',
    );
    const elapsed = Date.now() - started;
    assert.equal(err.name, 'GatewayTimeoutError', err.stack);
    const body = serviceError(err);
    assert.equal(body.httpStatus, 504);
    assert.equal(body.errorCode, 504101, JSON.stringify(body));
    assert.equal(hangingCalls.length, 1, 'the device received the request');
    // The hub waits the full timeout before giving up (lower bound only: the
    // upper bound is the test's own timeout).
    assert.ok(elapsed >= 4500, `answered after ${elapsed} ms, before the 5 s response timeout`);

    // The hub keeps serving the same device afterwards.
    const { result } = await service.invokeDeviceMethod(deviceId, { methodName: 'echo', payload: 'still here' });
    assert.deepEqual(result, { status: 200, payload: { method: 'echo', echo: 'still here' } });
  });

  test('the service reads the twin back with the reported properties and the desired version', async () => {
    const serviceTwin = (await registry.getTwin(deviceId)).responseBody;
    assert.equal(serviceTwin.deviceId, deviceId);
    assert.equal(serviceTwin.properties.reported.firmwareStatus, 'standBy');
    assert.equal(serviceTwin.properties.reported.interop.count, 43);
    assert.deepEqual({ ...serviceTwin.properties.desired.interop }, { interval: 5 });
    assert.equal(serviceTwin.tags.site, 'lab');

    // The device's own GET agrees with the service view on both versions.
    const lastDesired = desiredEvents.at(-1);
    assert.equal(serviceTwin.properties.desired.$version, lastDesired.$version);
    const deviceView = await withTimeout(device.getTwin(), STEP_MS, 'second device getTwin');
    assert.equal(deviceView.properties.desired.$version, serviceTwin.properties.desired.$version);
    assert.equal(deviceView.properties.reported.$version, serviceTwin.properties.reported.$version);
  });

  describe('a second device with keys chosen by the caller', () => {
    const otherId = uniqueId('interop-other');
    const goodKey = newKey();

    before(async () => {
      const created = (
        await registry.create({
          deviceId: otherId,
          status: 'enabled',
          authentication: { symmetricKey: { primaryKey: goodKey, secondaryKey: newKey() } },
        })
      ).responseBody;
      assert.equal(created.authentication.symmetricKey.primaryKey, goodKey);
    });

    test('connecting with a wrong key fails with an authorization error', async () => {
      const client = DeviceClient.fromConnectionString(deviceConnectionString(hostName, otherId, newKey()), Mqtt);
      // No retries: the first answer of the hub is what is under test.
      client.setRetryPolicy(new NoRetry());
      const err = await rejectionOf(withTimeout(client.open(), STEP_MS, 'open with a wrong key'), 'open with a wrong key');
      assert.equal(err.name, 'UnauthorizedError', err.stack);
      assert.match(String(err.transportError && err.transportError.message), /Not authorized/);
    });

    test('the same device connects with its right key (control)', async () => {
      const client = DeviceClient.fromConnectionString(deviceConnectionString(hostName, otherId, goodKey), Mqtt);
      client.setRetryPolicy(new NoRetry());
      await withTimeout(client.open(), STEP_MS, 'open with the right key');
      await withTimeout(client.close(), STEP_MS, 'close');
    });

    test('a SAS token that has expired is refused with an authorization error', async () => {
      const expired = DeviceSAS.create(hostName, otherId, goodKey, Math.floor(Date.now() / 1000) - 60).toString();
      const client = DeviceClient.fromSharedAccessSignature(expired, Mqtt);
      client.setRetryPolicy(new NoRetry());
      const err = await rejectionOf(withTimeout(client.open(), STEP_MS, 'open with an expired token'), 'open with an expired token');
      assert.equal(err.name, 'UnauthorizedError', err.stack);
      assert.match(String(err.transportError && err.transportError.message), /Not authorized/);
    });

    test('a method to the device while it is offline fails with 404103', async () => {
      const err = await rejectionOf(
        service.invokeDeviceMethod(otherId, { methodName: 'echo', payload: {}, responseTimeoutInSeconds: 5 }),
        'invoking a method on an offline device',
      );
      const body = serviceError(err);
      assert.equal(body.httpStatus, 404);
      assert.equal(body.errorCode, 404103, JSON.stringify(body));
    });

    test('the registry updates the device (Registry.update, If-Match "*") and reads it back', async () => {
      const updated = (
        await registry.update({
          deviceId: otherId,
          status: 'disabled',
          statusReason: 'interop test',
          authentication: { symmetricKey: { primaryKey: goodKey, secondaryKey: newKey() } },
        })
      ).responseBody;
      assert.equal(updated.status, 'disabled');
      const read = (await registry.get(otherId)).responseBody;
      assert.equal(read.status, 'disabled');
      assert.equal(read.authentication.symmetricKey.primaryKey, goodKey);

      // A disabled device is answered as an unregistered one.
      const err = await rejectionOf(
        service.invokeDeviceMethod(otherId, { methodName: 'echo', payload: {}, responseTimeoutInSeconds: 5 }),
        'invoking a method on a disabled device',
      );
      const body = serviceError(err);
      assert.equal(body.httpStatus, 404);
      assert.equal(body.errorCode, 404001, JSON.stringify(body));
    });

    test('the registry deletes the device, then reads give 404001', async () => {
      await registry.delete(otherId);
      const err = await rejectionOf(registry.get(otherId), 'reading a deleted device');
      const body = serviceError(err);
      assert.equal(body.httpStatus, 404);
      assert.equal(body.errorCode, 404001, JSON.stringify(body));
    });
  });

  test('a device over MQTT on WebSocket (MqttWs, wss://host:443/$iothub/websocket) uses its twin and answers a method', async () => {
    const wsId = uniqueId('interop-ws');
    const key = newKey();
    await registry.create({ deviceId: wsId, authentication: { symmetricKey: { primaryKey: key, secondaryKey: newKey() } } });
    const client = DeviceClient.fromConnectionString(deviceConnectionString(hostName, wsId, key), MqttWs);
    try {
      await withTimeout(client.open(), STEP_MS, 'MqttWs open');
      client.onDeviceMethod('ping', (request, response) => {
        sendMethodResponse(response, 200, { pong: request.payload }).catch((err) => {
          throw err;
        });
      });
      const wsTwin = await withTimeout(client.getTwin(), STEP_MS, 'MqttWs getTwin');
      await withTimeout(reportProperties(wsTwin, { transport: 'mqtt-ws' }), STEP_MS, 'MqttWs reported patch');
      const { result } = await service.invokeDeviceMethod(wsId, { methodName: 'ping', payload: 7, responseTimeoutInSeconds: 10 });
      assert.deepEqual(result, { status: 200, payload: { pong: 7 } });
      const reported = (await registry.getTwin(wsId)).responseBody.properties.reported;
      assert.equal(reported.transport, 'mqtt-ws');
    } finally {
      await withTimeout(client.close(), STEP_MS, 'MqttWs close');
    }
  });

  test('the first device is still served after the failures above', async () => {
    const { result } = await service.invokeDeviceMethod(deviceId, { methodName: 'echo', payload: { last: true } });
    assert.deepEqual(result, { status: 200, payload: { method: 'echo', echo: { last: true } } });
  });
});
