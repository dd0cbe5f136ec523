// Crash-point enumeration for deduplicating writes (I1–I3, docs/DESIGN.md). Each
// workload runs on a FaultyFile that loses power at operation k, for every k, keeping none,
// all, a random subset or torn sectors of the unsynced writes. Every resulting disk must:
// read each acknowledged write back (the step in flight may read old or new); check with
// no corruption (our check, and `qemu-img check` never exiting 2 on a sample); have its
// index dropped on the next read-write open when the crash left the dirty flag set; and,
// after that open writes and closes cleanly, hold only index entries whose cluster's bytes
// hash to them. The workloads: heavy repetition; rewrites that free shared clusters; a
// tiny store that freezes log stores into incarnations and evicts them — each also with
// dedup_verify=on; the write pipeline (chunks hashed ahead, data runs in flight); and
// writes to an image whose dedup extension does not decode (the first write replaces it). QDEDUP_SOAK_SCALE=N runs N seeds per workload.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { createImage } from '../../src/dedup/open.ts';
import { checkOpenImage } from '../../src/image/check-image.ts';
import { CorruptImageError } from '../../src/errors.ts';
import { liveEntries } from '../../src/dedup/inspect.ts';
import { clusterSpan } from '../../src/dedup/clusters.ts';
import { isStreamEntry, streamLengthOf } from '../../src/format/hash-entry.ts';
import { inflateCluster } from '../../src/format/deflate.ts';
import { judgeStore } from '../../src/dedup/judge-store.ts';
import { FaultyFile, type LossMode } from '../doubles/faulty-file.ts';
import { MemFile } from '../doubles/mem-file.ts';
import type { DedupSettings } from '../../src/dedup/dedup.ts';
import { HAVE_QEMU, qemuCheck, tempDir } from '../helpers.ts';
import { compressedUse, runSteps, shadowsOf, type Op } from '../image/crash-lib.ts';
import { dedupExtensionPayload } from './cli-lib.ts';
import { openForWrite, dedupOf } from '../../src/dedup/open.ts';

interface Workload {
  name: string;
  size: number;
  clusterBits: number;
  settings: DedupSettings;
  steps: Op[][];
  /** Written with -c: unique clusters as compressed copies (src/dedup/compressed-copies.ts). */
  compress?: boolean;
  /** Run and closed before the crash enumeration, after which the dedup extension is made undecodable (the workload's first write replaces it). */
  damagedAfter?: Op[];
}

const CS = 4096;
const SCALE = Math.max(1, Math.round(Number(process.env.QDEDUP_SOAK_SCALE ?? 1)));

