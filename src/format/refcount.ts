// Refcount table entries and refcount block entries of every width (1–64 bits). Pure.
// Spec: docs/interop/qcow2.rst "Host cluster management". Widths of 8 bits and more are
// big-endian; narrower ones are packed from the least significant bit of each byte.

import { TWO_32, U64_HI_UNSAFE } from './bytes.ts';

/** Refcount table entries: REFT_OFFSET_MASK = 0xfffffffffffffe00 (low half), REFT_RESERVED_MASK = 0x1ff. */
export const REFT_OFFSET_MASK_LO = 0xffff_fe00;
export const REFT_RESERVED_LO = 0x1ff;

/** One refcount table entry: the block's offset (REFT_OFFSET_MASK) as a number and as u32 halves. */
export interface ReftableEntry {
  /** hi * 2^32 + lo: exact below 2^53 (hi < 0x200000), which callers check before trusting it. */
  offset: number;
  hi: number;
  lo: number;
  /** Bits 0–8 (REFT_RESERVED_MASK) are set. */
  reservedBits: boolean;
}

/** Decodes entry `index` of a refcount table (8 bytes, big-endian). */
export function decodeReftableEntry(table: Buffer, index: number): ReftableEntry {
  const hi = table.readUInt32BE(index * 8);
  const rawLo = table.readUInt32BE(index * 8 + 4);
  const lo = (rawLo & REFT_OFFSET_MASK_LO) >>> 0;
  return { offset: hi * TWO_32 + lo, hi, lo, reservedBits: (rawLo & REFT_RESERVED_LO) !== 0 };
}

/** Entries in one refcount block: cluster_size * 8 / refcount_bits. */
export function refblockEntries(clusterBits: number, refcountOrder: number): number {
  return 2 ** (clusterBits + 3 - refcountOrder);
}

/** Largest refcount the width can hold (capped at 2^53 - 1 for 64-bit refcounts). */
export function maxRefcount(refcountOrder: number): number {
  return refcountOrder >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** refcountOrder) - 1;
}

/** Reads entry `index` of refcount block `block`. 64-bit values above 2^53 read as 2^53 - 1. */
export function getRefcount(block: Buffer, index: number, refcountOrder: number): number {
  switch (refcountOrder) {
    case 4:
      return block.readUInt16BE(index * 2);
    case 3:
      return block[index];
    case 5:
      return block.readUInt32BE(index * 4);
    case 6: {
      const hi = block.readUInt32BE(index * 8);
      return hi >= U64_HI_UNSAFE ? Number.MAX_SAFE_INTEGER : hi * TWO_32 + block.readUInt32BE(index * 8 + 4);
    }
    default: {
      const bits = 2 ** refcountOrder;
      const bitPos = index * bits;
      return (block[bitPos >>> 3] >>> (bitPos & 7)) & ((1 << bits) - 1);
    }
  }
}

/** Writes `value` (0 … maxRefcount) into entry `index` of refcount block `block`. */
export function setRefcount(block: Buffer, index: number, refcountOrder: number, value: number): void {
  switch (refcountOrder) {
    case 4:
      block.writeUInt16BE(value, index * 2);
      return;
    case 3:
      block[index] = value;
      return;
    case 5:
      block.writeUInt32BE(value, index * 4);
      return;
    case 6:
      block.writeUInt32BE(Math.floor(value / TWO_32), index * 8);
      block.writeUInt32BE(value >>> 0, index * 8 + 4);
      return;
    default: {
      const bits = 2 ** refcountOrder;
      const bitPos = index * bits;
      const mask = ((1 << bits) - 1) << (bitPos & 7);
      block[bitPos >>> 3] = (block[bitPos >>> 3] & ~mask) | ((value << (bitPos & 7)) & mask);
    }
  }
}
