// L1 and L2 table entries (standard 64-bit entries). Pure.
// Spec: docs/interop/qcow2.rst "Cluster mapping". Entries are read as two u32 halves so
// the hot path never touches BigInt; only compressed descriptors (bit 62) use BigInt.

import { TWO_32, isZero } from './bytes.ts';

/** Bit 63 of L1 and L2 entries: the cluster's refcount is exactly 1. */
export const QCOW_OFLAG_COPIED_HI = 0x8000_0000;
/** Bit 62 of L2 entries: compressed cluster descriptor. */
export const QCOW_OFLAG_COMPRESSED_HI = 0x4000_0000;
/** Bit 0 of standard L2 entries (v3): the cluster reads as zeros. */
export const QCOW_OFLAG_ZERO = 0x1;
/** L1E_OFFSET_MASK / L2E_OFFSET_MASK = 0x00fffffffffffe00, as hi and lo halves. */
export const OFFSET_MASK_HI = 0x00ff_ffff;
export const OFFSET_MASK_LO = 0xffff_fe00;
/** L1E_RESERVED_MASK = 0x7f000000000001ff. */
export const L1E_RESERVED_HI = 0x7f00_0000;
export const L1E_RESERVED_LO = 0x1ff;
/** L2E_STD_RESERVED_MASK = 0x3f000000000001fe. */
export const L2E_STD_RESERVED_HI = 0x3f00_0000;
export const L2E_STD_RESERVED_LO = 0x1fe;

/** The host offset bits 9–55 of an entry given as u32 halves (L1E/L2E_OFFSET_MASK; bitmap tables use the same bits). */
export function entryOffset(hi: number, lo: number): number {
  return (hi & OFFSET_MASK_HI) * TWO_32 + ((lo & OFFSET_MASK_LO) >>> 0);
}

export interface L1Entry {
  /** Host offset of the L2 table, 0 if none. */
  l2Offset: number;
  copied: boolean;
  reservedBits: boolean;
}

export function decodeL1Entry(table: Buffer, index: number): L1Entry {
  const hi = table.readUInt32BE(index * 8);
  const lo = table.readUInt32BE(index * 8 + 4);
  return {
    l2Offset: entryOffset(hi, lo),
    copied: (hi & QCOW_OFLAG_COPIED_HI) !== 0,
    reservedBits: (hi & L1E_RESERVED_HI) !== 0 || (lo & L1E_RESERVED_LO) !== 0,
  };
}

/**
 * The L2 table offsets of the first `entries` entries of an L1 table, in table order, unused
 * entries left out. Unused (zero) entries, most of a large or sparse L1, are passed over 64
 * at a time by a native compare instead of decoded one by one.
 */
export function l2Offsets(table: Buffer, entries: number): number[] {
  const out: number[] = [];
  for (let from = 0; from < entries; from += 64) {
    const to = Math.min(entries, from + 64);
    if (isZero(table.subarray(from * 8, to * 8))) continue;
    for (let i = from; i < to; i++) {
      const offset = decodeL1Entry(table, i).l2Offset;
      if (offset) out.push(offset);
    }
  }
  return out;
}

export function encodeL1Entry(table: Buffer, index: number, l2Offset: number, copied: boolean): void {
  table.writeUInt32BE(((l2Offset / TWO_32) | (copied ? QCOW_OFLAG_COPIED_HI : 0)) >>> 0, index * 8);
  table.writeUInt32BE(l2Offset >>> 0, index * 8 + 4);
}

export type ClusterKind = 'unallocated' | 'zero' | 'normal' | 'compressed';

export interface L2Entry {
  kind: ClusterKind;
  /** Standard entries: host cluster offset (0 if none; a zero cluster may keep a preallocated one). */
  hostOffset: number;
  copied: boolean;
  reservedBits: boolean;
  /** Compressed entries: byte offset of the compressed stream and its length bound in bytes. */
  compressedOffset: number;
  compressedLength: number;
}

