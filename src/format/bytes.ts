// Big-endian integer helpers shared by every on-disk structure, and a zero test. Pure.
// QCOW2 stores every multi-byte integer big-endian. JavaScript numbers are exact only up
// to 2^53, so 64-bit fields are read as two u32 halves and refused above that bound.

import { UnsupportedError } from '../errors.ts';

export const TWO_32 = 0x1_0000_0000;
/** 2^53 / 2^32: a u64 whose high half reaches this is past Number.MAX_SAFE_INTEGER. */
export const U64_HI_UNSAFE = 0x200000;

/** Reads a u64 as a number; throws UnsupportedError when it exceeds 2^53 - 1. */
export function readU64(buf: Buffer, pos: number, what: string): number {
  const hi = buf.readUInt32BE(pos);
  const lo = buf.readUInt32BE(pos + 4);
  if (hi >= U64_HI_UNSAFE) throw new UnsupportedError(`${what} 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is beyond 2^53 bytes`);
  return hi * TWO_32 + lo;
}

/** Writes a non-negative integer below 2^53 as a big-endian u64. */
export function writeU64(buf: Buffer, pos: number, value: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32), pos);
  buf.writeUInt32BE(value >>> 0, pos + 4);
}

export function divCeil(n: number, d: number): number {
  return Math.ceil(n / d);
}

let zeros = Buffer.alloc(0);

/**
 * True when every byte is zero (memcmp against a shared zero buffer). Data that is not zero
 * mostly has a byte other than zero at one end: those two bytes are looked at first, so such
 * data costs no slice and no call into memcmp.
 */
export function isZero(b: Uint8Array): boolean {
  return isZeroRange(b, 0, b.length);
}

/** isZero() of bytes [start, end) of `b`, without a view of them. */
export function isZeroRange(b: Uint8Array, start: number, end: number): boolean {
  const n = end - start;
  if (n > 0 && (b[start] !== 0 || b[end - 1] !== 0)) return false;
  if (zeros.length < n) zeros = Buffer.alloc(n);
  return zeros.compare(b, start, end, 0, n) === 0;
}
