// The hash store: frozen log stores (incarnations) on disk, each with its filter of tags
// in RAM, searched youngest first; a FIFO of at most `maxIncarnations`, whose forgotten
// areas go to limbo for reuse. Layout: docs/FORMAT.md "Log stores and incarnations".
//
// Forgetting an incarnation only lowers the dedup ratio: a hash that is no longer found
// makes the next copy of that content start a new cluster. It never corrupts data.

import {
  BUCKET_SLOTS,
  decodeFilter,
  bucketMask,
  firstBucket,
  secondBucket,
  encodeIncarnation,
  incarnationLayout,
  tagAt,
  type IncarnationLayout,
  type SlotArrays,
} from '../format/incarnation.ts';
import { readU64 } from '../format/bytes.ts';
import { HASH_BYTES, HASH_ENTRY_BYTES } from '../format/hash-entry.ts';
import type { IncarnationRecord, LimboRecord } from '../format/dedup-ext.ts';
import type { BlockFile } from '../image/block-file.ts';
import { SlotBits, emptyFoundSlot, type FoundSlot, type IndexEntry } from './slot-bits.ts';
import { SlotCache, slotOffset } from './slot-cache.ts';

export interface Incarnation {
  record: IncarnationRecord;
  confirmed: SlotBits;
}

/**
 * True when one of the two 16-bit halves of `v` is zero. Exact for the question "is any half
 * zero" (the classic test: a borrow only crosses into the high half when the low half is
 * zero, and then the answer is already yes).
 */
function hasZeroHalf(v: number): boolean {
  return ((v - 0x1_0001) & ~v & 0x8000_8000) !== 0;
}

/** What a lookup found: an entry, or a tombstone saying the hash was deleted. */
export type Found = { entry: IndexEntry; tombstone: boolean };

/** HashStore.find's answers. */
export const NOT_FOUND = 0;
export const FOUND_ENTRY = 1;
export const FOUND_TOMBSTONE = 2;

export class HashStore {
  readonly layout: IncarnationLayout;
  /** bucketMask(order). */
  private readonly mask: number;
  /** Youngest first. */
  incarnations: Incarnation[] = [];
  /**
   * The filters of all incarnations, bucket by bucket: bucket b of incarnation k (youngest
   * first) is words 2 (b n + k) and 2 (b n + k) + 1, n = incarnations.length, each word two
   * tags (slot 4b + 2w + h in bits 16h…16h+15 of word w). A lookup then reads, for each of
   * its two buckets, one contiguous run of words across every incarnation (see lookup).
   * Rebuilt at each freeze, with the new incarnation first (tagAt gives any tag back).
   */
  private filter: Uint32Array = new Uint32Array(0);
  limbo: LimboRecord[] = [];
  /** Table slots of the incarnations recently read or written. */
  private readonly slots = new SlotCache();
  private readonly readSync = (offset: number, length: number) => this.file.readSync(offset, length);
  /** Statistics: lookups that reached the incarnations, slots they read (from the cache or the disk), hits. */
  lookups = 0;
  slotReads = 0;
  hits = 0;

  constructor(
    private readonly file: BlockFile,
    readonly order: number,
    readonly clusterSize: number,
    readonly maxIncarnations: number,
  ) {
    this.layout = incarnationLayout(order, clusterSize);
    this.mask = bucketMask(order);
  }

  /** Loads the filters of the recorded incarnations (one read each). */
  async load(records: IncarnationRecord[], limbo: LimboRecord[]): Promise<void> {
    const tags: Uint16Array[] = [];
    for (const record of records) tags.push(decodeFilter(await this.file.read(record.offset, this.layout.slots * 2), this.layout.slots));
    this.incarnations = records.map((record) => ({ record, confirmed: new SlotBits(this.layout.slots) }));
    this.filter = this.interleave(tags, 0);
    this.limbo = [...limbo];
  }

  /** The filter tag of slot `s` of incarnation `k` (0: an empty slot). */
  tagAt(k: number, s: number): number {
    const w = this.filter[2 * (Math.floor(s / BUCKET_SLOTS) * this.incarnations.length + k) + ((s >> 1) & 1)];
    return s & 1 ? w >>> 16 : w & 0xffff;
  }

