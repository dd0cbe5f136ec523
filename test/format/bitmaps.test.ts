// Persistent bitmaps (src/format/bitmaps.ts): the header extension, a directory entry (name
// after the extra data, padding to 8 bytes) and table entries (offset, "all ones", reserved bits).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BITMAPS_EXT_BYTES,
  BITMAP_DIR_ENTRY_FIXED_BYTES,
  decodeBitmapDirectoryEntry,
  decodeBitmapTableEntry,
  decodeBitmapsExtension,
} from '../../src/format/bitmaps.ts';

test('bitmaps extension: count, reserved field, directory size and offset', () => {
  const data = Buffer.alloc(BITMAPS_EXT_BYTES);
  data.writeUInt32BE(2, 0);
  data.writeUInt32BE(7, 4);
  data.writeBigUInt64BE(96n, 8);
  data.writeBigUInt64BE(0x30000n, 16);
  assert.deepEqual(decodeBitmapsExtension(data), { count: 2, reserved: 7, directorySize: 96n, directoryOffset: 0x30000n });
});

test('directory entry: fields, name after the extra data, padded length', () => {
  const name = Buffer.from('b0');
  const extra = 4;
  const dir = Buffer.alloc(40);
  dir.writeBigUInt64BE(0x40000n, 0);
  dir.writeUInt32BE(1, 8);
  dir.writeUInt32BE(2, 12); // auto
  dir[16] = 1;
  dir[17] = 16;
  dir.writeUInt16BE(name.length, 18);
  dir.writeUInt32BE(extra, 20);
  name.copy(dir, BITMAP_DIR_ENTRY_FIXED_BYTES + extra);
  assert.deepEqual(decodeBitmapDirectoryEntry(dir, 0), {
    tableOffset: 0x40000n,
    tableEntries: 1,
    flags: 2,
    type: 1,
    granularityBits: 16,
    nameSize: 2,
    extraDataBytes: 4,
    entryBytes: 32, // 24 + 2 + 4 = 30, padded to 32
    name: 'b0',
  });
});

test('table entries: offset bits 9–55, bit 0 "all ones", reserved bits', () => {
  const table = Buffer.alloc(32);
  table.writeBigUInt64BE(0x0000_0001_0005_0000n, 0);
  table.writeBigUInt64BE(1n, 8);
  table.writeBigUInt64BE(0x0100_0000_0000_0000n, 16); // bit 56: reserved
  table.writeBigUInt64BE(0x2n, 24); // bit 1: reserved
  assert.deepEqual(decodeBitmapTableEntry(table, 0), { offset: 0x1_0005_0000, allOnes: false, reservedBits: false });
  assert.deepEqual(decodeBitmapTableEntry(table, 1), { offset: 0, allOnes: true, reservedBits: false });
  assert.equal(decodeBitmapTableEntry(table, 2).reservedBits, true);
  assert.equal(decodeBitmapTableEntry(table, 3).reservedBits, true);
});
