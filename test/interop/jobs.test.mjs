// Interop scenario: IoT Hub jobs v2 and twin tags with the official service
// SDK (azure-iothub 1.16.6 JobClient and Registry) against gwhub, with
// devices connected through the device SDK answering the scheduled method.
//
// What JobClient puts on the wire (from the pinned SDK source):
//   scheduleDeviceMethod  PUT /jobs/v2/{jobId}  {"jobId","type":"scheduleDeviceMethod",
//                         "cloudToDeviceMethod":{"methodName","payload","responseTimeoutInSeconds"},
//                         "startTime":ISO|null,"maxExecutionTimeInSeconds":N (3600 when not given),"queryCondition"}
//   scheduleTwinUpdate    PUT /jobs/v2/{jobId}  {..., "type":"scheduleUpdateTwin","updateTwin":{patch}}
//   getJob                GET /jobs/v2/{jobId}
//   cancelJob             POST /jobs/v2/{jobId}/cancel
//   createQuery           GET /jobs/v2/query?jobStatus=&jobType=
// Each answer resolves to {jobStatus: <the JSON body>, response}.
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';

import {
  DeviceClient,
  JobClient,
  Mqtt,
  Registry,
  deviceConnectionString,
  hubHostName,
  rejectionOf,
  sendMethodResponse,
  serviceConnectionString,
  serviceError,
  uniqueId,
  waitFor,
  withTimeout,
} from './lib/peers.mjs';

const STEP_MS = 20000;

describe('gwhub jobs v2 with the official azure-iothub JobClient', { timeout: 120000 }, () => {
  const serviceCS = serviceConnectionString();
  const hostName = hubHostName(serviceCS);
  const registry = Registry.fromConnectionString(serviceCS);
  const jobs = JobClient.fromConnectionString(serviceCS);
  const site = uniqueId('site');
  const online = [uniqueId('job-on1'), uniqueId('job-on2')];
  const offline = uniqueId('job-off');
  const outsider = uniqueId('job-out');
  const clients = [];
  const calls = new Map(); // deviceId → method payloads received

  after(async () => {
    for (const c of clients) {
      await withTimeout(c.close(), STEP_MS, 'device close');
    }
  });

  test('Registry.updateTwin sets tags with the etag, and a stale etag is refused', async () => {
    for (const id of [...online, offline, outsider]) {
      const created = (await registry.create({ deviceId: id, status: 'enabled' })).responseBody;
      const twin = (await registry.getTwin(id)).responseBody;
      const tags = { site: id === outsider ? `${site}-other` : site, ring: '1' };
      const updated = (await registry.updateTwin(id, { tags }, twin.etag)).responseBody;
      assert.deepEqual({ ...updated.tags }, tags);
      assert.notEqual(updated.etag, twin.etag);
      const err = await rejectionOf(registry.updateTwin(id, { tags: { ring: '2' } }, twin.etag), 'stale etag');
      assert.equal(err.name, 'InvalidEtagError', err.stack);
      if (id !== offline) {
        const c = DeviceClient.fromConnectionString(
          deviceConnectionString(hostName, id, created.authentication.symmetricKey.primaryKey),
          Mqtt,
        );
        c.on('error', (e) => {
          throw new Error(`device client error: ${e.stack || e}`);
        });
        await withTimeout(c.open(), STEP_MS, 'device open');
        c.onDeviceMethod('firmwareUpdate', (request, response) => {
          calls.set(id, [...(calls.get(id) ?? []), request.payload]);
          sendMethodResponse(response, 200, { accepted: request.payload.version }).catch((e) => {
            throw e;
          });
        });
        // A twin round trip after onDeviceMethod: the method subscription
        // is in place once the hub answers it.
        await withTimeout(c.getTwin(), STEP_MS, 'device getTwin');
        clients.push(c);
      }
    }
    const query = registry.createQuery(`SELECT * FROM devices WHERE tags.site = '${site}' AND tags.ring = '1'`);
    const page = (await query.nextAsTwin()).result;
    assert.deepEqual(page.map((t) => t.deviceId).sort(), [...online, offline].sort());
  });

  test('scheduleDeviceMethod calls the method on the matching online devices; the offline one fails', async () => {
    const jobId = uniqueId('job-method');
    const scheduled = (
      await jobs.scheduleDeviceMethod(jobId, `tags.site = '${site}'`, {
        methodName: 'firmwareUpdate',
        payload: { version: '2.0.0' },
        responseTimeoutInSeconds: 15,
      })
    ).jobStatus;
    assert.equal(scheduled.jobId, jobId);
    assert.equal(scheduled.type, 'scheduleDeviceMethod');

    const done = await waitFor('the method job to complete', async () => {
      const j = (await jobs.getJob(jobId)).jobStatus;
      return j.status === 'completed' ? j : undefined;
    });
    assert.deepEqual({ ...done.deviceJobStatistics }, {
      deviceCount: 3,
      failedCount: 1,
      succeededCount: 2,
      runningCount: 0,
      pendingCount: 0,
    });
    for (const id of online) {
      assert.deepEqual(calls.get(id), [{ version: '2.0.0' }], `calls on ${id}`);
    }
    assert.equal(calls.get(outsider), undefined, 'the device of another site was not called');

    const rows = (
      await registry.createQuery(`SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '${jobId}' AND devices.jobs.status = 'failed'`).next()
    ).result;
    assert.equal(rows.length, 1);
    assert.equal(rows[0].deviceId, offline);
    assert.equal(rows[0].error.code, 'DeviceNotOnline');

    const listed = (await jobs.createQuery('scheduleDeviceMethod', 'completed').next()).result;
    assert.ok(listed.some((j) => j.jobId === jobId), `job query lists ${jobId}`);
  });

  test('scheduleTwinUpdate sets tags and desired properties on the matching devices', async () => {
    const jobId = uniqueId('job-twin');
    await jobs.scheduleTwinUpdate(jobId, `tags.site = '${site}'`, {
      etag: '*',
      tags: { wave: '1' },
      properties: { desired: { firmware: { version: '2.0.0' } } },
    });
    await waitFor('the twin job to complete', async () => (await jobs.getJob(jobId)).jobStatus.status === 'completed');
    for (const id of [...online, offline]) {
      const twin = (await registry.getTwin(id)).responseBody;
      assert.equal(twin.tags.wave, '1');
      assert.equal(twin.properties.desired.firmware.version, '2.0.0');
    }
    assert.equal((await registry.getTwin(outsider)).responseBody.tags.wave, undefined);
  });

  test('a job scheduled for later is queued and can be cancelled', async () => {
    const jobId = uniqueId('job-later');
    const later = new Date(Date.now() + 3600 * 1000);
    const queued = (
      await jobs.scheduleDeviceMethod(jobId, `tags.site = '${site}'`, { methodName: 'firmwareUpdate', payload: {} }, later, 600)
    ).jobStatus;
    assert.equal(queued.status, 'queued');
    assert.equal(queued.maxExecutionTimeInSeconds, 600);
    const cancelled = (await jobs.cancelJob(jobId)).jobStatus;
    assert.equal(cancelled.status, 'cancelled');
    assert.equal((await jobs.getJob(jobId)).jobStatus.status, 'cancelled');
  });

  test('an invalid query condition is refused with IoT Hub 400 body', async () => {
    const err = await rejectionOf(
      jobs.scheduleDeviceMethod(uniqueId('job-bad'), "tags.site = ", { methodName: 'firmwareUpdate' }),
      'bad condition',
    );
    const e = serviceError(err);
    assert.equal(e.httpStatus, 400);
    assert.equal(e.errorCode, 400004);
  });
});