  /**
   * A filter of `fresh` (youngest first) followed by the first `keep` incarnations of the
   * current filter, in the layout of `filter`.
   */
  private interleave(fresh: Uint16Array[], keep: number): Uint32Array {
    const buckets = this.layout.slots / BUCKET_SLOTS;
    const n = fresh.length + keep;
    const old = this.filter;
    const oldN = old.length / (2 * buckets); // incarnations in `old`
    const out = new Uint32Array(buckets * n * 2);
    for (let b = 0; b < buckets; b++) {
      let at = 2 * b * n;
      for (const tags of fresh) {
        const t = b * BUCKET_SLOTS;
        out[at++] = tags[t] | (tags[t + 1] << 16);
        out[at++] = tags[t + 2] | (tags[t + 3] << 16);
      }
      if (keep) out.set(old.subarray(2 * b * oldN, 2 * b * oldN + 2 * keep), at);
    }
    return out;
  }

  /** RAM held by the filters and their confirmed bits. */
  get filterRamBytes(): number {
    return this.incarnations.length * (this.layout.slots * 2 + Math.ceil(this.layout.slots / 8));
  }

  /** RAM held by the filters, their confirmed bits and the slot cache. */
  get ramBytes(): number {
    return this.filterRamBytes + this.slots.ramBytes;
  }

  get entries(): number {
    return this.incarnations.reduce((n, i) => n + i.record.entries, 0);
  }

  /**
   * Searches the incarnations youngest first; reads only slots whose tag matches, from the
   * slot cache or with a synchronous read of their piece (the thread pool's round trip
   * would cost ten times more).
   */
  lookup(hash: Buffer): Found | null {
    const found = this.find(hash, 0, this.scratch);
    // The entry names the caller's bytes, as a log store's does (no copy).
    return found === NOT_FOUND ? null : { entry: { hash, ...this.scratch }, tombstone: found === FOUND_TOMBSTONE };
  }

  /**
   * lookup() of the hash at byte `at` of `hash`, without an object: NOT_FOUND, FOUND_ENTRY or
   * FOUND_TOMBSTONE (host offset 0), the slot's fields written into `out` for both.
   */
  find(hash: Uint8Array, at: number, out: FoundSlot): number {
    if (this.incarnations.length === 0) return NOT_FOUND;
    this.lookups++;
    const k = this.locate(hash, at);
    if (k < 0) return NOT_FOUND;
    const { piece, at: slotAt, slot } = this.located;
    const confirmed = this.incarnations[k].confirmed;
    out.hostOffset = readU64(piece, slotAt + 32, 'hash entry host offset');
    out.firstGuestOffset = readU64(piece, slotAt + 40, 'hash entry guest offset');
    out.confirmed = confirmed.get(slot);
    out.bits = confirmed;
    out.slot = slot;
    if (out.hostOffset === 0) return FOUND_TOMBSTONE;
    this.hits++;
    return FOUND_ENTRY;
  }

  /** What lookup() has find() write. */
  private readonly scratch = emptyFoundSlot();

  /**
   * The youngest incarnation holding `hash` where a lookup reaches it (as an entry or a
   * tombstone), or -1: what a lookup would find, without counting it (check, ./inspect.ts).
   */
  youngestHolding(hash: Uint8Array): number {
    return this.incarnations.length === 0 ? -1 : this.locate(hash);
  }

  /** Where locate() found its hash last: the cached piece, the slot's offset in it, the slot. */
  private located: { piece: Buffer; at: number; slot: number } = { piece: Buffer.alloc(0), at: 0, slot: 0 };

