// Crash-point enumeration for the plain QCOW2 engine (I1, docs/DESIGN.md, I3): a workload runs on a
// FaultyFile that loses power at operation k, for every k, keeping none, all, a random
// subset or torn sectors of the unsynced writes. Each resulting disk must open, read every
// acknowledged write back (the step in flight may read old or new, sector by sector),
// check with no corruption (leaks allowed), and take further writes.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { createImage } from '../../src/image/create.ts';
import { checkOpenImage } from '../../src/image/check-image.ts';
import { FaultyFile, type LossMode } from '../doubles/faulty-file.ts';
import { MemFile } from '../doubles/mem-file.ts';
import { HAVE_QEMU, qemuCheck, tempDir } from '../helpers.ts';
import { compressedUse, runSteps, shadowsOf, type Op } from './crash-lib.ts';
import { openForWrite } from '../../src/dedup/open.ts';

/**
 * A seeded workload: steps of 1–3 non-overlapping operations, each step one open/close.
 * `compressible`: data that deflates to about half (streams that cross clusters), some
 * random (stored plain), and streamed writes through the pipeline — for compressed writes.
 */
function workload(seed: number, size: number, clusterSize: number, steps: number, compressible = false): Op[][] {
  let x = seed;
  const rnd = (n: number) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
  const out: Op[][] = [];
  for (let s = 0; s < steps; s++) {
    const step: Op[] = [];
    const used: [number, number][] = [];
    for (let i = 0, n = 1 + rnd(3); i < n; i++) {
      const length = 1 + rnd(rnd(2) ? clusterSize * 3 : 700);
      const offset = rnd(size - length);
      const lo = Math.floor(offset / 512) * 512,
        hi = Math.ceil((offset + length) / 512) * 512;
      if (used.some(([a, b]) => lo < b && a < hi)) continue;
      used.push([lo, hi]);
      if (rnd(5) === 0) step.push({ kind: 'zero', offset, length });
      else if (!compressible) step.push({ kind: 'write', offset, data: Buffer.alloc(length, 1 + rnd(255)) });
      else {
        const data = Buffer.alloc(length);
        const plain = rnd(4) === 0; // all random: stored plain
        for (let b = 0; b < length; b++) data[b] = plain || (b >> 6) % 2 ? rnd(256) : 0x41 + (b % 7);
        step.push(rnd(2) ? { kind: 'write', offset, data } : { kind: 'stream', offset, data, chunk: clusterSize * 2 });
      }
    }
    out.push(step);
  }
  return out;
}

async function verifyState(path: string, bytes: Buffer, before: Buffer, after: Buffer, label: string): Promise<void> {
  const image = await Image.open(path, { file: new MemFile(path, bytes) });
  try {
    const data = await image.read(0, image.size);
    for (let s = 0; s < data.length; s += 512) {
      const got = data.subarray(s, s + 512);
      if (!got.equals(before.subarray(s, s + 512)) && !got.equals(after.subarray(s, s + 512))) {
        assert.fail(`${label}: sector at guest ${s} is neither the acknowledged nor the new data`);
      }
    }
    const result = await checkOpenImage({ path, file: image.file, header: image.header, l1: image.l1, writable: false }, { onMessage: () => {} });
    assert.equal(result.corruptions, 0, `${label}: corruptions: ${result.messages.join('; ')}`);
    assert.equal(result.checkErrors, 0, `${label}: check errors: ${result.messages.join('; ')}`);
  } finally {
    await image.close();
  }
}

