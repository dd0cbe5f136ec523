import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { LogStore } from '../../src/dedup/log-store.ts';
import {
  SLOT_TOMBSTONE,
  candidateBuckets,
  decodeFilter,
  decodeIncarnationSlot,
  encodeIncarnation,
  incarnationLayout,
  tagOf,
} from '../../src/format/incarnation.ts';

const h = (i: number) => createHash('sha256').update(String(i)).digest();

test('layout: filter, then the table at a cluster boundary', () => {
  assert.deepEqual(incarnationLayout(9, 4096), { slots: 2048, tableOffset: 4096, clusters: 1 + 24 });
  assert.deepEqual(incarnationLayout(2, 512), { slots: 16, tableOffset: 512, clusters: 1 + 2 });
});

test('a frozen store: every entry found through its filter tag and one slot read', () => {
  const order = 6;
  const store = new LogStore(order);
  let n = 0;
  while (n < 200 && store.put(h(n), (n + 1) * 4096, n * 512)) n++;
  store.put(h(7), 0, 7 * 512, SLOT_TOMBSTONE);
  const area = encodeIncarnation(store, 4096, order);
  const layout = incarnationLayout(order, 4096);
  const tags = decodeFilter(area, layout.slots);
  let reads = 0;
  for (let i = 0; i < n; i++) {
    const hash = h(i);
    const [b1, b2] = candidateBuckets(hash, order);
    let found: ReturnType<typeof decodeIncarnationSlot> | undefined;
    for (const b of [b1, b2]) {
      for (let s = b * 4; s < b * 4 + 4 && !found; s++) {
        if (tags[s] !== tagOf(hash)) continue;
        reads++;
        const slot = decodeIncarnationSlot(area, layout.tableOffset + s * 48);
        if (slot.hash.equals(hash)) found = slot;
      }
    }
    assert.ok(found, `entry ${i} not found`);
    assert.equal(found.tombstone, i === 7);
    if (i !== 7) assert.equal(found.hostOffset, (i + 1) * 4096);
    assert.equal(found.firstGuestOffset, i * 512);
  }
  assert.ok(reads / n < 1.02, `reads per hit ${reads / n}`);
  // Empty slots are zero in both parts.
  const empty = [...tags].indexOf(0);
  assert.ok(area.subarray(layout.tableOffset + empty * 48, layout.tableOffset + empty * 48 + 48).every((b) => b === 0));
});

test('a store of another order cannot be encoded as this order', () => {
  assert.throws(() => encodeIncarnation(new LogStore(3), 4096, 4), /store has 32 slots, order 4 gives 64/);
});
