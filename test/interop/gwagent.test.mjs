// Interop scenario: the official Azure IoT service SDK for Node.js
// (azure-iothub) drives the real gwagent through gwhub: it registers a
// device, invokes the tutorial's firmwareUpdate direct method and follows
// the reported progress in the device twin until the update completes —
// what an operator's back end written against Azure IoT Hub does.
//
// gwagent runs as its own process (GWAGENT_BIN, built by run.sh) with the
// simulated installer, which downloads fwPackageUri for real from a plain
// HTTP server this test serves on 127.0.0.1.
//
// Service SDK calls used here beyond those listed in gwhub.test.mjs:
//   invokeDeviceMethod with connectTimeoutInSeconds > 0: the hub holds the call until the device is
//     connected and subscribed to $iothub/methods/POST/#, so no test-side retry loop is needed;
//   Registry.createQuery(sql, 100).nextAsTwin(): POST /devices/query?api-version=2021-04-12,
//     body {"query":"SELECT …"}, header x-ms-max-item-count: 100; answer: a JSON array of twins.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createWriteStream } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import {
  Registry,
  ServiceClient,
  deviceConnectionString,
  hubHostName,
  serviceConnectionString,
  uniqueId,
  waitFor,
  withTimeout,
} from './lib/peers.mjs';

// The tutorial's firmwareStatus values, in the order an update goes through them.
const STATUS_ORDER = ['standBy', 'downloading', 'verifying', 'applying', 'rebooting', 'committing', 'completed'];

