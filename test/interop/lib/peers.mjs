// Helpers shared by the interop scenarios: the official Azure IoT SDKs for
// Node.js used exactly as an application would use them against Azure IoT Hub.
// Nothing here knows that the hub on the other end is gwhub.
//
// run.sh provides the environment:
//   IOTHUB_CONNECTION_STRING  the hub's service connection string (iothubowner)
//   NODE_EXTRA_CA_CERTS       the hub's CA, trusted by Node's TLS stack
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';

import commonSdk from 'azure-iot-common';
import deviceSdk from 'azure-iot-device';
import mqttSdk from 'azure-iot-device-mqtt';
import serviceSdk from 'azure-iothub';

export const { Client: DeviceClient, SharedAccessSignature: DeviceSAS } = deviceSdk;
export const { NoRetry } = commonSdk;
export const { Mqtt, MqttWs } = mqttSdk;
export const { Registry, Client: ServiceClient, JobClient } = serviceSdk;

// serviceConnectionString returns the service connection string run.sh
// exported, failing loudly when a scenario is started without it.
export function serviceConnectionString() {
  const cs = process.env.IOTHUB_CONNECTION_STRING;
  if (!cs) {
    throw new Error('IOTHUB_CONNECTION_STRING is not set: start the scenarios through test/interop/run.sh');
  }
  return cs;
}

// hubHostName extracts HostName from a connection string (the value the SDKs
// put in the MQTT username, the SAS resource and the REST URL).
export function hubHostName(connectionString) {
  const m = /(?:^|;)HostName=([^;]+)/.exec(connectionString);
  if (!m) {
    throw new Error('connection string has no HostName');
  }
  return m[1];
}

// deviceConnectionString builds the device connection string an operator
// would copy from the portal: HostName, DeviceId and one of the device's keys.
export function deviceConnectionString(hostName, deviceId, key) {
  return `HostName=${hostName};DeviceId=${deviceId};SharedAccessKey=${key}`;
}

// newKey returns a fresh base64 symmetric key of IoT Hub's usual length.
export function newKey() {
  return randomBytes(32).toString('base64');
}

// uniqueId gives each run its own device ids, so a scenario never depends on
// what an earlier run left in the hub.
export function uniqueId(prefix) {
  return `${prefix}-${process.pid}-${Date.now().toString(36)}`;
}

// serviceError decodes IoT Hub's REST error body, whose Message member is
// itself a JSON document encoded as a string:
//   {"Message":"{\"errorCode\":404103,\"trackingId\":…,\"message\":…,\"info\":{…},\"timestampUtc\":…}","ExceptionMessage":""}
// The service SDK attaches the raw body and the response to the errors it
// raises (err.responseBody, err.response).
export function serviceError(err) {
  if (!err || err.responseBody === undefined || !err.response) {
    throw new Error(`not a service REST error: ${err && err.stack ? err.stack : err}`);
  }
  const outer = JSON.parse(err.responseBody);
  const inner = JSON.parse(outer.Message);
  return { httpStatus: err.response.statusCode, ...inner };
}

// rejectionOf awaits a promise that must fail and returns its error.
export async function rejectionOf(promise, what) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  throw new Error(`${what}: succeeded, but an error was expected`);
}

// waitFor polls check() until it returns a truthy value or the deadline
// passes; every wait in the scenarios is bounded by it.
export async function waitFor(what, check, { timeoutMs = 15000, intervalMs = 50 } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v) {
      return v;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await sleep(intervalMs);
  }
}

// withTimeout bounds a promise the SDK might leave pending forever.
export async function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// reportProperties wraps the device SDK's callback-only reported-properties
// update; it resolves when the hub acknowledged the patch on
// $iothub/twin/res/204/?$rid=…
export function reportProperties(twin, patch) {
  return new Promise((resolve, reject) => {
    twin.properties.reported.update(patch, (err) => (err ? reject(err) : resolve()));
  });
}

// sendMethodResponse wraps DeviceMethodResponse.send (callback form).
export function sendMethodResponse(response, status, payload) {
  return new Promise((resolve, reject) => {
    response.send(status, payload, (err) => (err ? reject(err) : resolve()));
  });
}
