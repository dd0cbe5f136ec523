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

export function encodeHashEntry(e: HashEntry, buf: Buffer, pos: number): void {
  buf.set(e.hash.length === HASH_BYTES ? e.hash : e.hash.subarray(0, HASH_BYTES), pos); // set(): no native call, unlike copy()
  writeU64(buf, pos + 32, e.hostOffset);
  writeU64(buf, pos + 40, e.firstGuestOffset);
}
