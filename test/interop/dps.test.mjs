// Interop scenario: gwhub as a local Device Provisioning Service, driven by
// the official SDKs exactly as a factory and a device use Azure DPS:
//   azure-iot-provisioning-service 1.11.2  creates an enrollment group and an
//     individual enrollment (REST on https://{HostName}:443 of the DPS
//     connection string, policy provisioningserviceowner) and reads the
//     registration state;
//   azure-iot-provisioning-device 1.9.1 + azure-iot-provisioning-device-mqtt 1.8.1
//     + azure-iot-security-symmetric-key 1.8.2 register over MQTT on
//     mqtts://{provisioningHost}:8883 (username {idScope}/registrations/{id}/api-version=2019-03-31&ClientVersion=…,
//     $dps/registrations/PUT/iotdps-register, 202 + retry-after, GET iotdps-get-operationstatus);
//   azure-iot-device then connects to the assigned hub with the derived key.
// gwhub serves DPS on its own host name and ports, so provisioningHost is
// the hub's host name (localhost). `gwctl dps derive-key` (GWCTL_BIN) must
// give the key the SDKs compute, and the device SDK registers with it.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { promisify } from 'node:util';

import sdkAuthorization from 'azure-iot-common/dist/authorization.js';

import provDevice from 'azure-iot-provisioning-device';
import provMqtt from 'azure-iot-provisioning-device-mqtt';
import symKey from 'azure-iot-security-symmetric-key';
import provService from 'azure-iot-provisioning-service';

import { DeviceClient, Mqtt, deviceConnectionString, hubHostName, newKey, rejectionOf, uniqueId, withTimeout } from './lib/peers.mjs';

const STEP_MS = 30000;

function dpsEnv() {
  const cs = process.env.DPS_CONNECTION_STRING;
  const scope = process.env.DPS_ID_SCOPE;
  if (!cs || !scope) {
    throw new Error('DPS_CONNECTION_STRING and DPS_ID_SCOPE are not set: start the scenarios through test/interop/run.sh');
  }
  return { cs, scope };
}

// deriveKey is the group-key derivation from Microsoft's samples.
function deriveKey(groupKey, registrationId) {
  return createHmac('SHA256', Buffer.from(groupKey, 'base64')).update(registrationId, 'utf8').digest('base64');
}

function registerDevice(host, scope, registrationId, key, payload) {
  const security = new symKey.SymmetricKeySecurityClient(registrationId, key);
  const client = provDevice.ProvisioningDeviceClient.create(host, scope, new provMqtt.Mqtt(), security);
  if (payload) {
    client.setProvisioningPayload(payload);
  }
  return withTimeout(client.register(), STEP_MS, `register ${registrationId}`);
}

describe('gwhub as a Device Provisioning Service with the official SDKs', { timeout: 180000 }, () => {
  const { cs, scope } = dpsEnv();
  const host = hubHostName(cs);
  const service = provService.ProvisioningServiceClient.fromConnectionString(cs);
  const groupId = uniqueId('factory');
  const groupKey = newKey();

  test('service SDK creates a symmetric-key enrollment group and reads it back', async () => {
    const created = (await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: groupId,
      attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: groupKey, secondaryKey: newKey() } },
      provisioningStatus: 'enabled',
    })).responseBody;
    assert.equal(created.enrollmentGroupId, groupId);
    assert.ok(created.etag);
    const read = (await service.getEnrollmentGroup(groupId)).responseBody;
    assert.equal(read.attestation.symmetricKey.primaryKey, groupKey);
  });

  const regId = uniqueId('gw');
  let assignment;
  test('device SDK registers with a derived key over MQTT and gets assigned to the hub', async () => {
    const result = await registerDevice(host, scope, regId, deriveKey(groupKey, regId), { modelId: 'dtmi:gwagent:Gateway;1' });
    assert.equal(result.assignedHub, host);
    assert.equal(result.deviceId, regId);
    assert.equal(result.status, 'assigned');
    assignment = result;
  });

  test('the provisioned device connects to the assigned hub with the derived key', async () => {
    assert.ok(assignment, 'needs the registration of the previous test');
    const device = DeviceClient.fromConnectionString(
      deviceConnectionString(assignment.assignedHub, assignment.deviceId, deriveKey(groupKey, regId)), Mqtt);
    await withTimeout(device.open(), STEP_MS, 'device open');
    const twin = await withTimeout(device.getTwin(), STEP_MS, 'getTwin');
    assert.ok(twin.properties.reported);
    await withTimeout(device.close(), STEP_MS, 'device close');
  });

  test('service SDK reads the registration state', async () => {
    const st = (await service.getDeviceRegistrationState(regId)).responseBody;
    assert.equal(st.registrationId, regId);
    assert.equal(st.assignedHub, host);
    assert.equal(st.status, 'assigned');
  });

  test('gwctl dps derive-key equals the SDK derivation and the device SDK registers with it', async (t) => {
    const gwctl = process.env.GWCTL_BIN;
    assert.ok(gwctl, 'GWCTL_BIN is not set: start the scenarios through test/interop/run.sh');
    const id = uniqueId('gw-derived');
    const { stdout } = await promisify(execFile)(gwctl, ['dps', 'derive-key', '--group-key', groupKey, id], { timeout: STEP_MS });
    const derived = stdout.trim();
    // azure-iot-common's hmacHash is what the SDKs sign with: HMAC-SHA256
    // keyed by the base64-decoded key, base64 out; Microsoft's samples
    // derive group keys with node:crypto the same way.
    assert.equal(derived, sdkAuthorization.hmacHash(groupKey, id));
    assert.equal(derived, deriveKey(groupKey, id));
    const result = await registerDevice(host, scope, id, derived);
    assert.equal(result.status, 'assigned');
    assert.equal(result.deviceId, id);
    t.diagnostic(`gwctl dps derive-key ${id} = ${derived}`);
  });

  test('a wrong group key is refused at connect', async () => {
    const other = uniqueId('gw-bad');
    const err = await rejectionOf(registerDevice(host, scope, other, deriveKey(newKey(), other)), 'register with a wrong key');
    assert.match(String(err), /authori|refused/i);
  });

  test('an individual enrollment with its own device id', async () => {
    const id = uniqueId('line');
    const key = newKey();
    await service.createOrUpdateIndividualEnrollment({
      registrationId: id, deviceId: `${id}-dev`,
      attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: key, secondaryKey: newKey() } },
    });
    const result = await registerDevice(host, scope, id, key);
    assert.equal(result.deviceId, `${id}-dev`);
    const e = (await service.getIndividualEnrollment(id)).responseBody;
    assert.equal(e.registrationState.deviceId, `${id}-dev`);
    await service.deleteIndividualEnrollment(id);
    await service.deleteEnrollmentGroup(groupId);
  });
});
