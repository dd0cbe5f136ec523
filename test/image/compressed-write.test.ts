// Compressed writes (src/image/compressed-write.ts, compressed-packing.ts, chunk-compressor.ts):
// streams packed byte-tight across clusters, refcounts one per stream touching a cluster,
// zeros as zero clusters, incompressible clusters plain. QEMU is the oracle: qemu-img check
// finds no error and counts the compressed clusters, qemu-img compare finds the guest bytes,
// and QEMU writing over compressed clusters leaves an image both tools read alike.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { packStreams } from '../../src/image/compressed-packing.ts';
import { ChunkCompressor } from '../../src/image/chunk-compressor.ts';
import { controlLayout } from '../../src/image/chunk-workers.ts';
import { inflateCluster } from '../../src/format/deflate.ts';
import { STREAM_HEADER_BYTES, encodeStreamHeader, framedStreamsTouching } from '../../src/format/stream-header.ts';
import { createImage } from '../../src/image/create.ts';
import { Image } from '../../src/image/image.ts';
import { ChunkReader, bufferSource, writeChunks } from '../../src/image/write-pipeline.ts';
import { NO_QEMU, qemuCheck, qemuCompareRaw, run, tempDir } from '../helpers.ts';

test('packStreams: byte-tight, crossing clusters, one reference per stream touching a cluster', () => {
  const p = packStreams([1000, 1000, 3000, 100, 4095], 4096, 0xffff);
  assert.deepEqual(p.offsets, [0, 1000, 2000, 5000, 5100]);
  assert.equal(p.clusters, 3); // 5100 + 4095 = 9195 bytes
  assert.deepEqual(p.touches, [3, 3, 1]);
});

test('packStreams: a cluster at the refcount maximum takes no more streams', () => {
  const p = packStreams([10, 10, 10, 5000 % 4096], 4096, 2);
  assert.deepEqual(p.offsets, [0, 10, 4096, 4106]);
  assert.deepEqual(p.touches, [2, 2]);
  // 1-bit refcounts: every stream starts a cluster of its own; a crossing one touches two.
  const one = packStreams([3000, 3000], 4096, 1);
  assert.deepEqual(one.offsets, [0, 4096]);
  assert.deepEqual(one.touches, [1, 1]);
  assert.throws(() => packStreams([4096], 4096, 5), /stream of 4096 bytes/);
});

test('packStreams framed: each stream after its header, in one cluster, never on a boundary; the headers find every stream', () => {
  const cs = 4096;
  const lengths = [1000, 3000, 4079, 7, 4088, 2500, 1, 4095];
  const p = packStreams(lengths, cs, 0xffff, true);
  const run = Buffer.alloc(p.clusters * cs);
  lengths.forEach((len, k) => {
    const [h, o] = [p.headers[k], p.offsets[k]];
    assert.equal(o - h, STREAM_HEADER_BYTES);
    assert.equal(h % 8, 0);
    assert.equal(Math.floor(h / cs), Math.floor(o / cs), 'header and stream start in one cluster');
    assert.notEqual(o % cs, 0, 'no stream on a boundary');
    if (k) assert.ok(h >= p.offsets[k - 1] + lengths[k - 1], 'no overlap');
    encodeStreamHeader(run, h, len);
    run.fill(0xee, o, o + len); // not a header's magic
  });
  for (let c = 0; c < p.clusters; c++) {
    const want = lengths.map((length, k) => ({ offset: p.offsets[k], length })).filter((s) => s.offset < (c + 1) * cs && s.offset + s.length > c * cs);
    const from = Math.max(0, c - 1) * cs;
    const found = framedStreamsTouching(run.subarray(from, (c + 1) * cs), from, cs, c);
    assert.deepEqual(found, want, `cluster ${c}`);
    // Each cluster's count is its streams: the refcount packing gives it.
    assert.equal(p.touches[c], want.length, `touches of cluster ${c}`);
  }
});

