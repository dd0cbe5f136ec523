// A bounded cache of incarnation table slots in RAM, least recently used out. An incarnation's
// table is never changed once written (a forgotten one's area is reused only by a later
// freeze, which replaces its pieces here), so a cached piece stays true until its
// incarnation is forgotten. A lookup whose tag matches then costs no system call: 48-byte
// synchronous reads were a seventh of a dedup import's main thread. Its RAM is part of the
// index's RAM that dedup-stats reports (I5).

import { HASH_ENTRY_BYTES } from '../format/hash-entry.ts';

/** Slots per cached piece: 85 × 48 = 4080 bytes, about a page, read with one call on a miss. */
export const PIECE_SLOTS = 85;
const PIECE_BYTES = PIECE_SLOTS * HASH_ENTRY_BYTES;
/** RAM the cache may hold: tables of about 350,000 index entries. */
export const SLOT_CACHE_BYTES = 16 * 1024 * 1024;

export class SlotCache {
  /**
   * Key (pieceKey) → the piece's node. A number, not a string: building and hashing a string
   * key was a tenth of a hit's cost.
   */
  private readonly nodes = new Map<number, number>();
  /** Per node: its piece's bytes (null: a free node) and key… */
  private readonly data: (Buffer | null)[] = [];
  private readonly keys: number[] = [];
  /** …and its neighbours in use order, -1 at the ends: a hit relinks its node, which makes nothing (a Map's delete and set made an entry per hit). */
  private readonly older: number[] = [];
  private readonly newer: number[] = [];
  private oldest = -1;
  private newest = -1;
  /** Nodes whose piece left, to reuse. */
  private readonly free: number[] = [];
  private bytes = 0;

  constructor(private readonly maxBytes = SLOT_CACHE_BYTES) {}

  get ramBytes(): number {
    return this.bytes;
  }

  /**
   * The cached piece holding slot `slot` of the table at file offset `table` (of `slots`
   * slots): from the cache, else read with `read(offset, length)` and kept. The slot's 48
   * bytes are at slotOffset(slot) in it (no view made per lookup).
   */
  piece(table: number, slots: number, slot: number, read: (offset: number, length: number) => Buffer): Buffer {
    const piece = Math.floor(slot / PIECE_SLOTS);
    const key = pieceKey(table, piece);
    const node = this.nodes.get(key);
    if (node !== undefined) {
      if (node !== this.newest) {
        this.unlink(node); // most recently used: to the new end
        this.linkNewest(node);
      }
      return this.data[node]!;
    }
    const first = piece * PIECE_SLOTS;
    const bytes = read(table + first * HASH_ENTRY_BYTES, Math.min(PIECE_SLOTS, slots - first) * HASH_ENTRY_BYTES);
    this.add(key, bytes);
    return bytes;
  }

  /** Caches a whole table just written at file offset `table` (its bytes: `data`), replacing what was cached there. */
  fill(table: number, data: Buffer): void {
    this.forget(table, data.length / HASH_ENTRY_BYTES);
    if (data.length > this.maxBytes / 4) return; // a table that big would only push itself out: read on demand
    for (let piece = 0, at = 0; at < data.length; piece++, at += PIECE_BYTES) {
      this.add(pieceKey(table, piece), Buffer.from(data.subarray(at, Math.min(data.length, at + PIECE_BYTES))));
    }
  }

  /** Drops the pieces of the table at `table` (of `slots` slots): its incarnation is forgotten. */
  forget(table: number, slots: number): void {
    for (let piece = 0; piece * PIECE_SLOTS < slots; piece++) {
      const node = this.nodes.get(pieceKey(table, piece));
      if (node !== undefined) this.remove(node);
    }
  }

  /** Keeps `bytes` under `key` as the most recently used, then drops the least recently used while over the bound. */
  private add(key: number, bytes: Buffer): void {
    const node = this.free.pop() ?? this.data.length;
    this.data[node] = bytes;
    this.keys[node] = key;
    this.nodes.set(key, node);
    this.linkNewest(node);
    this.bytes += bytes.length;
    while (this.bytes > this.maxBytes && this.oldest >= 0) this.remove(this.oldest);
  }

  private remove(node: number): void {
    this.unlink(node);
    this.nodes.delete(this.keys[node]);
    this.bytes -= this.data[node]!.length;
    this.data[node] = null;
    this.free.push(node);
  }

  private unlink(node: number): void {
    const o = this.older[node];
    const n = this.newer[node];
    if (o >= 0) this.newer[o] = n;
    else this.oldest = n;
    if (n >= 0) this.older[n] = o;
    else this.newest = o;
  }

  private linkNewest(node: number): void {
    this.older[node] = this.newest;
    this.newer[node] = -1;
    if (this.newest >= 0) this.newer[this.newest] = node;
    else this.oldest = node;
    this.newest = node;
  }
}

/** Where slot `slot`'s 48 bytes start in its piece (SlotCache.piece). */
export function slotOffset(slot: number): number {
  return (slot % PIECE_SLOTS) * HASH_ENTRY_BYTES;
}

/**
 * The key of piece `piece` of the table at file offset `table`: their sum. Unique, because a
 * table of n slots takes 48n bytes of the file and has fewer than n pieces, and tables do
 * not overlap: every key of a table lies below the next table's offset.
 */
function pieceKey(table: number, piece: number): number {
  return table + piece;
}
