// The dedup holder: an internal QCOW2 snapshot, named `qdedup-dedup-holder`, that holds one
// reference on every host cluster the dedup store indexes. Its L1/L2 tables map "guest"
// cluster P to host cluster P (identity), so whether cluster P is held is one L2 lookup.
// Why it exists: docs/DESIGN.md "The COPIED problem". In short, an indexed cluster then
// always has refcount ≥ 2 while a guest cluster uses it, so COPIED stays clear on every
// active entry pointing at it, stock QEMU never writes into it in place, and every step of
// linking, unlinking and freeing is at worst a leak for `qemu-img check`.
//
// It also holds every cluster of the dedup store itself (configuration area, journals,
// incarnations, limbo), each with refcount 1, so `qemu-img check` finds every cluster of a
// dedup image referenced ("No errors were found"). A held cluster of refcount 1 is thus the
// store's (or an orphan a foreign writer left), never guest data: the write path links only
// to held clusters of refcount ≥ 2.
//
// Tables are cached here and written by the image's commit: L2 tables with the active L2
// tables (before their sync), the L1 with the active L1. The L1 starts just large enough for
// the file as it is (plus a margin) and grows when a cluster past its coverage is to be held:
// the larger copy goes to new clusters and the snapshot table entry is switched to it at the
// commit, crash-safely (HolderHost.moveL1). It never exceeds QEMU's largest L1 table; a
// cluster past that is never held (a data cluster is then not indexed, a store cluster leaks).

import { CorruptImageError, InternalError, hex } from '../errors.ts';
import { decodeL1Entry, decodeL2Entry, encodeL1Entry, encodeL2Entry, l2Offsets } from '../format/l1l2.ts';
import { MAX_L1_BYTES } from '../format/header.ts';
import { TWO_32 } from '../format/bytes.ts';
import type { BlockFile } from '../image/block-file.ts';

export const HOLDER_NAME = 'qdedup-dedup-holder';

/** What the holder needs from the image it lives in. */
export interface HolderHost {
  file: BlockFile;
  clusterBits: number;
  /** Allocates `n` contiguous clusters (refcount 1) and returns the host offset. */
  allocate(n: number): Promise<number>;
  /** Adds a range to the overlap guard. */
  markMetadata(offset: number, bytes: number, what: string): void;
  /** Frees a cluster `allocate` gave that nothing references (at the next commit). */
  freeUnreferenced(cluster: number): void;
  /**
   * The L1 grew: reserves what switching the snapshot table entry to the new L1 needs (the
   * new table's clusters), so that its refcounts are written with the commit's increments.
   */
  reserveL1Move(): Promise<void>;
  /**
   * Commit, once the new L1 (`l1Offset`, `l1Size` entries) is durable: points the snapshot
   * table entry at it (new table, synced, then the header) and queues the frees of the old
   * L1 (`oldL1Offset`, `oldL1Bytes`) and the old snapshot table.
   */
  moveL1(l1Offset: number, l1Size: number, oldL1Offset: number, oldL1Bytes: number): Promise<void>;
}

/** QEMU's largest L1 table (QCOW_MAX_L1_SIZE): the holder never grows past it. */
export const MAX_HOLDER_L1_ENTRIES = MAX_L1_BYTES / 8;
/** Room a new or grown holder L1 leaves past the clusters it must cover: 64 MiB of file. */
const HOLDER_MARGIN_BYTES = 64 * 1024 * 1024;
/** Clean holder L2 tables kept in memory past a commit before the cache is emptied. */
const MAX_CACHED_TABLE_BYTES = 16 * 1024 * 1024;

/**
 * Holder L1 entries to cover host clusters 0 … `clusters` - 1 plus a margin, rounded up to
 * whole L1 clusters (the clusters are written anyway), capped at MAX_HOLDER_L1_ENTRIES.
 */
export function holderL1Size(clusters: number, clusterBits: number): number {
  const perL1Entry = 2 ** (clusterBits - 3); // clusters one L2 table covers
  const perL1Cluster = 2 ** (clusterBits - 3); // L1 entries in one cluster
  const entries = Math.ceil((clusters + HOLDER_MARGIN_BYTES / 2 ** clusterBits) / perL1Entry);
  return Math.min(MAX_HOLDER_L1_ENTRIES, Math.ceil(entries / perL1Cluster) * perL1Cluster);
}