// The same scenario with the agent on each transport: MQTT over TLS on 8883,
// and MQTT over WebSocket on 443 (hub.transport websocket), as on a network
// that blocks 8883.
for (const transport of ['mqtt', 'websocket']) {
  describe(`gwagent through gwhub over ${transport}, driven by the official service SDK`, { timeout: 180000 }, () => {
    const agentBin = process.env.GWAGENT_BIN;
    const serviceCS = serviceConnectionString();
    const hostName = hubHostName(serviceCS);
    const registry = Registry.fromConnectionString(serviceCS);
    const service = ServiceClient.fromConnectionString(serviceCS);
    const deviceId = uniqueId(`interop-agent-${transport}`);

    const image = randomBytes(256 * 1024);
    const imageSHA256 = createHash('sha256').update(image).digest('hex');
    let imageServer;
    let imageURL;
    let work;
    let agent;
    let agentLog;
    let agentExit;

    let failed = false;

    before(async () => {
      try {
        await startAgent();
      } catch (err) {
        failed = true;
        throw err;
      }
    });

    async function startAgent() {
      assert.ok(agentBin, 'GWAGENT_BIN is not set: start the scenarios through test/interop/run.sh');
      work = await mkdtemp(join(tmpdir(), 'gwagent-interop-'));

      imageServer = createServer((req, res) => {
        if (req.url !== '/fw.bin') {
          res.writeHead(404).end();
          return;
        }
        res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': image.length });
        res.end(image);
      });
      imageServer.listen(0, '127.0.0.1');
      await once(imageServer, 'listening');
      imageURL = `http://127.0.0.1:${imageServer.address().port}/fw.bin`;

      const created = (await registry.create({ deviceId })).responseBody;
      const key = created.authentication.symmetricKey.primaryKey;

      // JSON is YAML: the agent reads this as its config.yaml. Short stages
      // keep the run quick; the order of the reported states is what counts.
      const config = {
        hub: {
          connectionString: deviceConnectionString(hostName, deviceId, key),
          caFile: process.env.NODE_EXTRA_CA_CERTS,
          transport,
        },
        stateDir: join(work, 'state'),
        installer: {
          type: 'simulated',
          simulated: { waitBeforeDownload: '1s', download: '1s', apply: '1s' },
        },
        // The test image is not signed.
        signature: { allowUnsigned: true },
        report: { minInterval: '100ms' },
        log: { level: 'debug', format: 'json' },
      };
      const configFile = join(work, 'config.yaml');
      await writeFile(configFile, JSON.stringify(config, null, 2), { mode: 0o600 });

      agentLog = join(work, 'gwagent.log');
      const out = createWriteStream(agentLog);
      agent = spawn(agentBin, ['run', '--config', configFile], { stdio: ['ignore', 'pipe', 'pipe'] });
      agent.stdout.pipe(out);
      agent.stderr.pipe(out);
      agentExit = once(agent, 'exit');
    }

    after(async () => {
      try {
        if (agent) {
          // The agent must still be running: it never exits on its own.
          const early = agent.exitCode ?? agent.signalCode;
          if (early !== null) {
            failed = true;
            throw new Error(`gwagent exited early (${early})`);
          }
          agent.kill('SIGTERM');
          try {
            const [code, signal] = await withTimeout(agentExit, 20000, 'gwagent stopping after SIGTERM');
            if (code !== 0) {
              failed = true;
              throw new Error(`gwagent stopped with exit code ${code} (signal ${signal})`);
            }
          } catch (err) {
            failed = true;
            agent.kill('SIGKILL');
            await agentExit;
            throw err;
          }
        }
      } finally {
        if (imageServer) {
          imageServer.close();
        }
        if (failed && agentLog) {
          process.stderr.write(`gwagent log (${agentLog}):\n${await readFile(agentLog, 'utf8')}\n`);
        } else if (work) {
          await rm(work, { recursive: true, force: true });
        }
      }
    });

    let updateId;
    // step is test() that remembers a failure, so after() can show the agent's log.
    const step = (name, fn) =>
      test(name, async (t) => {
        try {
          await fn(t);
        } catch (err) {
          failed = true;
          throw err;
        }
      });

    step('firmwareUpdate is accepted with an update id', async () => {
      // connectTimeoutInSeconds lets the hub wait for the freshly started agent
      // to connect and subscribe, as IoT Hub does.
      const { result } = await service.invokeDeviceMethod(deviceId, {
        methodName: 'firmwareUpdate',
        payload: { fwPackageUri: imageURL, version: '2.0.0', sha256: imageSHA256, size: image.length },
        responseTimeoutInSeconds: 30,
        connectTimeoutInSeconds: 60,
      });
      assert.equal(result.status, 200, JSON.stringify(result));
      assert.equal(result.payload.status, 'accepted', JSON.stringify(result));
      assert.ok(result.payload.updateId, JSON.stringify(result));
      updateId = result.payload.updateId;
    });

    step('a second firmwareUpdate while one runs gets 409 with the running update id', async () => {
      const { result } = await service.invokeDeviceMethod(deviceId, {
        methodName: 'firmwareUpdate',
        payload: { fwPackageUri: imageURL },
        responseTimeoutInSeconds: 30,
      });
      assert.deepEqual(result, { status: 409, payload: { error: 'busy', updateId } });
    });

    step('a malformed payload gets 400 and an unknown method 404', async () => {
      const bad = await service.invokeDeviceMethod(deviceId, {
        methodName: 'firmwareUpdate',
        payload: { version: 'no uri' },
        responseTimeoutInSeconds: 30,
      });
      assert.equal(bad.result.status, 400, JSON.stringify(bad.result));
      assert.ok(bad.result.payload.error, JSON.stringify(bad.result));

      const unknown = await service.invokeDeviceMethod(deviceId, { methodName: 'noSuchMethod', responseTimeoutInSeconds: 30 });
      assert.deepEqual(unknown.result, { status: 404, payload: { error: 'unknown method noSuchMethod' } });
    });

    step('the service follows the reported progress in the twin until completed', async (t) => {
      const seen = [];
      const reported = await waitFor(
        'firmwareStatus completed in the twin',
        async () => {
          const r = (await registry.getTwin(deviceId)).responseBody.properties.reported;
          if (r.firmwareStatus && seen.at(-1) !== r.firmwareStatus) {
            seen.push(r.firmwareStatus);
          }
          assert.notEqual(r.firmwareStatus, 'failed', JSON.stringify(r));
          return r.firmwareStatus === 'completed' && r.firmware && r.firmware.updateId === updateId ? r : null;
        },
        { timeoutMs: 120000, intervalMs: 100 },
      );
      t.diagnostic(`firmwareStatus seen by polling the twin: ${seen.join(' -> ')}`);
      // Whatever was seen went forward only.
      const ranks = seen.map((s) => STATUS_ORDER.indexOf(s));
      assert.ok(!ranks.includes(-1), `unknown firmwareStatus in ${seen}`);
      assert.deepEqual([...ranks].sort((a, b) => a - b), ranks, `firmwareStatus went backwards: ${seen}`);

      assert.equal(reported.firmware.status, 'completed');
      assert.equal(reported.firmware.targetVersion, '2.0.0');
      assert.equal(reported.firmware.currentVersion, '2.0.0', 'the new version runs');
      // null in a reported patch deletes the member (merge patch): absent or null both mean no error.
      assert.ok(reported.firmware.error == null, JSON.stringify(reported.firmware));
      for (const k of ['logTime', 'downloadComplete', 'startedApplyingImage', 'lastFirmwareUpdate']) {
        assert.ok(!Number.isNaN(Date.parse(reported[k])), `${k} = ${reported[k]} is not a timestamp`);
      }
      assert.ok(Date.parse(reported.downloadComplete) <= Date.parse(reported.startedApplyingImage));
      assert.ok(Date.parse(reported.startedApplyingImage) <= Date.parse(reported.lastFirmwareUpdate));
    });

    step('an IoT Hub query (Registry.createQuery) finds the device by its reported firmware version', async () => {
      // Queries are eventually consistent on IoT Hub: poll, bounded.
      const sql = "SELECT * FROM devices WHERE properties.reported.firmware.currentVersion = '2.0.0'";
      await waitFor('the device in the query result', async () => {
        const { result } = await registry.createQuery(sql, 100).nextAsTwin();
        return result.some((twin) => twin.deviceId === deviceId);
      });
    });

    step(`the agent connected over ${transport}`, async () => {
      const lines = (await readFile(agentLog, 'utf8')).split('\n').filter((l) => l.startsWith('{'));
      const connects = lines.map((l) => JSON.parse(l)).filter((e) => e.msg === 'connected');
      assert.ok(connects.length > 0, 'no "connected" line in the agent log');
      assert.ok(connects.every((e) => e.transport === transport), JSON.stringify(connects));
    });
  });
}
