// Confirmed slots: one bit per slot of a log store or an incarnation, set when this session
// may link to the slot's cluster without reading it, because the session wrote that cluster
// itself or has compared its bytes with data of the slot's hash. Entries that come from disk
// (journal replay, incarnations written by earlier sessions) start unconfirmed: their first
// hit in a session compares bytes, so an index that lies (damaged, crafted or stale) can cost
// a read, never link a guest cluster to other content (I1, docs/DESIGN.md). RAM: slots / 8 bytes.

import type { HashEntry } from '../format/hash-entry.ts';

export class SlotBits {
  private readonly bits: Uint8Array;

  constructor(slots: number) {
    this.bits = new Uint8Array(Math.ceil(slots / 8));
  }

  get(slot: number): boolean {
    return (this.bits[slot >>> 3] & (1 << (slot & 7))) !== 0;
  }

  set(slot: number, on: boolean): void {
    if (on) this.bits[slot >>> 3] |= 1 << (slot & 7);
    else this.bits[slot >>> 3] &= ~(1 << (slot & 7));
  }

  clear(): void {
    this.bits.fill(0);
  }

  get ramBytes(): number {
    return this.bits.length;
  }
}

/** Where a lookup found an entry: its offsets, its confirmed bit and where that bit lives (DedupStore.find writes one in place). */
export interface FoundSlot {
  hostOffset: number;
  firstGuestOffset: number;
  confirmed: boolean;
  bits: SlotBits;
  slot: number;
}

/** An index entry as a lookup found it. */
export interface IndexEntry extends HashEntry, FoundSlot {}

/** A FoundSlot to be written by a find (its fields mean nothing before). */
export function emptyFoundSlot(): FoundSlot {
  return { hostOffset: 0, firstGuestOffset: 0, confirmed: false, bits: new SlotBits(0), slot: 0 };
}
