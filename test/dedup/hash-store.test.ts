import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { HashStore } from '../../src/dedup/hash-store.ts';
import { LogStore } from '../../src/dedup/log-store.ts';
import { MemFile } from '../doubles/mem-file.ts';
import { SLOT_TOMBSTONE } from '../../src/format/incarnation.ts';
import { PIECE_SLOTS, SlotCache, slotOffset } from '../../src/dedup/slot-cache.ts';

const h = (i: number) => createHash('sha256').update(String(i)).digest();
const ORDER = 4; // 64 slots
const CLUSTER = 512;

/** Fills a log store with keys [from, to) and freezes it. */
async function freezeRange(hs: HashStore, from: number, to: number, generation: number, next: { offset: number }): Promise<void> {
  const store = new LogStore(ORDER);
  for (let i = from; i < to; i++) assert.ok(store.put(h(i), 0x100000 + i * CLUSTER, i * CLUSTER));
  await hs.freeze(store, store.count, generation, async (clusters) => {
    const offset = next.offset;
    next.offset += clusters * CLUSTER;
    return offset;
  });
}

test('hits are found youngest first with about one disk read each; misses read nothing', async () => {
  const file = new MemFile();
  const hs = new HashStore(file, ORDER, CLUSTER, 0);
  const next = { offset: 0x10000 };
  for (let g = 0; g < 6; g++) await freezeRange(hs, g * 50, g * 50 + 50, g, next);
  assert.equal(hs.incarnations.length, 6);
  assert.equal(hs.entries, 300);
  for (let i = 0; i < 300; i++) {
    const found = await hs.lookup(h(i));
    assert.ok(found && !found.tombstone, `key ${i}`);
    assert.equal(found.entry.hostOffset, 0x100000 + i * CLUSTER);
  }
  assert.ok(hs.slotReads / hs.hits <= 1.02, `reads per hit ${hs.slotReads / hs.hits}`);
  const readsBefore = hs.slotReads;
  for (let i = 1000; i < 1300; i++) assert.equal(await hs.lookup(h(i)), null);
  assert.ok(hs.slotReads - readsBefore <= 3, `misses read ${hs.slotReads - readsBefore} slots`);
  assert.equal(hs.filterRamBytes, 6 * (64 * 2 + 64 / 8), 'a 2-byte tag and a confirmed bit per slot');
  assert.equal(hs.ramBytes, hs.filterRamBytes + 6 * 64 * 48, 'and the six tables, cached when they were written');
  // Reloading from records gives the same answers.
  const again = new HashStore(file, ORDER, CLUSTER, 0);
  await again.load(
    hs.incarnations.map((i) => i.record),
    hs.limbo,
  );
  assert.equal((await again.lookup(h(123)))?.entry.firstGuestOffset, 123 * CLUSTER);
});

test('a tombstone in a younger incarnation shadows the older entry', async () => {
  const hs = new HashStore(new MemFile(), ORDER, CLUSTER, 0);
  const next = { offset: 0x10000 };
  await freezeRange(hs, 0, 10, 0, next);
  const store = new LogStore(ORDER);
  store.put(h(3), 0, 3 * CLUSTER, SLOT_TOMBSTONE);
  await hs.freeze(store, 1, 1, async () => {
    const o = next.offset;
    next.offset += 0x10000;
    return o;
  });
  assert.equal((await hs.lookup(h(4)))?.tombstone, false); // an entry first: the tombstone's fields are its own
  const tomb = await hs.lookup(h(3));
  assert.equal(tomb?.tombstone, true);
  assert.equal(tomb?.entry.hostOffset, 0);
  assert.equal(tomb?.entry.firstGuestOffset, 3 * CLUSTER);
});

test('FIFO: beyond the maximum the oldest is forgotten and its area reused from limbo', async () => {
  const hs = new HashStore(new MemFile(), ORDER, CLUSTER, 2);
  const next = { offset: 0x10000 };
  await freezeRange(hs, 0, 20, 0, next);
  await freezeRange(hs, 20, 40, 1, next);
  const firstArea = hs.incarnations[1].record.offset;
  await freezeRange(hs, 40, 60, 2, next);
  assert.equal(hs.incarnations.length, 2);
  assert.deepEqual(
    hs.limbo.map((l) => l.offset),
    [firstArea],
  );
  assert.equal(await hs.lookup(h(5)), null); // forgotten: only the ratio drops
  assert.ok(await hs.lookup(h(45)));
  const allocatedBefore = next.offset;
  await freezeRange(hs, 60, 80, 3, next);
  assert.equal(next.offset, allocatedBefore, 'the fourth incarnation reused the limbo area');
  assert.equal(hs.incarnations[0].record.offset, firstArea);
  assert.equal(hs.limbo.length, 1);
  assert.equal(hs.areas().length, 3);
  // The reused area's cached slots are the new incarnation's, not the forgotten one's.
  for (let i = 60; i < 80; i++) assert.equal((await hs.lookup(h(i)))?.entry.hostOffset, 0x100000 + i * CLUSTER, `key ${i}`);
  for (let i = 20; i < 40; i++) assert.equal(await hs.lookup(h(i)), null, `key ${i} was forgotten`);
});

