// Incarnations: a frozen log store written to disk as a filter of 16-bit tags followed by
// a hash table with the same slot order (SILT's HashStore, BufferHash's incarnations).
// Pure. Layout: docs/FORMAT.md "Incarnation".
//
//   area   := filter pad table pad                     (whole clusters)
//   filter := slots × u16 tag, big-endian; 0 = empty slot
//   table  := slots × 48-byte hash entry (docs/FORMAT.md "Hash entry"), starting at the
//             first cluster boundary after the filter; an empty slot is all zero, a
//             tombstone (a deleted hash that shadows older incarnations) has host offset 0
//
// A key lives in one of two buckets of 4 slots (bytes 0–3 and 4–7 of its hash, masked to
// the order), so a lookup compares 8 tags in RAM and reads the 48-byte slots whose tag
// matches: one disk read per hit, barring a 2^-16 tag collision per slot.

import { writeU64 } from './bytes.ts';
import { HASH_BYTES, HASH_ENTRY_BYTES, decodeHashEntry, type HashEntry } from './hash-entry.ts';

export const BUCKET_SLOTS = 4;

/** Bucket indexes of a hash: bytes 0–3 and 4–7, masked to the order (distinct when there are 2+ buckets). */
export function candidateBuckets(hash: Uint8Array, order: number): [number, number] {
  const mask = bucketMask(order);
  const b1 = firstBucket(hash, mask);
  return [b1, secondBucket(hash, mask, b1)];
}

/** The mask of bucket indexes of a table of 2^order buckets (firstBucket, secondBucket). */
export function bucketMask(order: number): number {
  return 2 ** order - 1;
}

/** candidateBuckets()[0] of the hash at byte `at` of `hash`, without an array (the lookup path runs it several times per cluster). */
export function firstBucket(hash: Uint8Array, mask: number, at = 0): number {
  return (((hash[at] << 24) | (hash[at + 1] << 16) | (hash[at + 2] << 8) | hash[at + 3]) & mask) >>> 0;
}

/** candidateBuckets()[1] of the hash at byte `at` of `hash`, given the first bucket `b1`. */
export function secondBucket(hash: Uint8Array, mask: number, b1: number, at = 0): number {
  const b2 = (((hash[at + 4] << 24) | (hash[at + 5] << 16) | (hash[at + 6] << 8) | hash[at + 7]) & mask) >>> 0;
  return b2 === b1 && mask > 0 ? b1 ^ 1 : b2;
}

/** The 16-bit filter tag of a hash: bytes 8–9, never 0 (0 marks an empty slot). */
export function tagOf(hash: Uint8Array): number {
  return tagAt(hash, 0);
}

/** tagOf() of the hash at byte `pos` of `bytes`. */
export function tagAt(bytes: Uint8Array, pos: number): number {
  return (bytes[pos + 8] << 8) | bytes[pos + 9] || 1;
}

/** Slot states of a table in memory. A tombstone records a deleted hash. */
export const SLOT_EMPTY = 0;
export const SLOT_USED = 1;
export const SLOT_TOMBSTONE = 2;

/** The slot arrays of a log store, as the freezer reads them. */
export interface SlotArrays {
  readonly slots: number;
  readonly hashes: Uint8Array;
  readonly hostOffsets: Float64Array;
  readonly guestOffsets: Float64Array;
  readonly states: Uint8Array;
}

export interface IncarnationLayout {
  slots: number;
  /** Byte offset of the hash table from the start of the area. */
  tableOffset: number;
  clusters: number;
}

export function incarnationLayout(order: number, clusterSize: number): IncarnationLayout {
  const slots = 2 ** order * BUCKET_SLOTS;
  const tableOffset = Math.ceil((slots * 2) / clusterSize) * clusterSize;
  const clusters = (tableOffset + Math.ceil((slots * HASH_ENTRY_BYTES) / clusterSize) * clusterSize) / clusterSize;
  return { slots, tableOffset, clusters };
}

/** Encodes a whole incarnation area (filter, then table) from a log store's slots. */
export function encodeIncarnation(store: SlotArrays, clusterSize: number, order: number): Buffer {
  const layout = incarnationLayout(order, clusterSize);
  if (layout.slots !== store.slots) throw new RangeError(`store has ${store.slots} slots, order ${order} gives ${layout.slots}`);
  const buf = Buffer.alloc(layout.clusters * clusterSize);
  for (let s = 0; s < store.slots; s++) {
    if (store.states[s] === SLOT_EMPTY) continue;
    // The hash entry (docs/FORMAT.md "Hash entry"), written field by field: no object or view per slot.
    const at = layout.tableOffset + s * HASH_ENTRY_BYTES;
    for (let i = 0; i < HASH_BYTES; i++) buf[at + i] = store.hashes[s * HASH_BYTES + i];
    buf.writeUInt16BE(tagAt(buf, at), s * 2);
    writeU64(buf, at + HASH_BYTES, store.states[s] === SLOT_TOMBSTONE ? 0 : store.hostOffsets[s]);
    writeU64(buf, at + HASH_BYTES + 8, store.guestOffsets[s]);
  }
  return buf;
}

/** Decodes the filter part of an incarnation area into RAM (2 bytes a slot). */
export function decodeFilter(area: Buffer, slots: number): Uint16Array {
  const tags = new Uint16Array(slots);
  for (let s = 0; s < slots; s++) tags[s] = area.readUInt16BE(s * 2);
  return tags;
}

/** Decodes one 48-byte table slot; `tombstone` when its host offset is 0. */
export function decodeIncarnationSlot(buf: Buffer, pos = 0): HashEntry & { tombstone: boolean } {
  const e = decodeHashEntry(buf, pos);
  return { hash: e.hash, hostOffset: e.hostOffset, firstGuestOffset: e.firstGuestOffset, tombstone: e.hostOffset === 0 };
}
