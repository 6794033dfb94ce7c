// Interop scenario: X.509 attestation with gwhub as a local DPS, driven by
// the official SDKs:
//   azure-iot-provisioning-service 1.11.2 creates an X.509 enrollment group
//     (signingCertificates: the factory CA) and an individual X.509
//     enrollment (clientCertificates: the device's own certificate);
//   azure-iot-provisioning-device 1.9.1 + azure-iot-provisioning-device-mqtt 1.8.1
//     + azure-iot-security-x509 1.7.12 register over MQTT on 8883 with a TLS
//     client certificate whose CN is the registration id (no SAS token);
//   the same over MqttWs (MQTT on wss://{host}:443/$iothub/websocket);
//   azure-iot-device then connects to the assigned hub with the same
//     certificate (x509=true).
// The certificates are made here with the openssl command (a real CA, a
// device certificate it signs, a self-signed one and one from another CA).
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

import provDevice from 'azure-iot-provisioning-device';
import provMqtt from 'azure-iot-provisioning-device-mqtt';
import x509Security from 'azure-iot-security-x509';
import provService from 'azure-iot-provisioning-service';

import { DeviceClient, Mqtt, hubHostName, rejectionOf, uniqueId, withTimeout } from './lib/peers.mjs';

const STEP_MS = 30000;
const run = promisify(execFile);

function dpsEnv() {
  const cs = process.env.DPS_CONNECTION_STRING;
  const scope = process.env.DPS_ID_SCOPE;
  if (!cs || !scope) {
    throw new Error('DPS_CONNECTION_STRING and DPS_ID_SCOPE are not set: start the scenarios through test/interop/run.sh');
  }
  return { cs, scope };
}

// Certificates made with openssl in dir.
async function openssl(...args) {
  await run('openssl', args, { timeout: STEP_MS });
}

async function newCA(dir, name) {
  const key = join(dir, `${name}.key`), cert = join(dir, `${name}.pem`);
  await openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
    '-subj', `/CN=${name}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,digitalSignature',
    '-keyout', key, '-out', cert);
  return { key, cert };
}

// newDevice makes a device certificate with CN cn, signed by ca (or
// self-signed when ca is null), and returns its PEM text.
async function newDevice(dir, name, cn, ca) {
  const key = join(dir, `${name}.key`), cert = join(dir, `${name}.pem`);
  if (ca) {
    const csr = join(dir, `${name}.csr`);
    await openssl('req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-subj', `/CN=${cn}`,
      '-keyout', key, '-out', csr);
    await openssl('x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial', '-days', '1', '-out', cert);
  } else {
    await openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1',
      '-subj', `/CN=${cn}`, '-keyout', key, '-out', cert);
  }
  return { cert: await readFile(cert, 'utf8'), key: await readFile(key, 'utf8') };
}

function registerX509(host, scope, registrationId, pair, Transport = provMqtt.Mqtt) {
  const security = new x509Security.X509Security(registrationId, pair);
  const client = provDevice.ProvisioningDeviceClient.create(host, scope, new Transport(), security);
  return withTimeout(client.register(), STEP_MS, `register ${registrationId}`);
}

async function connectX509(hub, deviceId, pair) {
  const device = DeviceClient.fromConnectionString(`HostName=${hub};DeviceId=${deviceId};x509=true`, Mqtt);
  device.setOptions({ cert: pair.cert, key: pair.key });
  await withTimeout(device.open(), STEP_MS, 'device open');
  const twin = await withTimeout(device.getTwin(), STEP_MS, 'getTwin');
  assert.ok(twin.properties.reported);
  await withTimeout(device.close(), STEP_MS, 'device close');
}

describe('gwhub as a DPS with X.509 attestation and the official SDKs', { timeout: 180000 }, () => {
  const { cs, scope } = dpsEnv();
  const host = hubHostName(cs);
  const service = provService.ProvisioningServiceClient.fromConnectionString(cs);
  const groupId = uniqueId('x509-factory');
  let dir, ca;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'gwinterop-x509-'));
    ca = await newCA(dir, 'factory-ca');
  });
  after(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test('service SDK creates an X.509 enrollment group from the CA certificate', async () => {
    const created = (await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: groupId,
      attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: await readFile(ca.cert, 'utf8') } } } },
      provisioningStatus: 'enabled',
    })).responseBody;
    assert.equal(created.enrollmentGroupId, groupId);
    const info = created.attestation.x509.signingCertificates.primary.info;
    assert.match(info.subjectName, /factory-ca/);
    assert.match(info.sha1Thumbprint, /^[0-9A-F]{40}$/);
  });

  test('device SDK registers with a CA-signed certificate and connects to the hub with it', async () => {
    const id = uniqueId('gw-x509');
    const pair = await newDevice(dir, 'dev1', id, ca);
    const result = await registerX509(host, scope, id, pair);
    assert.equal(result.status, 'assigned');
    assert.equal(result.assignedHub, host);
    assert.equal(result.deviceId, id);
    await connectX509(result.assignedHub, result.deviceId, pair);
    const st = (await service.getDeviceRegistrationState(id)).responseBody;
    assert.equal(st.status, 'assigned');
  });

  test('device SDK registers over MQTT on a WebSocket (MqttWs, wss://host:443/$iothub/websocket)', async () => {
    const id = uniqueId('gw-x509-ws');
    const pair = await newDevice(dir, 'ws1', id, ca);
    const result = await registerX509(host, scope, id, pair, provMqtt.MqttWs);
    assert.equal(result.status, 'assigned');
    assert.equal(result.deviceId, id);
  });

  test('a certificate from another CA, or whose CN is not the registration id, is refused', async () => {
    const other = await newCA(dir, 'other-ca');
    const id = uniqueId('gw-x509-bad');
    let err = await rejectionOf(registerX509(host, scope, id, await newDevice(dir, 'bad1', id, other)), 'register with another CA');
    assert.match(String(err), /authori|refused/i);
    err = await rejectionOf(registerX509(host, scope, id, await newDevice(dir, 'bad2', `${id}-not`, ca)), 'register with a CN mismatch');
    assert.match(String(err), /authori|refused/i);
  });

  test('an individual X.509 enrollment of a self-signed device certificate', async () => {
    const id = uniqueId('gw-x509-self');
    const pair = await newDevice(dir, 'self', id, null);
    await service.createOrUpdateIndividualEnrollment({
      registrationId: id, deviceId: `${id}-dev`,
      attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: pair.cert } } } },
    });
    const result = await registerX509(host, scope, id, pair);
    assert.equal(result.deviceId, `${id}-dev`);
    await connectX509(result.assignedHub, result.deviceId, pair);
    await service.deleteIndividualEnrollment(id);
    await service.deleteEnrollmentGroup(groupId);
  });
});
