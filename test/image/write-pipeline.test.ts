// The write pipeline's reading (src/image/write-pipeline.ts): a positional source (a file) has
// its chunks read at once, whatever order they finish in; a stream is read one fill at a
// time, in order; after a short chunk (the input's end) nothing more is written. Every case
// reads the image back byte for byte, through a dedup image (chunks hashed ahead) and a plain one.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { createImage, dedupOf, openForWrite } from '../../src/dedup/open.ts';
import { ChunkReader, writeChunks, type ChunkSource } from '../../src/image/write-pipeline.ts';
import { tempDir } from '../helpers.ts';

const CLUSTER = 4096;
const CHUNK = 16 * CLUSTER;
const SIZE = 64 * CHUNK; // 4 MiB disk

/** Repeating data: every other cluster repeats an earlier one, so dedup links some. */
function data(chunks: number): Buffer {
  const out = randomBytes(chunks * CHUNK);
  for (let c = 1; c < out.length / CLUSTER; c += 2) out.copy(out, c * CLUSTER, (c >> 2) * CLUSTER, ((c >> 2) + 1) * CLUSTER);
  return out;
}

/** Counts fills in flight; positional fills finish in reverse order of asking, after `delay(k)` ms. */
function countingSource(bytes: Buffer, positional: boolean, end = bytes.length) {
  const stats = { inFlight: 0, most: 0, calls: 0, order: [] as number[] };
  const read = async (buf: Buffer, at: number, want: number) => {
    stats.calls++;
    stats.inFlight++;
    stats.most = Math.max(stats.most, stats.inFlight);
    await new Promise((r) => setTimeout(r, Math.max(0, 20 - 3 * stats.calls)));
    stats.inFlight--;
    stats.order.push(at);
    return bytes.copy(buf, 0, at, Math.min(end, at + want));
  };
  let pos = 0;
  const source: ChunkSource = {
    fill: async (buf, want) => {
      const n = await read(buf, pos, want);
      pos += n;
      return n;
    },
  };
  if (positional) source.fillAt = (buf, at, want) => read(buf, at, want);
  return { source, stats };
}

async function writeAll(path: string, dedup: boolean, source: ChunkSource, offset: number, limit: number) {
  const plain = { size: SIZE, clusterBits: 12, version: 3 as const, refcountOrder: 4, lazyRefcounts: false, force: true };
  const settings = { algorithm: 'sha256' as const, verify: false, maxIncarnations: 0, order: 4, journalBlockSize: 4096 };
  await createImage(path, dedup ? { ...plain, dedup: settings } : plain);
  const image = await openForWrite(path);
  const reader = new ChunkReader(source, limit, CHUNK);
  const r = await writeChunks(image, offset, reader, await reader.next(), { room: SIZE - offset });
  // Not vacuous: with dedup, the repeated clusters were linked.
  if (dedup) assert.ok(dedupOf(image)!.counters.hits > 0, 'dedup hits');
  await image.close();
  return r;
}

async function readBack(path: string): Promise<Buffer> {
  const image = await Image.open(path);
  try {
    return await image.readGuest(0, SIZE);
  } finally {
    await image.close();
  }
}

for (const dedup of [true, false]) {
  const kind = dedup ? 'dedup' : 'plain';

  test(`${kind}: a positional source is read several chunks at once, finishing out of order; the image holds its bytes`, async () => {
    const dir = tempDir();
    const bytes = data(20);
    const { source, stats } = countingSource(bytes, true);
    const r = await writeAll(join(dir, 'a.qcow2'), dedup, source, CLUSTER, bytes.length);
    assert.deepEqual(r, { written: bytes.length, overflow: false });
    assert.ok(stats.most > 1, `reads overlapped (at most ${stats.most} at once)`);
    const sorted = [...stats.order].sort((a, b) => a - b);
    assert.notDeepEqual(stats.order, sorted, 'some read finished before one asked earlier');
    const want = Buffer.alloc(SIZE);
    bytes.copy(want, CLUSTER);
    assert.ok((await readBack(join(dir, 'a.qcow2'))).equals(want));
  });

  test(`${kind}: a stream is read one fill at a time, in order`, async () => {
    const dir = tempDir();
    const bytes = data(12);
    const { source, stats } = countingSource(bytes, false);
    const r = await writeAll(join(dir, 'b.qcow2'), dedup, source, 0, SIZE + 1);
    assert.deepEqual(r, { written: bytes.length, overflow: false });
    assert.equal(stats.most, 1);
    assert.deepEqual(
      stats.order,
      [...stats.order].sort((a, b) => a - b),
    );
    const want = Buffer.alloc(SIZE);
    bytes.copy(want);
    assert.ok((await readBack(join(dir, 'b.qcow2'))).equals(want));
  });

  test(`${kind}: after a short chunk nothing more is written, even where a later read finds bytes`, async () => {
    const dir = tempDir();
    const bytes = data(10);
    // Chunk 4 comes back short (the input seemed to end there); chunks 5 and on read bytes again.
    const shortAt = 4 * CHUNK + 3 * CLUSTER;
    const inner = countingSource(bytes, true).source;
    const source: ChunkSource = {
      fill: inner.fill,
      fillAt: async (buf, at, want) => inner.fillAt!(buf, at, at === 4 * CHUNK ? shortAt - at : want),
    };
    const r = await writeAll(join(dir, 'c.qcow2'), dedup, source, 0, bytes.length);
    assert.deepEqual(r, { written: shortAt, overflow: false });
    const want = Buffer.alloc(SIZE);
    bytes.copy(want, 0, 0, shortAt);
    assert.ok((await readBack(join(dir, 'c.qcow2'))).equals(want));
  });
}
