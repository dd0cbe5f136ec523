// Persistent bitmaps in the check (qcow2_check_bitmaps_refcounts): validates the bitmaps
// extension as QEMU does at open, then counts the bitmap directory, each bitmap table and
// its data clusters. The on-disk layout is decoded by ../../format/bitmaps.ts.

import { AUTOCLEAR_BITMAPS, EXT_BITMAPS } from '../../format/header.ts';
import {
  BITMAPS_EXT_BYTES,
  BITMAP_DIR_ENTRY_FIXED_BYTES,
  BME_MAX_GRANULARITY_BITS,
  BME_MAX_NAME_SIZE,
  BME_MAX_PHYS_SIZE,
  BME_MAX_TABLE_SIZE,
  BME_MIN_GRANULARITY_BITS,
  BME_RESERVED_FLAGS,
  BT_DIRTY_TRACKING_BITMAP,
  QCOW2_MAX_BITMAPS,
  QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
  decodeBitmapDirectoryEntry,
  decodeBitmapTableEntry,
  decodeBitmapsExtension,
} from '../../format/bitmaps.ts';
import type { CheckRun } from './run.ts';
import { CheckAborted, entryHex } from './types.ts';

/** Bitmap table entries read at a time. */
const CHUNK_ENTRIES = 128 * 1024;

/** The bitmaps extension in force (autoclear bit 0 set), validated as QEMU does at open; null when none. */
function bitmapsExtension(run: CheckRun): { count: number; directorySize: number; directoryOffset: number } | null {
  const h = run.header;
  if (!(h.autoclearFeatures & AUTOCLEAR_BITMAPS)) return null;
  const ext = h.extensions.find((e) => e.type === EXT_BITMAPS);
  if (!ext) return null;
  const invalid = (why: string): never => {
    run.emit(`ERROR bitmaps_ext: ${why}`);
    run.res.checkErrors++;
    throw new CheckAborted('Invalid argument');
  };
  if (ext.data.length !== BITMAPS_EXT_BYTES) invalid('Invalid extension length');
  const { count, reserved, directorySize, directoryOffset } = decodeBitmapsExtension(ext.data);
  if (reserved !== 0) invalid('Reserved field is not zero');
  if (count > QCOW2_MAX_BITMAPS) invalid(`${count} bitmaps, exceeding the supported maximum of ${QCOW2_MAX_BITMAPS}`);
  if (count === 0) invalid('found bitmaps extension with zero bitmaps');
  if (directoryOffset % BigInt(run.clusterSize) !== 0n || directoryOffset >= 1n << 53n) invalid('invalid bitmap directory offset');
  if (directorySize > BigInt(QCOW2_MAX_BITMAP_DIRECTORY_SIZE)) {
    invalid(`bitmap directory size (${directorySize}) exceeds the maximum supported size (${QCOW2_MAX_BITMAP_DIRECTORY_SIZE})`);
  }
  return { count, directorySize: Number(directorySize), directoryOffset: Number(directoryOffset) };
}

/**
 * Counts the bitmap directory, each bitmap table and its data clusters. A directory or
 * table QEMU cannot load is a corruption that ends the check.
 */
export async function checkBitmaps(run: CheckRun): Promise<void> {
  const ext = bitmapsExtension(run);
  if (!ext) return;
  const cs = run.clusterSize;
  run.addReferences(ext.directoryOffset, ext.directorySize);
  const broken = (why: string): never => {
    run.emit(`ERROR bitmap directory: ${why}`);
    run.res.corruptions++;
    throw new CheckAborted('Invalid argument');
  };
  if (ext.directorySize === 0) broken('Requested bitmap directory size is zero');
  const dir = await run.readClipped(ext.directoryOffset, ext.directorySize);
  const diskBytes = BigInt(Math.floor(run.header.size / 512) * 512);
  const tables: { offset: number; entries: number }[] = [];
  let pos = 0;
  while (pos < dir.length) {
    if (pos + BITMAP_DIR_ENTRY_FIXED_BYTES > dir.length) broken('Broken bitmap directory');
    if (tables.length + 1 > ext.count) broken('More bitmaps found than specified in header extension');
    const e = decodeBitmapDirectoryEntry(dir, pos);
    if (pos + e.entryBytes > dir.length) broken('Broken bitmap directory');
    if (e.extraDataBytes !== 0) broken('Bitmap extra data is not supported');
    const physBytes = BigInt(e.tableEntries) * BigInt(cs);
    const bad =
      e.tableEntries === 0 ||
      e.tableOffset === 0n ||
      e.tableOffset % BigInt(cs) !== 0n ||
      e.tableOffset >= 1n << 53n ||
      e.tableEntries > BME_MAX_TABLE_SIZE ||
      e.granularityBits > BME_MAX_GRANULARITY_BITS ||
      e.granularityBits < BME_MIN_GRANULARITY_BITS ||
      (e.flags & BME_RESERVED_FLAGS) !== 0 ||
      e.nameSize > BME_MAX_NAME_SIZE ||
      e.type !== BT_DIRTY_TRACKING_BITMAP ||
      physBytes > BigInt(BME_MAX_PHYS_SIZE) ||
      diskBytes > (physBytes * 8n) << BigInt(e.granularityBits);
    if (bad) broken(`Bitmap '${e.name}' doesn't satisfy the constraints`);
    tables.push({ offset: Number(e.tableOffset), entries: e.tableEntries });
    pos += e.entryBytes;
  }
  if (tables.length !== ext.count) broken('Less bitmaps found than specified in header extension');

  for (const t of tables) {
    run.addReferences(t.offset, t.entries * 8);
    // QEMU loads and validates the whole table before counting its clusters.
    for (let pass = 0; pass < 2; pass++) {
      for (let first = 0; first < t.entries; first += CHUNK_ENTRIES) {
        const n = Math.min(CHUNK_ENTRIES, t.entries - first);
        const chunk = await run.readClipped(t.offset + first * 8, n * 8);
        for (let i = 0; i < n; i++) {
          const e = decodeBitmapTableEntry(chunk, i);
          if (pass === 0) {
            if (e.reservedBits || (e.offset !== 0 && (e.allOnes || e.offset % cs !== 0))) {
              run.emit(`ERROR bitmap table at 0x${t.offset.toString(16)}: invalid entry ${first + i}: ${entryHex(chunk, i)}`);
              run.res.corruptions++;
              throw new CheckAborted('Invalid argument');
            }
          } else if (e.offset !== 0) {
            run.addReferences(e.offset, cs);
          }
        }
      }
    }
  }
}
