import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decodeReftableEntry, getRefcount, maxRefcount, refblockEntries, setRefcount } from '../../src/format/refcount.ts';

test('sub-byte widths pack from the least significant bit (bytes QEMU wrote)', () => {
  // six clusters with refcount 1, as observed in fresh qemu-img images
  const expected: Record<number, string> = { 0: '3f', 1: '5505', 2: '111111', 3: '010101010101' };
  for (const [order, hex] of Object.entries(expected)) {
    const block = Buffer.alloc(8);
    for (let i = 0; i < 6; i++) setRefcount(block, i, Number(order), 1);
    assert.equal(block.subarray(0, hex.length / 2).toString('hex'), hex, `order ${order}`);
    for (let i = 0; i < 6; i++) assert.equal(getRefcount(block, i, Number(order)), 1);
    assert.equal(getRefcount(block, 6, Number(order)), 0);
  }
});

test('every width round trips its maximum and neighbours stay intact', () => {
  for (let order = 0; order <= 6; order++) {
    const block = Buffer.alloc(64);
    const max = maxRefcount(order);
    setRefcount(block, 3, order, max);
    setRefcount(block, 4, order, 1);
    assert.equal(getRefcount(block, 3, order), max);
    assert.equal(getRefcount(block, 4, order), 1);
    assert.equal(getRefcount(block, 2, order), 0);
    setRefcount(block, 3, order, 0);
    assert.equal(getRefcount(block, 3, order), 0);
    assert.equal(getRefcount(block, 4, order), 1);
  }
  assert.equal(getRefcount(Buffer.from('0002', 'hex'), 0, 4), 2); // 16-bit big-endian
  assert.equal(refblockEntries(16, 4), 32768);
  assert.equal(refblockEntries(9, 0), 4096);
});

test('refcount table entries: offset mask, reserved bits, halves kept for offsets past 2^53', () => {
  const table = Buffer.alloc(24);
  table.writeBigUInt64BE(0x5_0000_0000n, 0);
  table.writeBigUInt64BE(0x30001n, 8); // reserved bit 0
  table.writeBigUInt64BE(0xffff_ffff_ffff_fe00n, 16);
  assert.deepEqual(decodeReftableEntry(table, 0), { offset: 0x5_0000_0000, hi: 5, lo: 0, reservedBits: false });
  assert.deepEqual(decodeReftableEntry(table, 1), { offset: 0x30000, hi: 0, lo: 0x30000, reservedBits: true });
  const far = decodeReftableEntry(table, 2);
  assert.deepEqual([far.hi, far.lo, far.reservedBits], [0xffff_ffff, 0xffff_fe00, false]);
});