export class Holder {
  private readonly clusterSize: number;
  private readonly l2Entries: number;
  private readonly l2Cache = new Map<number, Buffer>();
  private readonly l2Dirty = new Set<number>();
  /** L1 clusters (indices within the L1) to rewrite. */
  private readonly l1Dirty = new Set<number>();
  /** The L1 at load (or creation) when it has grown since: freed once the snapshot entry names the new one. */
  private moved: { offset: number; bytes: number } | null = null;

  private constructor(
    private readonly host: HolderHost,
    private l1OffsetNow: number,
    private l1Now: Buffer,
  ) {
    this.clusterSize = 2 ** host.clusterBits;
    this.l2Entries = this.clusterSize / 8;
  }

  /** Loads the holder's L1 table and adds its tables to the overlap guard. */
  static async load(host: HolderHost, l1Offset: number, l1Size: number): Promise<Holder> {
    const l1 = await host.file.read(l1Offset, l1Size * 8);
    const h = new Holder(host, l1Offset, l1);
    if (l1Size) host.markMetadata(l1Offset, l1Size * 8, 'dedup holder L1 table'); // an empty holder has no table
    for (const off of h.tableOffsets()) host.markMetadata(off, h.clusterSize, 'dedup holder L2 table');
    return h;
  }

  /** A new, empty holder L1 table of `l1Size` entries (written zero at once). */
  static async create(host: HolderHost, l1Size: number): Promise<Holder> {
    const clusterSize = 2 ** host.clusterBits;
    const bytes = Math.ceil((l1Size * 8) / clusterSize) * clusterSize;
    const offset = await host.allocate(bytes / clusterSize);
    await host.file.write(offset, Buffer.alloc(bytes));
    host.markMetadata(offset, bytes, 'dedup holder L1 table');
    return new Holder(host, offset, Buffer.alloc(l1Size * 8));
  }

  /** Host offset of the L1 table (a grown table's new place, before the commit switches to it). */
  get l1Offset(): number {
    return this.l1OffsetNow;
  }

  get l1(): Buffer {
    return this.l1Now;
  }

  get l1Size(): number {
    return this.l1.length / 8;
  }

  /** True when the holder could hold `cluster` (growing its L1 if need be). */
  canHold(cluster: number): boolean {
    return cluster < MAX_HOLDER_L1_ENTRIES * this.l2Entries;
  }

  /**
   * Grows the L1 so that it covers `cluster`: a copy at least twice as large in new clusters
   * (written at the commit, then the snapshot table switched to it: HolderHost.moveL1).
   */
  private async grow(cluster: number): Promise<void> {
    const needed = Math.max(cluster + 1, 2 * this.coverage);
    const size = holderL1Size(needed, this.host.clusterBits);
    const bytes = Math.ceil((size * 8) / this.clusterSize) * this.clusterSize;
    const offset = await this.host.allocate(bytes / this.clusterSize);
    this.host.markMetadata(offset, bytes, 'dedup holder L1 table');
    const l1 = Buffer.alloc(size * 8);
    this.l1.copy(l1);
    if (this.moved) {
      // Grown twice before a commit: the intermediate copy was never named by anything.
      const c = this.l1Offset / this.clusterSize;
      for (let i = 0; i < Math.ceil(this.l1.length / this.clusterSize); i++) this.host.freeUnreferenced(c + i);
    } else {
      this.moved = { offset: this.l1Offset, bytes: Math.ceil(this.l1.length / this.clusterSize) * this.clusterSize };
      await this.host.reserveL1Move();
    }
    this.l1OffsetNow = offset;
    this.l1Now = l1;
    for (let i = 0; i < bytes / this.clusterSize; i++) this.l1Dirty.add(i);
  }

  /** Host clusters the holder can cover. */
  get coverage(): number {
    return this.l1Size * this.l2Entries;
  }

  covers(cluster: number): boolean {
    return cluster < this.coverage;
  }

  /** Host offsets of the holder's L2 tables. */
  tableOffsets(): number[] {
    return l2Offsets(this.l1, this.l1Size);
  }

  /** Clusters the holder's own tables take (L1 and L2). */
  get tableClusters(): number {
    return Math.ceil(this.l1.length / this.clusterSize) + this.tableOffsets().length;
  }

