// Closing the hash worker at any moment — while it starts, loads koffi for OpenSSL's SHA-256 or
// hashes — never aborts the process (a worker terminated inside a native call can: "FATAL
// ERROR: Error::ThrowAsJavaScriptException napi_throw"). Run in a child process, since such an
// abort ends the whole process.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { BIN, ROOT, tempDir } from '../helpers.ts';

const SCRIPT = `
import { ChunkHasher } from './src/dedup/chunk-hasher.ts';
const data = Buffer.from(new SharedArrayBuffer(512 * 4096));
for (let i = 0; i < data.length; i += 4096) data[i] = 1 + (i % 251);
for (let round = 0; round < 30; round++) {
  const h = new ChunkHasher('sha256', 4096);
  const d = h.begin(data, 0, 512); // a job for the worker, which is only starting
  if (round % 3 !== 0) d.complete(); // this thread hashes what the worker has not taken
  if (round % 3 === 2) await new Promise((r) => setTimeout(r, round)); // the worker mid-load or mid-hash
  await h.close();
}
console.log('closed 30 times');
`;

test('the hash worker closes at any moment without aborting the process', () => {
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', SCRIPT], { cwd: ROOT, encoding: 'utf8', timeout: 120_000 });
  assert.doesNotMatch(r.stderr, /FATAL|napi/, r.stderr);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /closed 30 times/);
});

test('write -i of a chunk the worker is given but this thread hashes: exit 0, never an abort (10 runs)', () => {
  // 1.5 MB: one chunk, large enough for the worker, which is still starting when the main
  // thread has hashed it all and the image closes.
  const dir = tempDir('qdedup-worker-close-');
  const img = join(dir, 'd.qcow2');
  const data = randomBytes(1_500_000);
  assert.equal(spawnSync(process.execPath, [BIN, 'create', '-q', img, '4M']).status, 0);
  for (let run = 0; run < 10; run++) {
    const r = spawnSync(process.execPath, [BIN, 'write', '-q', '-i', '-', img, String(run * 4096)], { input: data, encoding: 'utf8' });
    assert.doesNotMatch(r.stderr, /FATAL|napi/, `run ${run}: ${r.stderr}`);
    assert.equal(r.status, 0, `run ${run}: ${r.stderr}`);
  }
});
