import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { LogStore } from '../../src/dedup/log-store.ts';
import { BUCKET_SLOTS, SLOT_TOMBSTONE, SLOT_USED, candidateBuckets, tagOf } from '../../src/format/incarnation.ts';

const h = (i: number) => createHash('sha256').update(String(i)).digest();

test('candidate buckets come from bytes 0-7 and differ; tags are never 0', () => {
  const hash = Buffer.from('0000000500000005' + '0000' + '00'.repeat(22), 'hex');
  assert.deepEqual(candidateBuckets(hash, 4), [5, 4]);
  assert.equal(tagOf(hash), 1);
  assert.equal(tagOf(Buffer.from('00'.repeat(8) + 'abcd' + '00'.repeat(22), 'hex')), 0xabcd);
});

test('inserts until full, every entry found, occupancy above 90%', () => {
  const store = new LogStore(8);
  let n = 0;
  // Every third entry confirmed: the confirmed bit must move with its entry through the kicks.
  while (store.put(h(n), (n + 1) * 4096, n * 4096, SLOT_USED, n % 3 === 0)) n++;
  assert.equal(store.count, n);
  assert.ok(n / store.slots > 0.9, `occupancy ${n / store.slots}`);
  for (let i = 0; i < n; i++) {
    const slot = store.find(h(i));
    assert.ok(slot >= 0, `entry ${i} lost`);
    assert.equal(store.hostOffsets[slot], (i + 1) * 4096);
    assert.equal(store.guestOffsets[slot], i * 4096);
    assert.equal(store.confirmed.get(slot), i % 3 === 0, `entry ${i}: confirmed bit`);
  }
  // A failed insert leaves the table unchanged.
  assert.equal(store.find(h(n)), -1);
  assert.equal(store.slots, 256 * BUCKET_SLOTS);
});

test('replace, tombstone and remove', () => {
  const store = new LogStore(3);
  assert.ok(store.put(h(1), 4096, 0));
  assert.ok(store.put(h(1), 8192, 512));
  assert.equal(store.count, 1);
  assert.equal(store.hostOffsets[store.find(h(1))], 8192);
  assert.ok(store.put(h(1), 0, 0, SLOT_TOMBSTONE));
  assert.equal(store.states[store.find(h(1))], SLOT_TOMBSTONE);
  assert.ok(store.put(h(2), 4096, 0, SLOT_USED));
  assert.ok(store.remove(h(2)));
  assert.equal(store.find(h(2)), -1);
  assert.equal(store.count, 1);
  store.clear();
  assert.equal(store.count, 0);
  assert.equal(store.find(h(1)), -1);
});