/** The entry of a cluster no table maps, shared: decodeL2Entry returns it for every all-zero entry (no object per entry). */
export const UNALLOCATED: L2Entry = Object.freeze({
  kind: 'unallocated',
  hostOffset: 0,
  copied: false,
  reservedBits: false,
  compressedOffset: 0,
  compressedLength: 0,
});

/**
 * Decodes L2 entry `index` of `table`. For compressed entries `clusterBits` selects the
 * split between offset and sector count (x = 70 - cluster_bits).
 */
export function decodeL2Entry(table: Buffer, index: number, clusterBits: number): L2Entry {
  const hi = table.readUInt32BE(index * 8);
  const lo = table.readUInt32BE(index * 8 + 4);
  if (hi === 0 && lo === 0) return UNALLOCATED;
  if (hi & QCOW_OFLAG_COMPRESSED_HI) {
    const descriptor = table.readBigUInt64BE(index * 8) & ((1n << 62n) - 1n);
    const x = BigInt(70 - clusterBits);
    const offsetBits = descriptor & ((1n << x) - 1n);
    const compressedOffset = Number(offsetBits);
    const sectors = Number(descriptor >> x) + 1;
    return {
      kind: 'compressed',
      hostOffset: 0,
      copied: (hi & QCOW_OFLAG_COPIED_HI) !== 0,
      reservedBits: false,
      compressedOffset,
      compressedLength: sectors * 512 - Number(offsetBits & 511n), // exact even where compressedOffset is rounded (> 2^53)
    };
  }
  const hostOffset = entryOffset(hi, lo);
  const zero = (lo & QCOW_OFLAG_ZERO) !== 0;
  return {
    kind: zero ? 'zero' : hostOffset === 0 ? 'unallocated' : 'normal',
    hostOffset,
    copied: (hi & QCOW_OFLAG_COPIED_HI) !== 0,
    reservedBits: (hi & L2E_STD_RESERVED_HI) !== 0 || (lo & L2E_STD_RESERVED_LO) !== 0,
    compressedOffset: 0,
    compressedLength: 0,
  };
}

/** Writes a standard L2 entry: host offset (cluster aligned or 0), COPIED and zero flags. */
export function encodeL2Entry(table: Buffer, index: number, hostOffset: number, copied: boolean, zero = false): void {
  table.writeUInt32BE(((hostOffset / TWO_32) | (copied ? QCOW_OFLAG_COPIED_HI : 0)) >>> 0, index * 8);
  table.writeUInt32BE(((hostOffset >>> 0) | (zero ? QCOW_OFLAG_ZERO : 0)) >>> 0, index * 8 + 4);
}

/** The 512-byte sectors a stream of `byteLength` bytes at host byte `byteOffset` touches: what its compressed L2 entry names. */
function streamSectors(byteOffset: number, byteLength: number): number {
  return Math.ceil(((byteOffset % 512) + byteLength) / 512);
}

/** Writes a compressed L2 entry: the stream of `byteLength` bytes at host byte `byteOffset` (its sector count as QEMU computes it). */
export function encodeCompressedL2Entry(table: Buffer, index: number, clusterBits: number, byteOffset: number, byteLength: number): void {
  const x = BigInt(70 - clusterBits);
  const sectors = BigInt(streamSectors(byteOffset, byteLength) - 1);
  table.writeBigUInt64BE((1n << 62n) | (sectors << x) | BigInt(byteOffset), index * 8);
}

/**
 * The bytes a compressed L2 entry for a stream of `byteLength` bytes at `byteOffset` names
 * (whole sectors, from the stream's first byte): what a read of that entry inflates.
 */
export function compressedReadLength(byteOffset: number, byteLength: number): number {
  return streamSectors(byteOffset, byteLength) * 512 - (byteOffset % 512);
}

/** Host clusters touched by a compressed stream, as [first, last] cluster indexes. */
export function compressedClusterSpan(e: L2Entry, clusterBits: number): [number, number] {
  const first = Math.floor(e.compressedOffset / 2 ** clusterBits);
  const last = Math.floor((e.compressedOffset + e.compressedLength - 1) / 2 ** clusterBits);
  return [first, last];
}
