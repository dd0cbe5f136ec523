// The dedup store's mechanics with a tiny store: log stores of 8 slots
// (order 1), at most 2 incarnations, 512-byte journal blocks. Unique clusters freeze log
// stores into incarnations (≥ 5 freezes), copies of recent data hit in the incarnations,
// the oldest incarnations are forgotten (FIFO) and their space reused from limbo, and a
// journal filled by many small sessions of replacements and deletions is packed — every
// figure checked against `dedup-stats` and `journal-dump`, and every byte against a shadow.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { NO_QEMU, qdedup, qemuCheck, tempDir } from '../helpers.ts';
import { openForWrite, dedupOf } from '../../src/dedup/open.ts';

const CS = 4096;

function stats(img: string): Record<string, any> {
  const r = qdedup(['dedup-stats', '--output', 'json', img]);
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout);
}

/** Cluster `i` of unique content: every byte is a function of i. */
function unique(i: number): Buffer {
  const b = Buffer.alloc(CS);
  for (let p = 0; p < CS; p += 4) b.writeUInt32LE((i * 2654435761 + p) >>> 0, p);
  return b;
}

test('tiny store: freezes, hits in incarnations, FIFO eviction with limbo reuse, journal packing', async () => {
  const dir = tempDir('qdedup-store-mechanics-');
  const img = join(dir, 'tiny.qcow2');
  const size = 8 << 20;
  const c = qdedup(['create', '-q', '-o', 'dedup_order=1,dedup_max_incarnations=2,dedup_journal_block=512', img, String(size)]);
  assert.equal(c.status, 0, c.stderr);
  const shadow = Buffer.alloc(size);
  const first = stats(img);
  assert.deepEqual([first['log-store'].capacity, first.incarnations.max, first.journal['blocks-total']], [8, 2, 18]);

  // 1. 60 unique clusters in one session: 8-slot log stores freeze again and again.
  let image = await openForWrite(img);
  const run1 = Buffer.concat(Array.from({ length: 60 }, (_, i) => unique(i)));
  await image.write(0, run1);
  run1.copy(shadow, 0);
  const s1 = dedupOf(image)!.store.stats();
  assert.ok(s1.freezes >= 5, `${s1.freezes} freezes`);
  await image.close();
  let st = stats(img);
  assert.equal(st['data-clusters'], 60);
  assert.equal(st.incarnations.count, 2, 'FIFO: never more than 2 incarnations');
  assert.ok(st.limbo >= 1, 'forgotten incarnations went to limbo');
  // What is indexed: the log store, plus two incarnations of at most 8 slots each.
  assert.ok(st['index-entries'] <= 8 + 2 * 8 && st['index-entries'] >= 8, `${st['index-entries']} index entries`);
  const metadataAfterRun1 = st['metadata-clusters'];

  // 2. A copy of the most recent clusters hits (log store or incarnations); a copy of the
  //    first ones, whose incarnations were forgotten, is written anew: only the ratio drops.
  image = await openForWrite(img);
  const recent = run1.subarray(50 * CS, 60 * CS);
  await image.write(1 << 20, recent);
  recent.copy(shadow, 1 << 20);
  const hitsRecent = dedupOf(image)!.counters.hits;
  const reads = dedupOf(image)!.store.stats();
  assert.equal(hitsRecent, 10, 'every recent cluster is found');
  assert.ok(reads.incarnationHits >= 1, 'some hits come from an incarnation');
  assert.ok(reads.incarnationReads <= reads.incarnationHits * 1.02 + 1, `${reads.incarnationReads} slot reads for ${reads.incarnationHits} incarnation hits`);
  const old = run1.subarray(0, 4 * CS);
  await image.write(2 << 20, old);
  old.copy(shadow, 2 << 20);
  assert.equal(dedupOf(image)!.counters.misses, 4, 'forgotten hashes are misses');
  await image.close();
  st = stats(img);
  assert.equal(st['data-clusters'], 64);
  assert.equal(st['guest-clusters'], 74);

  // 3. Many more unique clusters: freezes keep reusing limbo, so the store's clusters do not grow.
  image = await openForWrite(img);
  const run2 = Buffer.concat(Array.from({ length: 64 }, (_, i) => unique(1000 + i)));
  await image.write(3 << 20, run2);
  run2.copy(shadow, 3 << 20);
  assert.ok(dedupOf(image)!.store.stats().freezes >= 8);
  await image.close();
  st = stats(img);
  assert.equal(st.incarnations.count, 2);
  assert.equal(st['metadata-clusters'], metadataAfterRun1, 'incarnation areas come from limbo: the store does not grow');

  // 4. Small sessions that replace one cluster's content: each adds an entry and a deletion
  //    and takes at least one journal block; the 18-block journal is packed, not overflowed.
  let packs = 0;
  for (let s = 0; s < 30; s++) {
    image = await openForWrite(img);
    const data = Buffer.alloc(CS, s % 2 ? 0x71 : 0x72);
    await image.write(5 << 20, data);
    data.copy(shadow, 5 << 20);
    packs += dedupOf(image)!.store.packs;
    await image.close();
  }
  assert.ok(packs >= 1, 'the journal was packed when full (each session takes a block: 30 sessions, 18 blocks)');
  const dump = qdedup(['journal-dump', '--output', 'json', img]);
  assert.equal(dump.status, 0, dump.stderr);
  const d = JSON.parse(dump.stdout);
  const cur = d.journals.find((j: any) => j.role === 'current');
  assert.ok(cur['start-sequence'] > 0, 'the current journal was reset (packed or swapped)');
  assert.ok(cur['replay-stop'].block <= 18);
  st = stats(img);
  assert.ok(st.journal['blocks-used'] <= st.journal['blocks-total']);

  // Every byte reads back.
  const ro = await Image.open(img);
  assert.ok((await ro.read(0, size)).equals(shadow));
  await ro.close();
  assert.ok(statSync(img).size < 2 * (1 << 20), 'the file stays small');
  // Freezes, FIFO eviction, limbo reuse and packing: every store cluster is held, none leaks.
  if (!NO_QEMU) {
    const chk = qemuCheck(img);
    assert.equal(chk.status, 0, `qemu-img check: ${JSON.stringify(chk.json)} ${chk.stderr}`);
    assert.equal(chk.json?.leaks ?? 0, 0);
  }
});