  private async table(l1Index: number): Promise<Buffer | null> {
    const cached = this.l2Cache.get(l1Index);
    if (cached) return cached;
    const e = decodeL1Entry(this.l1, l1Index);
    if (!e.l2Offset) return null;
    if (e.l2Offset % this.clusterSize) throw this.corrupt(`L2 table offset ${hex(e.l2Offset)} unaligned`, this.l1Offset + l1Index * 8);
    const t = await this.host.file.read(e.l2Offset, this.clusterSize);
    this.l2Cache.set(l1Index, t);
    return t;
  }

  /**
   * Reads the holder tables of these clusters into memory, so that holds() and release() of
   * them need no I/O (tables stay in memory until a commit writes them).
   */
  async fetch(clusters: Iterable<number>): Promise<void> {
    // The tables are found first, without an await in the loop: a for…of holding one made an
    // iterator result per cluster.
    const missing: number[] = [];
    let last = -1;
    for (const c of clusters) {
      if (!this.covers(c)) continue;
      const l1Index = Math.floor(c / this.l2Entries);
      if (l1Index !== last && !this.l2Cache.has(l1Index) && !missing.includes(l1Index)) missing.push(l1Index);
      last = l1Index;
    }
    for (const l1Index of missing) await this.table(l1Index);
  }

  /**
   * Makes these clusters holdable without I/O: grows the L1 to cover them and reads or
   * creates their tables (allocation). Clusters past canHold() are skipped.
   */
  async prepareHold(clusters: Iterable<number>): Promise<void> {
    let last = -1;
    for (const c of clusters) {
      if (!this.canHold(c)) continue;
      if (!this.covers(c)) await this.grow(c);
      const l1Index = Math.floor(c / this.l2Entries);
      if (l1Index === last) continue;
      last = l1Index;
      if (await this.table(l1Index)) continue;
      const offset = await this.host.allocate(1);
      this.host.markMetadata(offset, this.clusterSize, 'dedup holder L2 table');
      this.l2Cache.set(l1Index, Buffer.alloc(this.clusterSize));
      encodeL1Entry(this.l1, l1Index, offset, false);
      this.l1Dirty.add(Math.floor((l1Index * 8) / this.clusterSize));
    }
  }

  /** True when hold(`cluster`) needs no I/O (prepareHold() done for its table). */
  ready(cluster: number): boolean {
    return this.covers(cluster) && this.l2Cache.has(Math.floor(cluster / this.l2Entries));
  }

  /** The table of `cluster` when it is in memory, null when the L1 names none; throws InternalError when it was not fetched. */
  private fetched(cluster: number): Buffer | null {
    const l1Index = Math.floor(cluster / this.l2Entries);
    const t = this.l2Cache.get(l1Index);
    if (t) return t;
    if (decodeL1Entry(this.l1, l1Index).l2Offset === 0) return null;
    throw new InternalError(`dedup holder table of cluster ${cluster} not fetched`);
  }

  /**
   * True when host cluster `cluster` is held, without I/O (its table fetched). Throws
   * CorruptImageError if the entry is not the identity (not our holder).
   */
  holds(cluster: number): boolean {
    if (!this.covers(cluster)) return false;
    const t = this.fetched(cluster);
    return t ? this.heldIn(t, Math.floor(cluster / this.l2Entries), cluster) : false;
  }

  /** holds() with its table read first if need be. */
  async isHeld(cluster: number): Promise<boolean> {
    await this.fetch([cluster]);
    return this.holds(cluster);
  }

  private heldIn(t: Buffer, l1Index: number, cluster: number): boolean {
    // The entry hold() writes, compared as it is (decoding it made an object per hit).
    const offset = cluster * this.clusterSize;
    const at = (cluster % this.l2Entries) * 8;
    if (t.readUInt32BE(at) === Math.floor(offset / TWO_32) && t.readUInt32BE(at + 4) === offset >>> 0 && offset !== 0) return true;
    const e = decodeL2Entry(t, cluster % this.l2Entries, this.host.clusterBits);
    if (e.kind === 'unallocated') return false;
    if (e.kind !== 'normal' || e.hostOffset !== cluster * this.clusterSize) {
      throw this.corrupt(
        `entry for cluster ${hex(cluster * this.clusterSize)} maps ${hex(e.hostOffset)}, not itself`,
        decodeL1Entry(this.l1, l1Index).l2Offset + (cluster % this.l2Entries) * 8,
      );
    }
    return true;
  }