  /**
   * The youngest incarnation whose slot in one of `hash`'s two buckets holds `hash`, its
   * place in `located`; -1 if none.
   */
  private locate(hash: Uint8Array, at = 0): number {
    const tag = tagAt(hash, at);
    const b1 = firstBucket(hash, this.mask, at);
    const b2 = secondBucket(hash, this.mask, b1, at);
    const s1 = b1 * BUCKET_SLOTS;
    const s2 = b2 * BUCKET_SLOTS;
    const two = b1 !== b2;
    // Most incarnations match none of the 8 tags: one test of 4 words rejects them (a miss
    // scans every incarnation, so this loop is the cost of a miss). A word XOR the tag in
    // both halves has a zero half where a tag matches; half the work of 8 compares.
    const tag2 = tag * 0x1_0001;
    const n = this.incarnations.length;
    const filter = this.filter;
    for (let k = 0, w1 = 2 * b1 * n, w2 = 2 * b2 * n; k < n; k++, w1 += 2, w2 += 2) {
      if (!hasZeroHalf(filter[w1] ^ tag2) && !hasZeroHalf(filter[w1 + 1] ^ tag2) && !hasZeroHalf(filter[w2] ^ tag2) && !hasZeroHalf(filter[w2 + 1] ^ tag2))
        continue;
      const inc = this.incarnations[k];
      for (let i = 0; i < 2 * BUCKET_SLOTS; i++) {
        if (i === BUCKET_SLOTS && !two) break;
        const s = i < BUCKET_SLOTS ? s1 + i : s2 + i - BUCKET_SLOTS;
        const word = filter[(i < BUCKET_SLOTS ? w1 : w2) + ((i >> 1) & 1)];
        if ((i & 1 ? word >>> 16 : word & 0xffff) !== tag) continue;
        this.slotReads++;
        const piece = this.slots.piece(inc.record.offset + this.layout.tableOffset, this.layout.slots, s, this.readSync);
        const slotAt = slotOffset(s);
        if (!sameHash(piece, slotAt, hash, at)) continue; // a tag collision
        const l = this.located;
        l.piece = piece;
        l.at = slotAt;
        l.slot = s;
        return k;
      }
    }
    return -1;
  }

  /**
   * Writes a full log store as the youngest incarnation, in a limbo area when one is free,
   * else in clusters from `allocate`. Beyond maxIncarnations the oldest is forgotten and its
   * area goes to limbo. The caller syncs; the configuration area records the change.
   * `confirmed`: the log store's confirmed bits, which stay with its slots.
   */
  async freeze(
    store: SlotArrays,
    count: number,
    generation: number,
    allocate: (clusters: number) => Promise<number>,
    confirmed = new SlotBits(store.slots),
  ): Promise<void> {
    const area = encodeIncarnation(store, this.clusterSize, this.order);
    const reused = this.limbo.findIndex((l) => l.clusters >= this.layout.clusters);
    const offset = reused >= 0 ? this.limbo.splice(reused, 1)[0].offset : await allocate(this.layout.clusters);
    await this.file.write(offset, area);
    this.slots.fill(offset + this.layout.tableOffset, area.subarray(this.layout.tableOffset, this.layout.tableOffset + this.layout.slots * HASH_ENTRY_BYTES));
    this.incarnations.unshift({ record: { offset, entries: count, generation }, confirmed });
    let keep = this.incarnations.length - 1; // of the incarnations before this one
    while (this.maxIncarnations > 0 && this.incarnations.length > this.maxIncarnations) {
      const oldest = this.incarnations.pop()!;
      keep--;
      this.slots.forget(oldest.record.offset + this.layout.tableOffset, this.layout.slots);
      this.limbo.push({ offset: oldest.record.offset, clusters: this.layout.clusters });
    }
    this.filter = this.interleave([decodeFilter(area, this.layout.slots)], keep);
  }

  /** Every area the store owns (incarnations and limbo), for check and dedup-stats. */
  areas(): { offset: number; clusters: number }[] {
    return [
      ...this.incarnations.map((i) => ({ offset: i.record.offset, clusters: this.layout.clusters })),
      ...this.limbo.map((l) => ({ offset: l.offset, clusters: l.clusters })),
    ];
  }
}

/**
 * True when the 32 bytes at `at` in `piece` (a table slot's hash) are `hash`. Compared here:
 * Buffer.compare's call into C++ (its arguments checked, the views' buffers fetched) cost
 * several times the compare of 32 bytes.
 */
function sameHash(piece: Uint8Array, at: number, hash: Uint8Array, hashAt: number): boolean {
  for (let i = 0; i < HASH_BYTES; i++) if (piece[at + i] !== hash[hashAt + i]) return false;
  return true;
}