/** Guest data of `clusters` clusters: text-like (compressible), random (not), zeros, repeats. */
function mixedData(clusters: number, cs: number): Buffer {
  const out = Buffer.alloc(clusters * cs);
  const words = ['qcow2 ', 'cluster ', 'deflate ', 'refcount ', 'guest ', 'host ', 'stream '];
  for (let c = 0; c < clusters; c++) {
    const at = c * cs;
    switch (c % 5) {
      case 0:
      case 1: {
        let s = '';
        for (let i = 0; s.length < cs; i++) s += words[(i * 7 + c) % words.length] + (c * 31 + i).toString(36);
        out.write(s.slice(0, cs), at, 'latin1');
        break;
      }
      case 2:
        randomBytes(cs).copy(out, at);
        break;
      case 3:
        break; // zeros
      case 4:
        out.fill(c & 0xff, at, at + cs / 2);
        randomBytes(cs / 2).copy(out, at + cs / 2); // half compressible
        break;
    }
  }
  return out;
}

async function newImage(path: string, clusterBits: number, size: number, extra: { version?: 2 | 3; refcountOrder?: number } = {}): Promise<void> {
  await createImage(path, { size, clusterBits, version: extra.version ?? 3, refcountOrder: extra.refcountOrder ?? 4, lazyRefcounts: false, force: true });
}

/** Writes `data` at `offset` through the write pipeline (chunks compressed by the workers) with -c. */
async function writePiped(path: string, offset: number, data: Buffer): Promise<void> {
  const image = await Image.open(path, { writable: true, compress: true });
  const reader = new ChunkReader(bufferSource(data), data.length);
  await writeChunks(image, offset, reader, await reader.next(), { room: image.size - offset });
  await image.close();
}

/** Writes `data` at `offset` with one write() of a plain buffer (compressed on this thread) with -c. */
async function writeDirect(path: string, offset: number, data: Buffer): Promise<void> {
  const image = await Image.open(path, { writable: true, compress: true });
  await image.write(offset, data);
  await image.close();
}

async function readBack(path: string, offset: number, length: number): Promise<Buffer> {
  const image = await Image.open(path);
  try {
    return await image.read(offset, length);
  } finally {
    await image.close();
  }
}

for (const clusterBits of [12, 16]) {
  const cs = 2 ** clusterBits;
  test(`${cs}-byte clusters: qemu-img check clean, compare identical, the same file from workers and from the main thread`, { skip: NO_QEMU }, async () => {
    const dir = tempDir();
    // Past MIN_WORKER_BYTES (1 MiB), so the workers take part; a partial cluster at each end.
    const data = mixedData(Math.ceil((3 * 1024 * 1024) / cs), cs).subarray(100, -100);
    const size = data.length + 2 * cs;
    const raw = join(dir, 'guest.raw');
    const guest = Buffer.alloc(size);
    data.copy(guest, cs + 100);
    writeFileSync(raw, guest);
    const piped = join(dir, 'piped.qcow2');
    const direct = join(dir, 'direct.qcow2');
    for (const p of [piped, direct]) await newImage(p, clusterBits, size);
    await writePiped(piped, cs + 100, data);
    await writeDirect(direct, cs + 100, data);
    assert.ok(readFileSync(piped).equals(readFileSync(direct)), 'the workers change nothing in the result');
    assert.ok((await readBack(piped, 0, size)).equals(guest), 'qdedup reads back the bytes written');
    const check = qemuCheck(piped);
    assert.equal(check.status, 0, check.stderr);
    assert.equal(check.json!.corruptions ?? 0, 0);
    assert.equal(check.json!.leaks ?? 0, 0);
    assert.ok(Number(check.json!['compressed-clusters']) > 0, 'qemu-img counts compressed clusters');
    assert.ok(qemuCompareRaw(piped, raw), 'qemu-img reads the same guest bytes');
    // Smaller than the same bytes stored plain: 2 of 5 clusters are text, 1 of 5 zeros.
    const plain = join(dir, 'plain.qcow2');
    await newImage(plain, clusterBits, size);
    const img = await Image.open(plain, { writable: true });
    await img.write(cs + 100, data);
    await img.close();
    assert.ok(readFileSync(piped).length < readFileSync(plain).length * 0.8, 'compression saves space');
  });
}