  /**
   * Holds host cluster `cluster` (the caller has added its reference to the refcount), without
   * I/O: prepareHold() must have covered it. Throws InternalError otherwise.
   */
  hold(cluster: number): void {
    const l1Index = Math.floor(cluster / this.l2Entries);
    const t = this.covers(cluster) ? this.l2Cache.get(l1Index) : undefined;
    if (!t) throw new InternalError(`dedup holder table of cluster ${cluster} not prepared`);
    encodeL2Entry(t, cluster % this.l2Entries, cluster * this.clusterSize, false);
    this.l2Dirty.add(l1Index);
  }

  /**
   * Holds clusters `first` … `first + n - 1` (freshly allocated: the caller's allocation is
   * their reference): one table lookup per L2 table rather than per cluster, so a journal of
   * hundreds of thousands of clusters is held in milliseconds.
   */
  async holdRun(first: number, n: number): Promise<void> {
    let c = first;
    const end = first + n;
    while (c < end) {
      await this.prepareHold([c]); // creates the table (and grows the L1) when needed
      const stop = Math.min(end, (Math.floor(c / this.l2Entries) + 1) * this.l2Entries);
      for (let x = c; x < stop; x++) this.hold(x);
      c = stop;
    }
  }

  /** Drops the hold on `cluster` without I/O, its table fetched (the caller queues the refcount decrement for after the commit). */
  release(cluster: number): void {
    if (!this.covers(cluster)) return;
    const t = this.fetched(cluster);
    if (!t) return;
    const l1Index = Math.floor(cluster / this.l2Entries);
    encodeL2Entry(t, cluster % this.l2Entries, 0, false);
    this.l2Dirty.add(l1Index);
  }

  /** Writes dirty L2 tables (commit step 3; the caller syncs). */
  async writeTables(): Promise<boolean> {
    if (!this.l2Dirty.size) return false;
    // In host order, tables that lie back to back in one writev (a store allocated at once
    // has thousands of consecutive tables at small cluster sizes).
    const dirty = [...this.l2Dirty].map((i) => ({ at: decodeL1Entry(this.l1, i).l2Offset, t: this.l2Cache.get(i)! })).sort((a, b) => a.at - b.at);
    for (let k = 0; k < dirty.length; ) {
      let end = k + 1;
      while (end < dirty.length && end - k < 1024 && dirty[end].at === dirty[end - 1].at + this.clusterSize) end++;
      await this.host.file.writev(
        dirty[k].at,
        dirty.slice(k, end).map((d) => d.t),
      );
      k = end;
    }
    this.l2Dirty.clear();
    if (this.l2Cache.size * this.clusterSize > MAX_CACHED_TABLE_BYTES) this.l2Cache.clear();
    return true;
  }

  /**
   * Writes the dirty parts of the L1 (commit step 4; the caller syncs). A grown L1 is written
   * whole to its new place and synced before the snapshot table is switched to it (I3: the
   * header never names a table whose L1 is not durable; until the switch the old L1 is in
   * force and what only the new one names is at worst a leak).
   */
  async writeL1(): Promise<boolean> {
    if (!this.l1Dirty.size) return false;
    for (const i of [...this.l1Dirty].sort((a, b) => a - b)) {
      const from = i * this.clusterSize;
      await this.host.file.write(this.l1Offset + from, this.l1.subarray(from, Math.min(this.l1.length, from + this.clusterSize)));
    }
    this.l1Dirty.clear();
    if (this.moved) {
      await this.host.file.sync();
      await this.host.moveL1(this.l1Offset, this.l1Size, this.moved.offset, this.moved.bytes);
      this.moved = null;
    }
    return true;
  }

  private corrupt(what: string, offset: number): CorruptImageError {
    return new CorruptImageError(`dedup holder snapshot: ${what}; it is not qdedup's (delete it with 'qemu-img snapshot -d ${HOLDER_NAME}')`, {
      offset,
      structure: 'dedup holder',
    });
  }
}
