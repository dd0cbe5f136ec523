// What the write path knows about each cluster of a batch (Dedup.writeClusters): where its
// hash is, and what the index holds for that hash. Parallel arrays indexed like the batch,
// kept by Dedup and reused from batch to batch; an entry is copied from DedupStore.find's
// record, so that neither a hash nor a lookup makes an object per cluster.

import type { FoundSlot, SlotBits } from './slot-bits.ts';

/** lookups.state[c]: not looked up (a later occurrence of a content of the batch: it is when decided). */
export const NOT_LOOKED = 0;
/** lookups.state[c]: no entry (or a zero cluster, which has no hash). */
export const NO_ENTRY = 1;
/** lookups.state[c]: an entry, in the arrays below. */
export const ENTRY = 2;

export class BatchLookups {
  /** Cluster c's hash is the 32 bytes at hashAt[c] of hashIn[c]; hashIn[c] is null for a zero cluster. */
  hashIn: (Uint8Array | null)[] = [];
  hashAt = new Int32Array(0);
  state = new Uint8Array(0);
  /** The entry found for cluster c when state[c] is ENTRY (FoundSlot's fields). */
  hostOffset = new Float64Array(0);
  firstGuestOffset = new Float64Array(0);
  confirmed = new Uint8Array(0);
  bits: SlotBits[] = [];
  slot = new Int32Array(0);

  /** Makes room for `n` clusters (the arrays' earlier contents then mean nothing). */
  reset(n: number): void {
    if (this.hashAt.length >= n) return;
    this.hashIn = new Array(n).fill(null);
    this.hashAt = new Int32Array(n);
    this.state = new Uint8Array(n);
    this.hostOffset = new Float64Array(n);
    this.firstGuestOffset = new Float64Array(n);
    this.confirmed = new Uint8Array(n);
    this.bits = new Array(n);
    this.slot = new Int32Array(n);
  }

  /** Cluster c is all zeros: no hash, no entry. */
  setZero(c: number): void {
    this.hashIn[c] = null;
    this.state[c] = NO_ENTRY;
  }

  /** Cluster c's hash is the 32 bytes at `at` of `bytes` (which must not change during the batch). */
  setHash(c: number, bytes: Uint8Array, at: number): void {
    this.hashIn[c] = bytes;
    this.hashAt[c] = at;
    this.state[c] = NOT_LOOKED;
  }

  /** Records a lookup's answer for cluster c: `present` and, when it is, the entry in `found`. */
  setFound(c: number, present: boolean, found: FoundSlot): void {
    this.state[c] = present ? ENTRY : NO_ENTRY;
    if (!present) return;
    this.hostOffset[c] = found.hostOffset;
    this.firstGuestOffset[c] = found.firstGuestOffset;
    this.confirmed[c] = found.confirmed ? 1 : 0;
    this.bits[c] = found.bits;
    this.slot[c] = found.slot;
  }

  /** True when clusters a and b (both hashed) have the same hash. */
  sameHash(a: number, b: number): boolean {
    const x = this.hashIn[a]!;
    const y = this.hashIn[b]!;
    const i = this.hashAt[a];
    const j = this.hashAt[b];
    for (let k = 0; k < 32; k++) if (x[i + k] !== y[j + k]) return false;
    return true;
  }
}
