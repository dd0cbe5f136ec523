// The log store: an in-RAM cuckoo hash table of hash entries (SILT's LogStore), 2^order
// buckets of 4 slots, two candidate buckets per key taken from the hash bytes, a bounded
// number of kicks. Pure (no I/O): the journal makes it durable, an incarnation freezes it.
// Layout of a frozen table and of tags: docs/FORMAT.md "Incarnation".
//
// Slots live in typed arrays (32 hash bytes, host offset, first guest offset, state per
// slot, and a confirmed bit: src/dedup/slot-bits.ts), so the table costs 49⅛ bytes per slot
// and no per-entry object. Bucket choice, tags
// and slot states are part of the on-disk layout and live in src/format/incarnation.ts.

import { BUCKET_SLOTS, SLOT_EMPTY, SLOT_USED, bucketMask, firstBucket, secondBucket, type SlotArrays } from '../format/incarnation.ts';
import { SlotBits } from './slot-bits.ts';

/** Cuckoo displacements tried before an insert reports the table full (the seed's QCOW_LOG_STORE_MAX_KICKS). */
export const MAX_KICKS = 128;

export class LogStore implements SlotArrays {
  readonly order: number;
  readonly buckets: number;
  /** bucketMask(order). */
  private readonly mask: number;
  readonly slots: number;
  readonly hashes: Uint8Array;
  readonly hostOffsets: Float64Array;
  readonly guestOffsets: Float64Array;
  readonly states: Uint8Array;
  /** Slots this session may link to without a read (see SlotBits). */
  readonly confirmed: SlotBits;
  /** Used slots, tombstones included. */
  count = 0;
  /** Pseudo-random state for the kick walk (deterministic: replay rebuilds the same table). */
  private seed = 0x9e3779b9;
  /** The entries a kick walk displaced, kick by kick, to carry them on or undo the walk. */
  private readonly walk = {
    slots: new Int32Array(MAX_KICKS),
    hashes: new Uint8Array(MAX_KICKS * 32),
    hosts: new Float64Array(MAX_KICKS),
    guests: new Float64Array(MAX_KICKS),
    states: new Uint8Array(MAX_KICKS),
    confirmed: new Uint8Array(MAX_KICKS),
  };

  constructor(order: number) {
    if (!Number.isInteger(order) || order < 0 || order > 24) throw new RangeError(`log store order ${order} out of range 0–24`);
    this.order = order;
    this.buckets = 2 ** order;
    this.mask = bucketMask(order);
    this.slots = this.buckets * BUCKET_SLOTS;
    this.hashes = new Uint8Array(this.slots * 32);
    this.hostOffsets = new Float64Array(this.slots);
    this.guestOffsets = new Float64Array(this.slots);
    this.states = new Uint8Array(this.slots);
    this.confirmed = new SlotBits(this.slots);
  }

  /** RAM the table holds, in bytes. */
  get ramBytes(): number {
    return this.slots * (32 + 8 + 8 + 1) + this.confirmed.ramBytes;
  }

  private matches(slot: number, hash: Uint8Array, at: number): boolean {
    const hashes = this.hashes;
    const base = slot * 32;
    for (let i = 0; i < 32; i++) if (hashes[base + i] !== hash[at + i]) return false;
    return true;
  }

  /** Slot holding the hash at byte `at` of `hash` (used or tombstone), or -1. */
  find(hash: Uint8Array, at = 0): number {
    const b1 = firstBucket(hash, this.mask, at);
    const s = this.findInBucket(b1, hash, at);
    if (s >= 0) return s;
    const b2 = secondBucket(hash, this.mask, b1, at);
    return b1 === b2 ? s : this.findInBucket(b2, hash, at);
  }

  private findInBucket(b: number, hash: Uint8Array, at: number): number {
    for (let s = b * BUCKET_SLOTS; s < (b + 1) * BUCKET_SLOTS; s++) {
      if (this.states[s] !== SLOT_EMPTY && this.matches(s, hash, at)) return s;
    }
    return -1;
  }