test('QEMU writes over compressed clusters, qdedup rewrites them: both read the same, check clean', { skip: NO_QEMU }, async () => {
  const dir = tempDir();
  const cs = 4096;
  const data = mixedData(300, cs);
  const path = join(dir, 'c.qcow2');
  const raw = join(dir, 'guest.raw');
  await newImage(path, 12, data.length);
  await writeDirect(path, 0, data);
  // QEMU: a partial overwrite across compressed streams (copy on write of each).
  assert.equal(run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 6000 20000', path]).status, 0);
  data.fill(0x5a, 6000, 26000);
  // qdedup: compressed again over compressed, then plain over compressed.
  const again = Buffer.from(data.subarray(40 * cs, 90 * cs).reverse());
  await writeDirect(path, 40 * cs, again);
  again.copy(data, 40 * cs);
  const img = await Image.open(path, { writable: true });
  await img.write(200 * cs + 7, Buffer.alloc(3 * cs, 0x11));
  await img.close();
  data.fill(0x11, 200 * cs + 7, 203 * cs + 7);
  writeFileSync(raw, data);
  assert.ok((await readBack(path, 0, data.length)).equals(data));
  assert.ok(qemuCompareRaw(path, raw));
  const check = qemuCheck(path);
  assert.equal(check.status, 0, check.stderr);
  assert.equal(check.json!.leaks ?? 0, 0, 'the streams QEMU and qdedup replaced are freed with their clusters');
});

test('1-bit refcounts and a v2 image: every cluster within its refcount width, check clean', { skip: NO_QEMU }, async () => {
  const dir = tempDir();
  const cs = 4096;
  const data = mixedData(64, cs);
  const raw = join(dir, 'guest.raw');
  writeFileSync(raw, data);
  for (const [name, extra] of [
    ['r1', { refcountOrder: 0 }],
    ['v2', { version: 2 as const }],
  ] as const) {
    const path = join(dir, `${name}.qcow2`);
    await newImage(path, 12, data.length, extra);
    await writeDirect(path, 0, data);
    const check = qemuCheck(path);
    assert.equal(check.status, 0, `${name}: ${check.stderr}`);
    assert.ok(Number(check.json!['compressed-clusters']) > 0, name);
    assert.ok(qemuCompareRaw(path, raw), name);
  }
});

test("ChunkCompressor: the workers' script runs and compresses a whole chunk by itself, before complete()", async () => {
  // Results never depend on the workers (complete() does what they leave), so only this test
  // tells workers whose script fails from ones that work.
  const cs = 4096;
  const count = 256; // 1 MiB: a chunk the workers are given
  const data = Buffer.from(new SharedArrayBuffer(count * cs));
  for (let i = 0; i < count; i++) data.write(`cluster ${i} `.repeat(400), i * cs, cs, 'latin1');
  const c = new ChunkCompressor(cs);
  try {
    const p = c.begin(data, 0, count);
    const ctrl = new Int32Array(p.out, controlLayout(count * cs + count * 4, count).ctrl, 2); // the result's counters
    for (const t0 = Date.now(); Atomics.load(ctrl, 1) < count && Date.now() - t0 < 20_000; ) await new Promise((r) => setTimeout(r, 5));
    assert.equal(Atomics.load(ctrl, 1), count, 'clusters the workers compressed');
    for (const i of [0, 100, 255]) {
      assert.ok(p.lengths[i] > 0 && p.lengths[i] < cs, `cluster ${i} compressed`);
      assert.ok(
        inflateCluster(p.streams.subarray(i * cs, i * cs + p.lengths[i]), cs).equals(data.subarray(i * cs, (i + 1) * cs)),
        `cluster ${i} inflates back`,
      );
    }
    p.complete();
  } finally {
    await c.close();
  }
});
