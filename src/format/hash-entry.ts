// Dedup hash entries: the record a journal carries and an incarnation's hash table holds.
// Pure. Layout: docs/FORMAT.md "Hash entry".
//
//   0–31  hash of the cluster's bytes (32 bytes, algorithm from the dedup extension)
//  32–39  u64 host offset of the data cluster (cluster aligned; 0 = empty slot)
//  40–47  u64 guest offset where the cluster was first written

import { readU64, writeU64 } from './bytes.ts';

/** Every hash is 32 bytes, whatever the algorithm. */
export const HASH_BYTES = 32;
export const HASH_ENTRY_BYTES = 48;

export interface HashEntry {
  hash: Buffer;
  hostOffset: number;
  firstGuestOffset: number;
}

/** Decodes the entry at `pos`; the hash is a copy. */
export function decodeHashEntry(buf: Buffer, pos: number): HashEntry {
  return {
    hash: Buffer.from(buf.subarray(pos, pos + HASH_BYTES)),
    hostOffset: readU64(buf, pos + 32, 'hash entry host offset'),
    firstGuestOffset: readU64(buf, pos + 40, 'hash entry guest offset'),
  };
}

/** Encodes an entry at `pos`: the hash at byte `hashAt` of `hash`, then the two offsets. */
export function encodeHashEntry(buf: Buffer, pos: number, hash: Uint8Array, hashAt: number, hostOffset: number, firstGuestOffset: number): void {
  for (let i = 0; i < HASH_BYTES; i++) buf[pos + i] = hash[hashAt + i];
  writeU64(buf, pos + 32, hostOffset);
  writeU64(buf, pos + 40, firstGuestOffset);
}

// Entries of compressed copies (framed deflate streams, ./stream-header.ts): the host offset
// is the stream's first byte — never a multiple of the cluster size, unlike a whole
// cluster's — and the guest offset field carries the stream's length in its low bits (a
// guest cluster's offset is a multiple of the cluster size; the length is less than one).

/** True when an entry's host offset names a compressed stream rather than a whole cluster. */
export function isStreamEntry(hostOffset: number, clusterSize: number): boolean {
  return hostOffset % clusterSize !== 0;
}

/** The guest offset field of a stream entry: the guest cluster's offset plus the stream's length. */
export function streamGuestField(guestOffset: number, length: number): number {
  return guestOffset + length;
}

/** The stream length a stream entry's guest offset field carries. */
export function streamLengthOf(guestField: number, clusterSize: number): number {
  return guestField % clusterSize;
}