  /**
   * Inserts or replaces the entry for `hash` (`state` SLOT_USED or SLOT_TOMBSTONE;
   * `confirmed`: this session wrote the cluster). Returns false, with the table unchanged, when no slot can be found within MAX_KICKS
   * displacements: the table is full and must be frozen.
   */
  put(hash: Uint8Array, hostOffset: number, guestOffset: number, state = SLOT_USED, confirmed = false, at = 0): boolean {
    const existing = this.find(hash, at);
    if (existing >= 0) {
      this.setSlot(existing, hash, at, hostOffset, guestOffset, state, confirmed);
      return true;
    }
    const b1 = firstBucket(hash, this.mask, at);
    const b2 = secondBucket(hash, this.mask, b1, at);
    const free = this.freeSlot(b1) >= 0 ? this.freeSlot(b1) : this.freeSlot(b2);
    if (free >= 0) {
      this.setSlot(free, hash, at, hostOffset, guestOffset, state, confirmed);
      this.count++;
      return true;
    }
    // Random walk: evict a slot of the current bucket into its other bucket, undoing the
    // whole path if it does not end in a free slot. Kick k saves its victim's entry in
    // record k of the walk (preallocated: no allocation per kick) and then carries it.
    const w = this.walk;
    let carried = -1; // the record carried, -1: the new entry
    let bucket = this.nextRandom() & 1 ? b1 : b2;
    for (let kick = 0; kick < MAX_KICKS; kick++) {
      const victim = bucket * BUCKET_SLOTS + (this.nextRandom() % BUCKET_SLOTS);
      w.slots[kick] = victim;
      copyHash(w.hashes, kick * 32, this.hashes, victim * 32);
      w.hosts[kick] = this.hostOffsets[victim];
      w.guests[kick] = this.guestOffsets[victim];
      w.states[kick] = this.states[victim];
      w.confirmed[kick] = this.confirmed.get(victim) ? 1 : 0;
      if (carried < 0) this.setSlot(victim, hash, at, hostOffset, guestOffset, state, confirmed);
      else this.restore(victim, carried);
      carried = kick;
      const v1 = firstBucket(w.hashes, this.mask, kick * 32); // not candidateBuckets: its 2 ** order cost a pow per kick
      bucket = v1 === bucket ? secondBucket(w.hashes, this.mask, v1, kick * 32) : v1;
      const free = this.freeSlot(bucket);
      if (free >= 0) {
        this.restore(free, carried);
        this.count++;
        return true;
      }
    }
    for (let k = MAX_KICKS - 1; k >= 0; k--) this.restore(w.slots[k], k);
    return false;
  }

  /** Puts the entry saved in record `k` of the walk into slot `slot`. */
  private restore(slot: number, k: number): void {
    const w = this.walk;
    copyHash(this.hashes, slot * 32, w.hashes, k * 32);
    this.hostOffsets[slot] = w.hosts[k];
    this.guestOffsets[slot] = w.guests[k];
    this.states[slot] = w.states[k];
    this.confirmed.set(slot, w.confirmed[k] === 1);
  }

  /** Removes `hash` from this table. Returns true if it was there. */
  remove(hash: Uint8Array): boolean {
    const slot = this.find(hash);
    if (slot < 0) return false;
    this.states[slot] = SLOT_EMPTY;
    this.hashes.fill(0, slot * 32, slot * 32 + 32);
    this.hostOffsets[slot] = 0;
    this.guestOffsets[slot] = 0;
    this.confirmed.set(slot, false);
    this.count--;
    return true;
  }

  /** Empties the table (after it was frozen into an incarnation). */
  clear(): void {
    this.hashes.fill(0);
    this.hostOffsets.fill(0);
    this.guestOffsets.fill(0);
    this.states.fill(0);
    this.confirmed.clear();
    this.count = 0;
  }

  hashAt(slot: number): Uint8Array {
    return this.hashes.subarray(slot * 32, slot * 32 + 32);
  }

  private freeSlot(bucket: number): number {
    for (let s = bucket * BUCKET_SLOTS; s < (bucket + 1) * BUCKET_SLOTS; s++) if (this.states[s] === SLOT_EMPTY) return s;
    return -1;
  }

  private setSlot(slot: number, hash: Uint8Array, at: number, host: number, guest: number, state: number, confirmed: boolean): void {
    copyHash(this.hashes, slot * 32, hash, at);
    this.hostOffsets[slot] = host;
    this.guestOffsets[slot] = guest;
    this.states[slot] = state;
    this.confirmed.set(slot, confirmed);
  }

  private nextRandom(): number {
    // xorshift32
    let x = this.seed;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.seed = x >>> 0;
    return this.seed;
  }
}

/** Copies the 32 bytes of a hash from src[srcAt] to dst[dstAt] (no view made). */
function copyHash(dst: Uint8Array, dstAt: number, src: Uint8Array, srcAt: number): void {
  for (let i = 0; i < 32; i++) dst[dstAt + i] = src[srcAt + i];
}