function rng(seed: number) {
  let x = seed >>> 0 || 1;
  return (n: number) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

/** Cluster-sized blocks: a few patterns repeated, to make duplicates. */
function blocks(rnd: (n: number) => number, clusters: number, palette: number): Buffer {
  const out = Buffer.alloc(clusters * CS);
  for (let c = 0; c < clusters; c++) out.fill(1 + rnd(palette), c * CS, (c + 1) * CS);
  return out;
}

/** Cluster-sized blocks of a few patterns, each half random bytes and half text: they compress to about half, so streams cross clusters. */
function halfCompressible(rnd: (n: number) => number, clusters: number, palette: number): Buffer {
  const out = Buffer.alloc(clusters * CS);
  for (let c = 0; c < clusters; c++) {
    const p = 1 + rnd(palette);
    const r = rng(p * 7919);
    for (let i = 0; i < CS; i++) out[c * CS + i] = (i >> 5) % 2 ? r(256) : 0x61 + ((i * p) % 13);
  }
  return out;
}

function workloads(seed: number): Workload[] {
  const rnd = rng(seed);
  const base = { algorithm: 'sha256' as const, verify: false, maxIncarnations: 0, order: 6, journalBlockSize: 512 };
  // 1. Heavy repetition: each step writes runs of a few patterns, some unaligned.
  const heavy: Op[][] = [];
  for (let s = 0; s < 6; s++) {
    const step: Op[] = [{ kind: 'write', offset: s * 16 * CS, data: blocks(rnd, 12, 3) }];
    if (rnd(2)) step.push({ kind: 'write', offset: 200 * CS + rnd(CS), data: Buffer.alloc(CS + rnd(2 * CS), 1 + rnd(3)) });
    heavy.push(step);
  }
  // 2. Rewrites: the same region rewritten so shared clusters lose references and are freed.
  const rewrites: Op[][] = [
    [
      { kind: 'write', offset: 0, data: blocks(rnd, 16, 2) },
      { kind: 'write', offset: 32 * CS, data: blocks(rnd, 16, 2) },
    ],
  ];
  for (let s = 0; s < 5; s++) {
    const step: Op[] = [{ kind: 'write', offset: rnd(8) * CS, data: blocks(rnd, 8, 6) }];
    step.push(rnd(3) ? { kind: 'write', offset: 32 * CS + rnd(8) * CS, data: blocks(rnd, 6, 6) } : { kind: 'zero', offset: 32 * CS, length: 8 * CS });
    rewrites.push(step);
  }
  // 3. A tiny store (8 slots, 2 incarnations kept): unique clusters freeze and evict it.
  const tiny: Op[][] = [];
  for (let s = 0; s < 5; s++) {
    const data = Buffer.alloc(10 * CS);
    for (let c = 0; c < 10; c++) data.fill(((s * 10 + c) % 250) + 1, c * CS, (c + 1) * CS);
    tiny.push([{ kind: 'write', offset: (s % 3) * 10 * CS, data }]);
  }
  // 6. The write pipeline: chunks hashed ahead, data runs still being written while the next
  // chunk is decided (power lost with batches in flight); chunks that end inside a cluster,
  // so the next chunk's first cluster is read back while its first part may be in flight.
  const piped: Op[][] = [
    [{ kind: 'stream', offset: 0, data: blocks(rnd, 40, 4), chunk: 8 * CS }],
    [{ kind: 'stream', offset: 50 * CS + 1000, data: blocks(rnd, 30, 4), chunk: 6 * CS + 512 }],
    [{ kind: 'stream', offset: 4 * CS, data: blocks(rnd, 24, 8), chunk: 5 * CS }],
  ];
  const out: Workload[] = [];
  for (const verify of [false, true]) {
    out.push({ name: `pipelined${verify ? '+verify' : ''}`, size: 1 << 20, clusterBits: 12, settings: { ...base, verify }, steps: piped });
    out.push({ name: `heavy${verify ? '+verify' : ''}`, size: 1 << 20, clusterBits: 12, settings: { ...base, verify }, steps: heavy });
    out.push({ name: `rewrites${verify ? '+verify' : ''}`, size: 1 << 20, clusterBits: 12, settings: { ...base, verify }, steps: rewrites });
    out.push({
      name: `tiny-store${verify ? '+verify' : ''}`,
      size: 1 << 20,
      clusterBits: 12,
      settings: { ...base, verify, order: 1, maxIncarnations: 2 },
      steps: tiny,
    });
  }
  // 7. Compressed copies (-c): runs of framed streams, duplicates linked to them, rewrites
  // and zeros that release them (every stream touching a dying cluster deleted first), in
  // direct writes and through the pipeline.
  const compressed: Op[][] = [
    [{ kind: 'write', offset: 0, data: halfCompressible(rnd, 16, 5) }],
    [{ kind: 'stream', offset: 20 * CS + 700, data: halfCompressible(rnd, 20, 5), chunk: 6 * CS }],
    [
      { kind: 'write', offset: 4 * CS, data: halfCompressible(rnd, 8, 9) },
      { kind: 'zero', offset: 24 * CS, length: 6 * CS },
    ],
    [{ kind: 'write', offset: 0, data: Buffer.alloc(12 * CS, 0x33) }],
  ];
  out.push({ name: 'compressed', size: 1 << 20, clusterBits: 12, settings: base, steps: compressed, compress: true });
  out.push({ name: 'compressed+verify', size: 1 << 20, clusterBits: 12, settings: { ...base, verify: true }, steps: compressed, compress: true });
  // 4. A journal that grows (allocated as it fills): 512-byte clusters and journal blocks, a
  // log store of 2048 slots whose 128-block journal fills with the first 1,152 entries; the
  // live entries move to a journal twice as large and the old area is given back.
  const uniq = (first: number, n: number) => {
    const b = Buffer.alloc(n * 512);
    for (let i = 0; i < n * 128; i++) b.writeUInt32LE(((first * 128 + i) * 2654435761) >>> 0, i * 4);
    return b;
  };
  const grows: Op[][] = [
    [{ kind: 'write', offset: 0, data: uniq(0, 1300) }],
    [{ kind: 'write', offset: 1400 * 512, data: Buffer.concat([uniq(0, 100), uniq(5000, 200)]) }],
  ];
  out.push({ name: 'journal-grows', size: 2 << 20, clusterBits: 9, settings: { ...base, order: 9 }, steps: grows });
  // 5. A dedup extension that does not decode: the first write replaces it (a fresh store).
  out.push({ name: 'malformed-extension', size: 1 << 20, clusterBits: 12, settings: base, damagedAfter: heavy[0], steps: heavy.slice(1, 3) });
  return out;
}

/** Every live index entry's cluster hashes to it (the image open read-write, after a clean close it is the same). */
async function assertIndexTrue(image: Image, label: string): Promise<number> {
  const d = dedupOf(image)!;
  let n = 0;
  for await (const e of liveEntries(image, d.store)) {
    const cs = image.clusterSize;
    const length = isStreamEntry(e.hostOffset, cs) ? streamLengthOf(e.guestField, cs) : 0;
    const data = length ? inflateCluster(await image.file.read(e.hostOffset, length), cs) : await image.file.read(e.hostOffset, cs);
    assert.ok(d.hasher.hash(data).equals(e.hash), `${label}: index entry for ${e.hostOffset} does not hash to its content`);
    const [first, last] = clusterSpan(e.hostOffset, length || cs, cs);
    for (const c of new Set([first, last])) assert.ok(await d.holder.isHeld(c), `${label}: cluster ${c} of the entry for ${e.hostOffset} is not held`);
    n++;
  }
  return n;
}

async function verifyState(path: string, bytes: Buffer, before: Buffer, after: Buffer, label: string): Promise<void> {
  const ro = await Image.open(path, { file: new MemFile(path, bytes) });
  const data = await ro.read(0, ro.size);
  for (let s = 0; s < data.length; s += 512) {
    const got = data.subarray(s, s + 512);
    if (!got.equals(before.subarray(s, s + 512)) && !got.equals(after.subarray(s, s + 512))) {
      assert.fail(`${label}: sector at guest ${s} is neither the acknowledged nor the new data`);
    }
  }
  const result = await checkOpenImage({ path, file: ro.file, header: ro.header, l1: ro.l1, writable: false }, { onMessage: () => {} });
  assert.equal(result.corruptions, 0, `${label}: corruptions: ${result.messages.join('; ')}`);
  let wasTrusted = false;
  try {
    wasTrusted = (await judgeStore(ro, { tolerant: true })).trusted;
  } catch (err) {
    if (!(err instanceof CorruptImageError)) throw err; // an extension that does not decode: not trusted
  }
  await ro.close();

  // Reopen for writing: a dirty store must be dropped; then write, close, and the index must be true.
  const mem = new MemFile(path, Buffer.from(bytes));
  const rw = await openForWrite(path, { file: mem });
  if (!wasTrusted) assert.ok(dedupOf(rw)!.notice, `${label}: the dirty index was trusted`);
  await rw.write(0, Buffer.alloc(2 * CS, 0x42));
  await rw.close();
  const again = await openForWrite(path, { file: mem });
  assert.equal(dedupOf(again)!.notice, null, `${label}: a clean close left the store untrusted`);
  await assertIndexTrue(again, label);
  assert.ok((await again.read(0, 2 * CS)).equals(Buffer.alloc(2 * CS, 0x42)), `${label}: write after recovery`);
  await again.abandon();
}

/** The image with its dedup extension's store order set to 30 (above the limit: the extension no longer decodes). */
function withUndecodableExtension(bytes: Buffer): Buffer {
  const out = Buffer.from(bytes);
  out[dedupExtensionPayload(out) + 3] = 30;
  return out;
}

const MODES: LossMode[] = ['drop-unsynced', 'keep-unsynced', 'random-subset', 'torn'];

test('dedup: crash at every write and sync: acknowledged data survives, no corruption, the index is dropped or true', async () => {
  const dir = tempDir('qdedup-dedup-crash-');
  let states = 0;
  let qemuChecked = 0;
  for (let round = 0; round < SCALE; round++) {
    for (const w of workloads(0xc0ffee + round * 1000)) {
      const path = join(dir, `${w.name}.qcow2`);
      await createImage(path, { size: w.size, clusterBits: w.clusterBits, version: 3, refcountOrder: 4, lazyRefcounts: false, force: true, dedup: w.settings });
      let shadows = shadowsOf(w.size, w.steps);
      if (w.damagedAfter) {
        const image = await openForWrite(path);
        for (const op of w.damagedAfter) if (op.kind === 'write') await image.write(op.offset, op.data);
        await image.close();
        writeFileSync(path, withUndecodableExtension(readFileSync(path)));
        shadows = shadowsOf(w.size, [w.damagedAfter, ...w.steps]).slice(1);
      }
      const base = readFileSync(path);
      const probe = new FaultyFile(path, base);
      assert.equal(await runSteps(path, probe, w.steps, w.compress), w.steps.length);
      if (w.compress) {
        // Not vacuous: compressed copies are linked (shared), and some cross a cluster boundary.
        const { copies, crossing } = await compressedUse(path, await probe.afterPowerLoss('drop-unsynced'));
        assert.ok([...copies.values()].some((n) => n > 1) && crossing > 0, `${w.name}: ${copies.size} compressed copies, ${crossing} crossing`);
      }
      const totalOps = probe.ops;
      // Every operation index; the fast tier takes every mode at every second index and one mode elsewhere.
      for (let k = 0; k <= totalOps; k++) {
        const modes = SCALE > 1 || k % 2 === 0 ? MODES : [MODES[k % 4]];
        for (const mode of modes) {
          const file = new FaultyFile(path, base, { crashAt: k });
          const acked = await runSteps(path, file, w.steps, w.compress);
          const bytes = await file.afterPowerLoss(mode, k * 7 + 1);
          const label = `${w.name} round ${round}, crash at op ${k}/${totalOps}, ${mode}`;
          await verifyState(path, bytes, shadows[acked], shadows[Math.min(acked + 1, w.steps.length)], label);
          states++;
          if (HAVE_QEMU && k % 11 === 0 && mode !== 'keep-unsynced') {
            const out = join(dir, 'state.qcow2');
            writeFileSync(out, bytes);
            const q = qemuCheck(out);
            assert.ok(q.status === 0 || q.status === 3, `${label}: qemu-img check exit ${q.status}: ${q.stderr}`);
            qemuChecked++;
          }
        }
      }
    }
  }
  console.log(`# dedup crash states verified: ${states} (qemu-img check on ${qemuChecked}${HAVE_QEMU ? '' : '; qemu-img not installed'})`);
  assert.ok(states >= 1000, `only ${states} crash states`);
});
