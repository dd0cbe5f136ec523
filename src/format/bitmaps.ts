// Persistent dirty bitmaps: the bitmaps header extension, bitmap directory entries and
// bitmap table entries, with QEMU's limits (block/qcow2-bitmap.c). Pure.
// Spec: docs/interop/qcow2.rst "Bitmaps extension", "Bitmap directory", "Bitmap table".
// qdedup never writes bitmaps; check counts their clusters (src/image/check/bitmaps.ts).
//
// Header extension EXT_BITMAPS (24 bytes, big-endian; in force while autoclear bit 0 is set):
//    0  u32 nb_bitmaps               8  u64 bitmap_directory_size (bytes)
//    4  u32 reserved (zero)         16  u64 bitmap_directory_offset (cluster aligned)
//
// Bitmap directory entry (24 bytes, then extra data and the name, padded to 8 bytes):
//    0  u64 bitmap_table_offset     17  u8  granularity_bits (9 … 31)
//    8  u32 bitmap_table_size       18  u16 name_size (≤ 1023)
//   12  u32 flags (bits 0, 1)       20  u32 extra_data_size
//   16  u8  type (1: dirty tracking)
//
// Bitmap table entry (u64): bits 9–55 the offset of a data cluster (0: none), bit 0 "all
// ones" when there is none, every other bit reserved (BME_TABLE_ENTRY_RESERVED_MASK).

import { entryOffset } from './l1l2.ts';

/** Bitmaps extension limits (QEMU's qcow2-bitmap.c): entries, sizes, flags. */
export const QCOW2_MAX_BITMAPS = 65535;
export const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;
export const BME_MAX_TABLE_SIZE = 0x800_0000;
export const BME_MAX_PHYS_SIZE = 0x2000_0000;
export const BME_MAX_GRANULARITY_BITS = 31;
export const BME_MIN_GRANULARITY_BITS = 9;
export const BME_MAX_NAME_SIZE = 1023;
export const BME_RESERVED_FLAGS = 0xffff_fffc;
export const BT_DIRTY_TRACKING_BITMAP = 1;
/** BME_TABLE_ENTRY_RESERVED_MASK = 0xff000000000001fe, as hi and lo halves; bit 0 is "all ones". */
const BME_TABLE_ENTRY_RESERVED_HI = 0xff00_0000;
const BME_TABLE_ENTRY_RESERVED_LO = 0x1fe;
const BME_TABLE_ENTRY_FLAG_ALL_ONES = 0x1;

/** Bytes of the bitmaps header extension. */
export const BITMAPS_EXT_BYTES = 24;
/** Bytes of a directory entry before its extra data and name. */
export const BITMAP_DIR_ENTRY_FIXED_BYTES = 24;

export interface BitmapsExtension {
  count: number;
  reserved: number;
  /** u64 fields as read: the caller checks them against its limits before using them as numbers. */
  directorySize: bigint;
  directoryOffset: bigint;
}

/** Decodes the extension's data (BITMAPS_EXT_BYTES long: the caller checks the length). */
export function decodeBitmapsExtension(data: Buffer): BitmapsExtension {
  return {
    count: data.readUInt32BE(0),
    reserved: data.readUInt32BE(4),
    directorySize: data.readBigUInt64BE(8),
    directoryOffset: data.readBigUInt64BE(16),
  };
}

export interface BitmapDirectoryEntry {
  tableOffset: bigint;
  tableEntries: number;
  flags: number;
  type: number;
  granularityBits: number;
  nameSize: number;
  extraDataBytes: number;
  /** Bytes the entry takes in the directory, padding included. */
  entryBytes: number;
  /** The name (after the extra data), as far as `dir` holds it. */
  name: string;
}

/** Decodes the directory entry at `pos` (the caller checks that its fixed part lies inside `dir`). */
export function decodeBitmapDirectoryEntry(dir: Buffer, pos: number): BitmapDirectoryEntry {
  const nameSize = dir.readUInt16BE(pos + 18);
  const extraDataBytes = dir.readUInt32BE(pos + 20);
  const nameStart = pos + BITMAP_DIR_ENTRY_FIXED_BYTES + extraDataBytes;
  return {
    tableOffset: dir.readBigUInt64BE(pos),
    tableEntries: dir.readUInt32BE(pos + 8),
    flags: dir.readUInt32BE(pos + 12),
    type: dir[pos + 16],
    granularityBits: dir[pos + 17],
    nameSize,
    extraDataBytes,
    entryBytes: Math.ceil((BITMAP_DIR_ENTRY_FIXED_BYTES + nameSize + extraDataBytes) / 8) * 8,
    name: dir.subarray(nameStart, nameStart + nameSize).toString('utf8'),
  };
}

export interface BitmapTableEntry {
  /** Host offset of the data cluster (bits 9–55, exact), 0 when none. */
  offset: number;
  /** Bit 0: the bitmap's bits of this cluster are all ones (valid only without an offset). */
  allOnes: boolean;
  reservedBits: boolean;
}

/** Decodes entry `index` of a bitmap table. */
export function decodeBitmapTableEntry(table: Buffer, index: number): BitmapTableEntry {
  const hi = table.readUInt32BE(index * 8);
  const lo = table.readUInt32BE(index * 8 + 4);
  return {
    offset: entryOffset(hi, lo),
    allOnes: (lo & BME_TABLE_ENTRY_FLAG_ALL_ONES) !== 0,
    reservedBits: (hi & BME_TABLE_ENTRY_RESERVED_HI) !== 0 || (lo & BME_TABLE_ENTRY_RESERVED_LO) !== 0,
  };
}
