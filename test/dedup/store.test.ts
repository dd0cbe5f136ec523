import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { DedupStore, type StoreGeometry } from '../../src/dedup/store.ts';
import { MemFile } from '../doubles/mem-file.ts';

const h = (i: number) => createHash('sha256').update(`k${i}`).digest();
const G: StoreGeometry = { order: 3, clusterSize: 512, journalBlockSize: 512, maxIncarnations: 0 }; // 32 slots a log store

function allocator() {
  let next = 0x100000;
  return async (clusters: number) => {
    const o = next;
    next += clusters * 512;
    return o;
  };
}

test('inserts across many freezes stay findable; the store reopens from its configuration', async () => {
  const file = new MemFile();
  const allocate = allocator();
  const store = await DedupStore.create(file, G, allocate);
  for (let i = 0; i < 300; i++) await store.insert(h(i), 0x1000 * (i + 1), 512 * i, allocate);
  await store.flush(allocate);
  const st = store.stats();
  assert.ok(st.freezes >= 5, `freezes ${st.freezes}`);
  assert.equal(st.indexEntries, 300);
  for (let i = 0; i < 300; i++) assert.equal((await store.lookup(h(i)))?.hostOffset, 0x1000 * (i + 1), `key ${i}`);
  assert.equal(await store.lookup(h(999)), null);

  const reopened = await DedupStore.open(file, G, store.config());
  assert.equal(reopened.stats().indexEntries, 300);
  for (let i = 0; i < 300; i += 7) assert.equal((await reopened.lookup(h(i)))?.firstGuestOffset, 512 * i);
  assert.ok(reopened.stats().incarnationReads / Math.max(1, reopened.stats().incarnationHits) <= 1.02);
});

test('deletions shadow entries in incarnations, also after reopening', async () => {
  const file = new MemFile();
  const allocate = allocator();
  const store = await DedupStore.create(file, G, allocate);
  for (let i = 0; i < 100; i++) await store.insert(h(i), 0x1000 * (i + 1), 0, allocate);
  await store.remove(h(3), allocate); // h(3) lives in an incarnation by now
  await store.remove(h(99), allocate); // h(99) in the current log store
  assert.equal(await store.lookup(h(3)), null);
  assert.equal(await store.lookup(h(99)), null);
  await store.flush(allocate);
  const reopened = await DedupStore.open(file, G, store.config());
  assert.equal(await reopened.lookup(h(3)), null);
  assert.equal(await reopened.lookup(h(99)), null);
  assert.ok(await reopened.lookup(h(4)));
});

test('a journal full of replacements is packed, not frozen', async () => {
  const file = new MemFile();
  const allocate = allocator();
  const store = await DedupStore.create(file, G, allocate);
  for (let round = 0; round < 60; round++) {
    for (let i = 0; i < 5; i++) await store.insert(h(i), 0x1000 * (round + 1), 0, allocate);
  }
  assert.ok(store.stats().packs >= 1);
  assert.equal(store.stats().freezes, 0);
  await store.flush(allocate);
  const reopened = await DedupStore.open(file, G, store.config());
  assert.equal((await reopened.lookup(h(2)))?.hostOffset, 0x1000 * 60);
});

test('with at most 2 incarnations the oldest are forgotten and their space reused', async () => {
  const file = new MemFile();
  const allocate = allocator();
  const store = await DedupStore.create(file, { ...G, maxIncarnations: 2 }, allocate);
  for (let i = 0; i < 200; i++) await store.insert(h(i), 0x1000 * (i + 1), 0, allocate);
  await store.flush(allocate);
  const st = store.stats();
  assert.equal(st.incarnations.count, 2);
  assert.equal(st.limbo, 1);
  assert.equal(await store.lookup(h(0)), null); // forgotten
  assert.ok(await store.lookup(h(199)));
});

test('hashes inside a larger buffer (bytes, at): insert and find agree with lookup of a copy, in every place an entry lives', async () => {
  // The write path passes a digest buffer and an offset (src/dedup/batch-lookups.ts), never a view.
  const file = new MemFile();
  const allocate = allocator();
  const store = await DedupStore.create(file, G, allocate);
  const n = 120; // several freezes: incarnations, the frozen and the current log store
  const digest = Buffer.alloc(7 + n * 32); // hashes at odd offsets
  for (let i = 0; i < n; i++) h(i).copy(digest, 7 + i * 32);
  for (let i = 0; i < n; i++) await store.insert(digest, 0x1000 * (i + 1), 512 * i, allocate, 7 + i * 32);
  await store.remove(h(5), allocate); // a tombstone in the current log store over an incarnation's entry
  for (let i = 0; i < n; i++) {
    const found = store.find(digest, 7 + i * 32);
    const looked = store.lookup(h(i));
    if (i === 5) {
      assert.equal(found, false);
      assert.equal(looked, null);
      continue;
    }
    assert.equal(found, true, `key ${i}`);
    assert.equal(store.found.hostOffset, 0x1000 * (i + 1));
    assert.equal(store.found.firstGuestOffset, 512 * i);
    const { hash, ...entry } = looked!;
    assert.deepEqual(entry, { ...store.found });
    assert.deepEqual(hash, h(i));
  }
  assert.equal(store.find(Buffer.concat([Buffer.alloc(3), h(n + 1)]), 3), false);
  // The journal holds the hashes, not the buffer they came from.
  digest.fill(0);
  await store.flush(allocate);
  const reopened = await DedupStore.open(file, G, store.config());
  for (let i = 0; i < n; i += 11) if (i !== 5) assert.equal(reopened.lookup(h(i))?.hostOffset, 0x1000 * (i + 1), `reopened key ${i}`);
});
