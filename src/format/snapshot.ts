// Internal snapshot table entries. Pure. Spec: docs/interop/qcow2.rst "Snapshots".
// qdedup reads snapshots (for check, refcount rebuild and info: src/image/snapshot-table.ts
// walks the table) and creates one: the dedup holder (src/dedup/holder.ts).
//
// One entry (big-endian), padded to a multiple of 8 bytes:
//    0  u64 l1_table_offset          24  u64 vm_clock_nsec
//    8  u32 l1_size                  32  u32 vm_state_size (v2; v3: the u64 of the extra data)
//   12  u16 id_str_size              36  u32 extra_data_size (≤ MAX_SNAPSHOT_EXTRA)
//   14  u16 name_size                40  extra data: u64 vm_state_size, u64 disk_size (v3 needs
//   16  u32 date_sec                     these 16 bytes), u64 icount, …
//   20  u32 date_nsec                    then the id string, then the name (no terminators)

import { CorruptImageError, hex } from '../errors.ts';
import { readU64, writeU64 } from './bytes.ts';

/** QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA. */
export const MAX_SNAPSHOT_EXTRA = 1024;
/** Fixed part of an entry, before extra data, ID and name. */
export const SNAPSHOT_FIXED_BYTES = 40;
/** Extra data a version 3 entry must have: the u64 VM state size and the u64 disk size. */
export const SNAPSHOT_V3_EXTRA_BYTES = 16;
/** QEMU's QCOW_MAX_SNAPSHOTS_SIZE: the snapshot table may not be larger (64 MiB). */
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;

/** An entry's extra data exceeds MAX_SNAPSHOT_EXTRA (check words this one its own way). */
export class SnapshotExtraDataError extends CorruptImageError {}

export interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  /** Bytes of saved VM state: the u64 in extra data (v3), else the u32 of the fixed part. */
  vmStateSize: bigint;
  /** Instruction count (extra data bytes 16–23), when the extra data holds it; 2^64-1 means none. */
  icount?: bigint;
  /** Bytes of extra data (a v3 entry needs SNAPSHOT_V3_EXTRA_BYTES). */
  extraDataBytes: number;
  /** Offset of this entry in the file (inside the snapshot table). */
  tableOffset: number;
  /** Bytes the entry takes in the table, padding included. */
  byteLength: number;
}

/**
 * Decodes the entry at `pos` in `buf`. Returns the entry and its padded length, or null
 * when `buf` does not yet hold the whole entry (the caller reads more and retries).
 * Throws SnapshotExtraDataError (a CorruptImageError) for extra data beyond QEMU's limit,
 * UnsupportedError for an L1 table offset past 2^53.
 */
export function decodeSnapshotEntry(buf: Buffer, pos: number, tableOffset: number): { entry: SnapshotEntry; length: number } | null {
  if (pos + SNAPSHOT_FIXED_BYTES > buf.length) return null;
  const idLen = buf.readUInt16BE(pos + 12);
  const nameLen = buf.readUInt16BE(pos + 14);
  const extra = buf.readUInt32BE(pos + 36);
  if (extra > MAX_SNAPSHOT_EXTRA)
    throw new SnapshotExtraDataError(`snapshot entry at ${hex(tableOffset + pos)}: extra data too large (${extra} bytes)`, {
      offset: tableOffset + pos + 36,
      structure: 'snapshot table',
    });
  const length = Math.ceil((SNAPSHOT_FIXED_BYTES + extra + idLen + nameLen) / 8) * 8;
  if (pos + SNAPSHOT_FIXED_BYTES + extra + idLen + nameLen > buf.length) return null;
  const idStart = pos + SNAPSHOT_FIXED_BYTES + extra;
  // As QEMU's qcow2_read_snapshots: the known extra fields are read when the extra data is long enough.
  const vmStateSize = extra >= 8 ? buf.readBigUInt64BE(pos + 40) : BigInt(buf.readUInt32BE(pos + 32));
  const icount = extra >= 24 ? buf.readBigUInt64BE(pos + 56) : undefined;
  return {
    entry: {
      l1TableOffset: readU64(buf, pos, 'snapshot L1 table offset'),
      l1Size: buf.readUInt32BE(pos + 8),
      dateSec: buf.readUInt32BE(pos + 16),
      dateNsec: buf.readUInt32BE(pos + 20),
      vmClockNsec: buf.readBigUInt64BE(pos + 24),
      vmStateSize,
      ...(icount === undefined ? {} : { icount }),
      extraDataBytes: extra,
      id: buf.subarray(idStart, idStart + idLen).toString('utf8'),
      name: buf.subarray(idStart + idLen, idStart + idLen + nameLen).toString('utf8'),
      tableOffset: tableOffset + pos,
      byteLength: length,
    },
    length,
  };
}

/** What a new entry needs: the identifying fields, and the virtual disk size it describes (v3 extra data, bytes 8–15). */
export type NewSnapshot = Pick<SnapshotEntry, 'l1TableOffset' | 'l1Size' | 'id' | 'name' | 'dateSec' | 'dateNsec'> & { diskSize: number };

/**
 * Encodes one snapshot table entry with the 16 bytes of extra data version 3 requires
 * (u64 VM state size = 0, u64 disk size), padded to a multiple of 8.
 */
export function encodeSnapshotEntry(s: NewSnapshot): Buffer {
  const id = Buffer.from(s.id, 'utf8');
  const name = Buffer.from(s.name, 'utf8');
  const extra = SNAPSHOT_V3_EXTRA_BYTES;
  const buf = Buffer.alloc(Math.ceil((SNAPSHOT_FIXED_BYTES + extra + id.length + name.length) / 8) * 8);
  writeU64(buf, 0, s.l1TableOffset);
  buf.writeUInt32BE(s.l1Size, 8);
  buf.writeUInt16BE(id.length, 12);
  buf.writeUInt16BE(name.length, 14);
  buf.writeUInt32BE(s.dateSec, 16);
  buf.writeUInt32BE(s.dateNsec, 20);
  buf.writeUInt32BE(extra, 36);
  writeU64(buf, SNAPSHOT_FIXED_BYTES + 8, s.diskSize);
  id.copy(buf, SNAPSHOT_FIXED_BYTES + extra);
  name.copy(buf, SNAPSHOT_FIXED_BYTES + extra + id.length);
  return buf;
}
