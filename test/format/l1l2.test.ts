import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  compressedClusterSpan,
  decodeL1Entry,
  decodeL2Entry,
  encodeCompressedL2Entry,
  encodeL1Entry,
  encodeL2Entry,
  l2Offsets,
} from '../../src/format/l1l2.ts';

const table = (hex: string) => Buffer.from(hex, 'hex');

test('L2 entries of every kind decode as the spec says', () => {
  assert.equal(decodeL2Entry(table('0000000000000000'), 0, 16).kind, 'unallocated');
  const zero = decodeL2Entry(table('0000000000000001'), 0, 16);
  assert.deepEqual([zero.kind, zero.hostOffset], ['zero', 0]);
  const prealloc = decodeL2Entry(table('8000000000090001'), 0, 16);
  assert.deepEqual([prealloc.kind, prealloc.hostOffset, prealloc.copied], ['zero', 0x90000, true]);
  const normal = decodeL2Entry(table('8000000000050000'), 0, 16);
  assert.deepEqual([normal.kind, normal.hostOffset, normal.copied, normal.reservedBits], ['normal', 0x50000, true, false]);
  assert.equal(decodeL2Entry(table('8000000000090002'), 0, 16).reservedBits, true);
  assert.equal(decodeL2Entry(table('0100000000090000'), 0, 16).reservedBits, true);
  // High offsets beyond 32 bits survive the hi/lo split.
  assert.equal(decodeL2Entry(table('0000123456789000'), 0, 16).hostOffset, 0x123456789000);
});

test('compressed descriptor: the example QEMU wrote at 64 KiB clusters', () => {
  // 0x40400000000501E9: bit 62, offset 0x501E9, one additional sector.
  const e = decodeL2Entry(table('40400000000501e9'), 0, 16);
  assert.equal(e.kind, 'compressed');
  assert.equal(e.compressedOffset, 0x501e9);
  assert.equal(e.compressedLength, 2 * 512 - (0x501e9 % 512));
  assert.deepEqual(compressedClusterSpan(e, 16), [5, 5]);
  const buf = Buffer.alloc(8);
  encodeCompressedL2Entry(buf, 0, 16, 0x501e9, e.compressedLength);
  assert.equal(buf.toString('hex'), '40400000000501e9');
});

test('encode/decode round trips, golden hex', () => {
  const buf = Buffer.alloc(16);
  encodeL2Entry(buf, 0, 0x1234560000, true);
  encodeL2Entry(buf, 1, 0, false, true);
  assert.equal(buf.toString('hex'), '8000001234560000' + '0000000000000001');
  encodeL1Entry(buf, 0, 0x70000, true);
  assert.equal(buf.subarray(0, 8).toString('hex'), '8000000000070000');
  assert.deepEqual(decodeL1Entry(buf, 0), { l2Offset: 0x70000, copied: true, reservedBits: false });
  buf.write('7f00000000070001', 0, 'hex');
  assert.equal(decodeL1Entry(buf, 0).reservedBits, true);
});

test('compressed descriptor past 2^53: the length comes from the exact offset bits, not the rounded offset', () => {
  // 512-byte clusters: 61 offset bits. Offset 2^60 + 5 rounds to 2^60 as a number.
  const buf = Buffer.alloc(8);
  buf.writeBigUInt64BE((1n << 62n) | (1n << 60n) | 5n, 0);
  const e = decodeL2Entry(buf, 0, 9);
  assert.equal(e.compressedOffset, 2 ** 60);
  assert.equal(e.compressedLength, 512 - 5);
});

test('l2Offsets: the offsets of used entries in order, across runs of unused ones', () => {
  const l1 = Buffer.alloc(200 * 8);
  const used = new Map([
    [0, 0x10000],
    [63, 0x20000],
    [64, 0x30000],
    [130, 0x40000],
    [199, 0x1_0000_0000],
  ]);
  for (const [i, offset] of used) encodeL1Entry(l1, i, offset, i % 2 === 0);
  assert.deepEqual(l2Offsets(l1, 200), [...used.values()]);
  assert.deepEqual(l2Offsets(l1, 64), [0x10000, 0x20000], 'only the first `entries`');
  assert.deepEqual(l2Offsets(Buffer.alloc(4096), 512), []);
  // The same as decoding every entry.
  const slow = [];
  for (let i = 0; i < 200; i++) if (decodeL1Entry(l1, i).l2Offset) slow.push(decodeL1Entry(l1, i).l2Offset);
  assert.deepEqual(l2Offsets(l1, 200), slow);
});