// src/dedup/slot-bits.ts: an index entry read from disk is compared with the data at its
// first hit in a session (so an index that lies costs a read, never wrong data: I1); an entry
// the session wrote itself, in the log store or in an incarnation frozen since, is not.
test('entries from disk are compared once per session at their first hit; entries this session wrote never are', async () => {
  const dir = tempDir('qdedup-confirm-');
  const img = join(dir, 'confirm.qcow2');
  const c = qdedup(['create', '-q', '-o', 'dedup_order=1,dedup_max_incarnations=4,dedup_journal_block=512', img, '8M']);
  assert.equal(c.status, 0, c.stderr);
  const run = Buffer.concat(Array.from({ length: 20 }, (_, i) => unique(500 + i)));
  const recent = run.subarray(4 * CS); // 16 clusters: in the current and frozen log stores and an incarnation
  const n = recent.length / CS;

  let image = await openForWrite(img);
  await image.write(0, run);
  await image.write(1 << 20, recent);
  const first = dedupOf(image)!;
  assert.deepEqual([first.counters.hits, first.counters.compared], [n, 0], 'same session: hits without a read');
  assert.ok(first.store.stats().incarnationHits >= 1, 'some hits came from an incarnation frozen this session');
  await image.close();

  image = await openForWrite(img);
  await image.write(2 << 20, recent);
  const second = dedupOf(image)!;
  assert.deepEqual(
    [second.counters.hits, second.counters.compared, second.counters.mismatches],
    [n, n, 0],
    'next session: each entry compared at its first hit',
  );
  await image.write(3 << 20, recent);
  assert.deepEqual([second.counters.hits, second.counters.compared], [2 * n, n], 'compared once: a confirmed entry is linked without a read');
  await image.close();

  image = await Image.open(img);
  for (const at of [1 << 20, 2 << 20, 3 << 20]) assert.ok((await image.read(at, recent.length)).equals(recent), `copy at ${at}`);
  assert.ok((await image.read(0, run.length)).equals(run));
  await image.close();
  const st = stats(img);
  assert.equal(st['data-clusters'], 20, 'every copy linked');
});
