// Internal snapshot table entries. Pure. Spec: docs/interop/qcow2.rst "Snapshots".
// qdedup reads snapshots (for check, refcount rebuild and info) and creates one: the dedup
// holder (src/dedup/holder.ts).

import { CorruptImageError, hex } from '../errors.ts';
import { readU64, writeU64 } from './bytes.ts';

/** QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA. */
export const MAX_SNAPSHOT_EXTRA = 1024;
/** Fixed part of an entry, before extra data, ID and name. */
export const SNAPSHOT_FIXED_BYTES = 40;

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
  /** Offset of this entry in the file (inside the snapshot table). */
  tableOffset: number;
  /** Bytes the entry takes in the table, padding included. */
  byteLength: number;
}

/**
 * Decodes the entry at `pos` in `buf`. Returns the entry and its padded length, or null
 * when `buf` does not yet hold the whole entry (the caller reads more and retries).
 * Throws CorruptImageError for lengths beyond QEMU's limits.
 */
export function decodeSnapshotEntry(buf: Buffer, pos: number, tableOffset: number): { entry: SnapshotEntry; length: number } | null {
  if (pos + SNAPSHOT_FIXED_BYTES > buf.length) return null;
  const idLen = buf.readUInt16BE(pos + 12);
  const nameLen = buf.readUInt16BE(pos + 14);
  const extra = buf.readUInt32BE(pos + 36);
  if (extra > MAX_SNAPSHOT_EXTRA) throw new CorruptImageError(`snapshot entry at ${hex(tableOffset + pos)}: extra data too large (${extra} bytes)`, { offset: tableOffset + pos + 36, structure: 'snapshot table' });
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
  const extra = 16;
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