test('slot cache: bounded, filled by freezes and by reads, never stale after an area is reused', async () => {
  const file = new MemFile();
  const PIECE = PIECE_SLOTS * 48;
  const cache = new SlotCache(5 * PIECE);
  let reads = 0;
  const read = (offset: number, length: number) => {
    reads++;
    return file.readSync(offset, length);
  };
  const SLOTS = 100; // two pieces: 85 + 15 slots
  const table = (fill: number) => Buffer.alloc(SLOTS * 48, fill);
  const at = (i: number) => 0x10000 * (i + 1);
  cache.fill(at(0), table(1));
  assert.equal(cache.ramBytes, SLOTS * 48);
  assert.equal(cache.piece(at(0), SLOTS, 99, read)[slotOffset(99)], 1);
  assert.equal(reads, 0, 'a table just written is cached');
  // More tables push the least recently used pieces out: the bound holds.
  for (let i = 1; i < 5; i++) cache.fill(at(i), table(2));
  assert.ok(cache.ramBytes <= 5 * PIECE, `${cache.ramBytes} bytes cached`);
  await file.write(at(0), table(7));
  assert.equal(cache.piece(at(0), SLOTS, 0, read)[slotOffset(0)], 7, 'read from the file once evicted');
  assert.equal(reads, 1);
  assert.equal(cache.piece(at(0), SLOTS, 84, read)[slotOffset(84)], 7, 'the same piece: no second read');
  assert.equal(cache.piece(at(0), SLOTS, 85, read).length, 15 * 48, 'the short last piece');
  assert.equal(slotOffset(85), 0, 'slot 85 starts the second piece');
  assert.equal(reads, 2);
  // The area reused by another table: filling replaces what was cached there.
  cache.fill(at(0), table(3));
  for (const slot of [0, 50, 99]) assert.equal(cache.piece(at(0), SLOTS, slot, read)[slotOffset(slot)], 3);
  for (let i = 0; i < 5; i++) cache.forget(at(i), SLOTS);
  assert.equal(cache.ramBytes, 0);
  // A table larger than a quarter of the cache is not filled at freeze: read on demand.
  cache.fill(at(9), Buffer.alloc(2 * PIECE, 4));
  assert.equal(cache.ramBytes, 0);
});

test('slot cache: least recently used out; a hit makes its piece the newest; the bound holds over many rounds', () => {
  const PIECE = PIECE_SLOTS * 48;
  const cache = new SlotCache(3 * PIECE);
  const reads: number[] = [];
  const read = (offset: number, length: number) => {
    reads.push(offset);
    return Buffer.alloc(length, offset / 0x10000);
  };
  const at = (i: number) => 0x10000 * (i + 1);
  const get = (i: number) => cache.piece(at(i), PIECE_SLOTS, 0, read)[0];
  for (const i of [0, 1, 2]) assert.equal(get(i), i + 1); // three reads, the cache full
  assert.equal(get(0), 1); // a hit: 0 becomes the newest, 1 the oldest
  assert.equal(reads.length, 3);
  get(3); // pushes out 1, the least recently used
  assert.equal(cache.ramBytes, 3 * PIECE);
  get(0);
  get(2);
  assert.equal(reads.length, 4, '0 and 2 stayed');
  get(1);
  assert.equal(reads.length, 5, '1 was pushed out');
  // Over many rounds the bound holds and every piece read is the one asked for.
  for (let round = 0; round < 50; round++) {
    const i = (round * 7) % 11;
    assert.equal(get(i), i + 1);
    assert.ok(cache.ramBytes <= 3 * PIECE);
  }
  for (let i = 0; i < 11; i++) cache.forget(at(i), PIECE_SLOTS);
  assert.equal(cache.ramBytes, 0);
});

test("the filters kept bucket by bucket give every incarnation's tags as its area on disk has them, through freezes, forgetting and reloading", async () => {
  const file = new MemFile();
  const hs = new HashStore(file, ORDER, CLUSTER, 3); // at most 3: older ones are forgotten
  const next = { offset: 0x10000 };
  const onDisk = async (k: number) => {
    const tags = await file.read(hs.incarnations[k].record.offset, 64 * 2);
    return Array.from({ length: 64 }, (_, s) => tags.readUInt16BE(s * 2));
  };
  const check = async (store: HashStore, label: string) => {
    for (let k = 0; k < store.incarnations.length; k++) {
      const want = await onDisk(k);
      assert.ok(
        want.some((t) => t !== 0),
        `${label}: incarnation ${k} has tags`,
      );
      assert.deepEqual(
        Array.from({ length: 64 }, (_, s) => store.tagAt(k, s)),
        want,
        `${label}: incarnation ${k}`,
      );
    }
  };
  for (let g = 0; g < 5; g++) {
    await freezeRange(hs, g * 40, g * 40 + 40, g, next);
    assert.equal(hs.incarnations.length, Math.min(g + 1, 3));
    await check(hs, `after freeze ${g}`);
  }
  // The three youngest answer, the forgotten ones do not.
  for (let i = 80; i < 200; i++) assert.equal((await hs.lookup(h(i)))?.entry.hostOffset, 0x100000 + i * CLUSTER, `key ${i}`);
  for (let i = 0; i < 80; i++) assert.equal(await hs.lookup(h(i)), null, `forgotten key ${i}`);
  const again = new HashStore(file, ORDER, CLUSTER, 3);
  await again.load(
    hs.incarnations.map((i) => i.record),
    hs.limbo,
  );
  await check(again, 'reloaded');
  for (let i = 80; i < 200; i++) assert.ok(await again.lookup(h(i)), `reloaded key ${i}`);
});