const CONFIGS = [
  { clusterSize: 512, size: 2 * 1024 * 1024, steps: 13, seed: 11 },
  { clusterSize: 4096, size: 4 * 1024 * 1024, steps: 13, seed: 23 },
  { clusterSize: 65536, size: 8 * 1024 * 1024, steps: 8, seed: 37 },
  // Compressed writes (-c): streams packed across clusters, refcounts per stream.
  { clusterSize: 512, size: 1024 * 1024, steps: 10, seed: 53, compress: true },
  { clusterSize: 4096, size: 4 * 1024 * 1024, steps: 10, seed: 61, compress: true },
];
const MODES: LossMode[] = ['drop-unsynced', 'keep-unsynced', 'random-subset', 'torn'];
/** QDEDUP_SOAK_SCALE=N (npm run soak): N workloads per configuration (round 0 is the CI one; round r uses seed + 1000·r). */
const ROUNDS = Math.max(1, Math.round(Number(process.env.QDEDUP_SOAK_SCALE ?? 1)));

test('crash at every write and sync: acknowledged data survives, no corruption', async () => {
  const dir = tempDir('qdedup-crash-');
  let states = 0;
  let qemuChecked = 0;
  for (const c of CONFIGS.flatMap((c) => Array.from({ length: ROUNDS }, (_, r) => ({ ...c, seed: c.seed + 1000 * r })))) {
    const path = join(dir, `base-${c.clusterSize}.qcow2`);
    await createImage(path, { size: c.size, clusterBits: Math.log2(c.clusterSize), version: 3, refcountOrder: 4, lazyRefcounts: false, force: true });
    const base = readFileSync(path);
    const compress = 'compress' in c && c.compress;
    const steps = workload(c.seed, c.size, c.clusterSize, c.steps, compress);
    // Shadows after each acknowledged step.
    const shadows = shadowsOf(c.size, steps);
    const probe = new FaultyFile(path, base);
    assert.equal(await runSteps(path, probe, steps, compress), steps.length);
    if (compress) {
      // Not vacuous: the workload leaves compressed clusters, some of them streams crossing a cluster boundary.
      const { copies, crossing } = await compressedUse(path, await probe.afterPowerLoss('drop-unsynced'));
      const compressed = [...copies.values()].reduce((a, b) => a + b, 0);
      assert.ok(compressed > 20 && crossing > 0, `${compressed} compressed clusters, ${crossing} crossing`);
    }
    const totalOps = probe.ops;
    for (let k = 0; k <= totalOps; k++) {
      for (const mode of MODES) {
        const file = new FaultyFile(path, base, { crashAt: k });
        const acked = await runSteps(path, file, steps, compress);
        const bytes = await file.afterPowerLoss(mode, k * 7 + 1);
        const label = `cluster ${c.clusterSize}${compress ? ' -c' : ''}, seed ${c.seed}, crash at op ${k}/${totalOps}, ${mode}`;
        await verifyState(path, bytes, shadows[acked], shadows[Math.min(acked + 1, steps.length)], label);
        states++;
        if (HAVE_QEMU && k % 9 === 0 && mode !== 'keep-unsynced') {
          const out = join(dir, 'state.qcow2');
          writeFileSync(out, bytes);
          const q = qemuCheck(out);
          assert.ok(q.status === 0 || q.status === 3, `${label}: qemu-img check exit ${q.status}: ${q.stderr}`);
          qemuChecked++;
        }
        // The crashed image takes a further write and stays consistent.
        if (k % 5 === 0 && mode === 'torn') {
          const again = new FaultyFile(path, bytes);
          const image = await openForWrite(path, { file: again });
          await image.write(0, Buffer.alloc(1000, 0x77));
          await image.close();
          // the in-flight step may or may not have landed: only the new write is asserted
          const reread = await Image.open(path, { file: new MemFile(path, await again.afterPowerLoss('drop-unsynced')) });
          assert.ok((await reread.read(0, 1000)).equals(Buffer.alloc(1000, 0x77)), `${label}: write after recovery`);
          await reread.close();
        }
      }
    }
  }
  console.log(`# crash states verified: ${states} (qemu-img check on ${qemuChecked}${HAVE_QEMU ? '' : '; qemu-img not installed'})`);
  assert.ok(states >= 1000, `only ${states} crash states`);
});
