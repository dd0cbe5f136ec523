import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { BatchKeys } from '../../src/dedup/batch-keys.ts';

test('BatchKeys answers as a Map keyed by the first 48 bits of the hash', () => {
  const keys = new BatchKeys(300);
  const map = new Map<number, number>();
  const hashes: Buffer[] = [];
  for (let i = 0; i < 300; i++) {
    const h = randomBytes(32);
    if (i % 3 === 1) hashes[i - 1].copy(h, 0, 0, 6); // the same key, another hash
    if (i % 7 === 2) h.writeUInt16BE(i, 4); // keys that differ only in bytes 4-5
    if (i % 11 === 5) h.fill(0, 0, 4);
    hashes.push(h);
  }
  for (const [i, h] of hashes.entries()) {
    const k = h.readUIntBE(0, 6);
    assert.equal(keys.get(h), map.get(k) ?? -1, `hash ${i}`);
    if (!map.has(k)) {
      map.set(k, i);
      keys.set(h, i);
    }
  }
  for (const h of hashes) assert.equal(keys.get(h), map.get(h.readUIntBE(0, 6)));
  assert.equal(new BatchKeys(0).get(hashes[0]), -1);
});
