// Refcount table and refcount blocks: cluster allocation, increments and deferred frees.
// Spec: docs/interop/qcow2.rst "Host cluster management"; write ordering: docs/DESIGN.md.
//
// The refcount table lives in memory as the master copy (≤ 8 MiB on disk, QEMU's cap);
// blocks are loaded on demand and kept until written back by the image's commit. New
// blocks count themselves when they fall inside the range they describe, and a table
// that outgrows its clusters is moved, at commit, to clusters it describes itself.
//
// I3 (crash leaves at worst leaks): increments are written before any L2 entry points at
// the cluster; decrements are queued (deferFree) and applied only after the L2 tables
// that dropped the reference are durable, so a freed cluster is never reused early.
//
// RefcountBlockCache (the blocks in memory, read on demand, and which of them changed) is
// shared with check's reader of the stored refcounts (src/image/check/stored-refcounts.ts).

import { CorruptImageError, InternalError, hex } from '../errors.ts';
import { MAX_HOST_OFFSET, MAX_REFTABLE_BYTES } from '../format/header.ts';
import { decodeReftableEntry, getRefcount, maxRefcount, refblockEntries, setRefcount } from '../format/refcount.ts';
import { isZero, readU64, writeU64 } from '../format/bytes.ts';
import type { BlockFile } from './block-file.ts';

/** Clean refcount blocks kept in memory before the cache is emptied of them. */
const MAX_CACHED_BLOCKS = 4096;

/**
 * Refcount blocks in memory, by refcount table index, read on demand, and the set of those
 * changed since they were last written. Where a block lives is the owner's business: it
 * passes the offset to read() and a lookup to writeDirty().
 */
export class RefcountBlockCache {
  private readonly blocks = new Map<number, Buffer>();
  private readonly dirty = new Set<number>();

  constructor(
    private readonly clusterSize: number,
    private readonly readAt: (offset: number, length: number) => Promise<Buffer>,
  ) {}

  /** Blocks in memory. */
  get size(): number {
    return this.blocks.size;
  }

  /** Changed blocks in memory. */
  get dirtyCount(): number {
    return this.dirty.size;
  }

  /** The block of table entry `tableIndex` if it is in memory. */
  cached(tableIndex: number): Buffer | undefined {
    return this.blocks.get(tableIndex);
  }

  /** The block of table entry `tableIndex`, read from `offset` when not in memory. */
  async read(tableIndex: number, offset: number): Promise<Buffer> {
    const cached = this.blocks.get(tableIndex);
    if (cached) return cached;
    const buf = await this.readAt(offset, this.clusterSize);
    this.blocks.set(tableIndex, buf);
    return buf;
  }

  /** Puts a new block in memory, changed. */
  add(tableIndex: number, block: Buffer): void {
    this.blocks.set(tableIndex, block);
    this.dirty.add(tableIndex);
  }

  markDirty(tableIndex: number): void {
    this.dirty.add(tableIndex);
  }

  /** Drops every unchanged block from memory. */
  dropClean(): void {
    for (const t of this.blocks.keys()) if (!this.dirty.has(t)) this.blocks.delete(t);
  }

  /** Drops blocks, oldest first, writing the changed ones, until fewer than `keep` are left. */
  async evict(keep: number, offsetOf: (tableIndex: number) => number, write: (offset: number, block: Buffer) => Promise<void>): Promise<void> {
    for (const [t, block] of this.blocks) {
      if (this.dirty.has(t)) {
        await write(offsetOf(t), block);
        this.dirty.delete(t);
      }
      this.blocks.delete(t);
      if (this.blocks.size < keep) return;
    }
  }

  /** Writes the changed blocks, in the order of their offsets. The caller syncs. */
  async writeDirty(offsetOf: (tableIndex: number) => number, write: (offset: number, block: Buffer) => Promise<void>): Promise<void> {
    const order = [...this.dirty].sort((a, b) => offsetOf(a) - offsetOf(b));
    for (const t of order) {
      await write(offsetOf(t), this.blocks.get(t)!);
      this.dirty.delete(t);
    }
  }
}

export interface RefcountLayout {
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
}

export class Refcounts {
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly refcountOrder: number;
  /** Refcount entries per block. */
  readonly blockEntries: number;
  readonly max: number;
  tableOffset: number;
  tableClusters: number;
  /** True when tableOffset/tableClusters changed and the header must be rewritten. */
  tableMoved = false;
  /** Host offset of each refcount block, 0 when absent. Master copy. */
  private table: number[];
  private tableDirty = false;
  private readonly blocks: RefcountBlockCache;
  /** Clusters whose refcount drops by one at the next commit, after the L2 updates are durable. */
  private pendingFrees: number[] = [];
  /** Lowest cluster index that may be free. */
  private freeHint = 0;
  /** Returns the name of the metadata structure occupying a cluster, if any (overlap guard). */
  private readonly metadataAt: (clusterIndex: number) => string | undefined;

  /** Called when a cluster's refcount falls to 0 (the image drops it from its overlap guard). */
  private readonly onFreed: (clusterIndex: number) => void;

  private constructor(
    private readonly file: BlockFile,
    layout: RefcountLayout,
    table: number[],
    metadataAt: (c: number) => string | undefined,
    onFreed: (c: number) => void,
  ) {
    this.clusterBits = layout.clusterBits;
    this.clusterSize = 2 ** layout.clusterBits;
    this.refcountOrder = layout.refcountOrder;
    this.blockEntries = refblockEntries(layout.clusterBits, layout.refcountOrder);
    this.max = maxRefcount(layout.refcountOrder);
    this.tableOffset = layout.tableOffset;
    this.tableClusters = layout.tableClusters;
    this.table = table;
    this.blocks = new RefcountBlockCache(this.clusterSize, (offset, length) => file.read(offset, length));
    this.metadataAt = metadataAt;
    this.onFreed = onFreed;
  }

  /** Reads and validates the refcount table. Throws CorruptImageError naming the bad entry. */
  static async load(
    file: BlockFile,
    layout: RefcountLayout,
    metadataAt: (c: number) => string | undefined,
    onFreed: (c: number) => void = () => {},
  ): Promise<Refcounts> {
    const clusterSize = 2 ** layout.clusterBits;
    const raw = await file.read(layout.tableOffset, layout.tableClusters * clusterSize);
    const table: number[] = [];
    // Unused entries at the end of the table (most of it: a 64 MiB image with 4 KiB clusters
    // uses 1 of 8192) pass every check below and are dropped after it: they are found 64 at a
    // time by a native compare instead of decoded one by one (~4 ms of every `qdedup info`,
    // docs/PERFORMANCE.md "Start-up").
    let used = raw.length >> 3;
    while (used > 0 && isZero(raw.subarray(Math.max(0, used - 64) * 8, used * 8))) used = Math.max(0, used - 64);
    for (let i = 0; i < used; i++) {
      if (decodeReftableEntry(raw, i).reservedBits) {
        throw new CorruptImageError(`refcount table entry ${i} has reserved bits set`, { offset: layout.tableOffset + i * 8, structure: 'refcount table' });
      }
      const offset = readU64(raw, i * 8, `refcount block offset (refcount table entry ${i})`);
      if (offset % clusterSize !== 0)
        throw new CorruptImageError(`refcount block ${i} at ${hex(offset)} is not cluster aligned`, {
          offset: layout.tableOffset + i * 8,
          structure: 'refcount table',
        });
      if (offset >= MAX_HOST_OFFSET)
        throw new CorruptImageError(`refcount block ${i} at ${hex(offset)} is beyond the largest host offset`, {
          offset: layout.tableOffset + i * 8,
          structure: 'refcount table',
        });
      table.push(offset);
    }
    while (table.length > 0 && table[table.length - 1] === 0) table.pop();
    return new Refcounts(file, layout, table, metadataAt, onFreed);
  }

  /** Host offsets of every refcount block in use. */
  blockOffsets(): number[] {
    return this.table.filter((o) => o !== 0);
  }

  /**
   * The block of table entry `tableIndex`, read when not in memory. Never drops a block from
   * memory: only fetch() does, before it reads, so what a fetch loaded stays until the next.
   */
  private async block(tableIndex: number): Promise<Buffer | undefined> {
    const cached = this.blocks.cached(tableIndex);
    if (cached) return cached;
    const offset = this.table[tableIndex];
    if (!offset) return undefined;
    return this.blocks.read(tableIndex, offset);
  }

  /**
   * Reads the refcount blocks of these clusters into memory, so that count() and increment()
   * of them need no I/O until the next fetch (clean blocks beyond MAX_CACHED_BLOCKS are
   * dropped first, never after: I5).
   */
  async fetch(clusterIndexes: Iterable<number>): Promise<void> {
    const missing = new Set<number>();
    for (const c of clusterIndexes) {
      const t = Math.floor(c / this.blockEntries);
      if (this.table[t] && !this.blocks.cached(t)) missing.add(t);
    }
    if (!missing.size) return;
    if (this.blocks.size + missing.size > MAX_CACHED_BLOCKS) this.blocks.dropClean();
    for (const t of missing) await this.block(t);
  }

  /** Refcount of host cluster `clusterIndex` (0 where no block covers it), its block read first if need be. */
  async get(clusterIndex: number): Promise<number> {
    await this.fetch([clusterIndex]);
    return this.count(clusterIndex);
  }

  /**
   * Refcount of host cluster `clusterIndex` (0 where no block covers it), without I/O: its
   * block must have been fetched (or allocated) since the last fetch. Throws InternalError otherwise.
   */
  count(clusterIndex: number): number {
    const t = Math.floor(clusterIndex / this.blockEntries);
    const block = this.blocks.cached(t);
    if (block) return getRefcount(block, clusterIndex % this.blockEntries, this.refcountOrder);
    if (!this.table[t]) return 0;
    throw new InternalError(`refcount block of cluster ${clusterIndex} not fetched`);
  }

  private async set(clusterIndex: number, value: number): Promise<void> {
    const t = Math.floor(clusterIndex / this.blockEntries);
    const block = await this.block(t);
    if (!block) throw new InternalError(`no refcount block for cluster ${clusterIndex}`);
    setRefcount(block, clusterIndex % this.blockEntries, this.refcountOrder, value);
    this.blocks.markDirty(t);
  }

  /**
   * Adds one reference to an allocated cluster, without I/O: its block must be in memory
   * (fetched, or dirty since an allocation). Returns the new value. Throws CorruptImageError
   * when the refcount would overflow, InternalError when the block was not fetched.
   */
  increment(clusterIndex: number): number {
    const t = Math.floor(clusterIndex / this.blockEntries);
    const block = this.blocks.cached(t);
    if (!block) throw new InternalError(`refcount block of cluster ${clusterIndex} not fetched`);
    const index = clusterIndex % this.blockEntries;
    const value = getRefcount(block, index, this.refcountOrder) + 1;
    if (value > this.max)
      throw new CorruptImageError(`refcount of cluster ${clusterIndex} would exceed ${this.max}`, {
        offset: clusterIndex * this.clusterSize,
        structure: 'refcount block',
      });
    setRefcount(block, index, this.refcountOrder, value);
    this.blocks.markDirty(t);
    return value;
  }

  /** Queues one reference to be dropped at the next commit, after the L2 updates are durable (I3). */
  deferFree(clusterIndex: number): void {
    this.pendingFrees.push(clusterIndex);
  }

  hasPendingFrees(): boolean {
    return this.pendingFrees.length > 0;
  }

  /** Applies queued decrements. Called by the commit once the tables that dropped them are on disk. */
  async applyPendingFrees(): Promise<void> {
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    for (const c of frees) {
      const value = await this.get(c);
      if (value === 0)
        throw new CorruptImageError(`refcount of cluster ${c} would drop below 0`, { offset: c * this.clusterSize, structure: 'refcount block' });
      await this.set(c, value - 1);
      if (value === 1) {
        this.onFreed(c);
        if (c < this.freeHint) this.freeHint = c;
      }
    }
  }

  /**
   * Allocates `count` contiguous free clusters, sets their refcounts to 1 and returns the
   * host offset of the first. Creates refcount blocks as needed (they count themselves
   * when they fall inside their own range). Throws CorruptImageError if a free cluster
   * turns out to hold metadata (refcounts are wrong: repair with check -r all).
   */
  async allocate(count: number): Promise<number> {
    for (;;) {
      const start = await this.findFreeRun(count);
      let created = false;
      const lastTable = Math.floor((start + count - 1) / this.blockEntries);
      // Every missing block of the run at once, then one new search: creating one block a
      // search made a run over N missing blocks cost N searches of a growing range (a 400 MB
      // dedup journal at 512-byte clusters took 26 s to allocate).
      for (let t = Math.floor(start / this.blockEntries); t <= lastTable; t++) {
        if (!this.table[t]) {
          await this.createBlock(t);
          created = true;
        }
      }
      if (created) continue; // the new blocks took clusters, perhaps inside the run
      for (let c = start; c < start + count; c++) {
        const what = this.metadataAt(c);
        if (what)
          throw new CorruptImageError(`refcount of cluster ${c} is 0 but it holds the ${what}; run 'qdedup check -r all'`, {
            offset: c * this.clusterSize,
            structure: 'refcount block',
          });
      }
      for (let t = Math.floor(start / this.blockEntries); t <= lastTable; t++) {
        const block = (await this.block(t))!;
        const end = Math.min(start + count, (t + 1) * this.blockEntries);
        for (let c = Math.max(start, t * this.blockEntries); c < end; c++) setRefcount(block, c % this.blockEntries, this.refcountOrder, 1);
        this.blocks.markDirty(t);
      }
      this.freeHint = start + count;
      return start * this.clusterSize;
    }
  }

  /** First run of `count` clusters with refcount 0 at or after the free hint. */
  private async findFreeRun(count: number): Promise<number> {
    const limit = MAX_HOST_OFFSET / this.clusterSize;
    let runStart = this.freeHint;
    let c = runStart;
    while (c - runStart < count) {
      if (c >= limit) throw new CorruptImageError('no free cluster below the largest host offset', { structure: 'refcount table' });
      const t = Math.floor(c / this.blockEntries);
      const block = await this.block(t);
      if (!block) {
        // No block: the whole range it would cover is free.
        c = Math.min((t + 1) * this.blockEntries, runStart + count);
        continue;
      }
      const end = Math.min((t + 1) * this.blockEntries, runStart + count);
      for (; c < end; c++) {
        if (getRefcount(block, c % this.blockEntries, this.refcountOrder) !== 0) runStart = c + 1;
      }
      if (runStart > c) c = runStart;
    }
    return runStart;
  }

  /** Creates an empty refcount block for table entry `tableIndex`, placed in the lowest free cluster. */
  private async createBlock(tableIndex: number): Promise<void> {
    for (;;) {
      const place = await this.findFreeRun(1);
      const placeTable = Math.floor(place / this.blockEntries);
      const what = this.metadataAt(place);
      if (what)
        throw new CorruptImageError(`refcount of cluster ${place} is 0 but it holds the ${what}; run 'qdedup check -r all'`, {
          offset: place * this.clusterSize,
          structure: 'refcount block',
        });
      if (placeTable !== tableIndex && !this.table[placeTable]) {
        await this.createBlock(placeTable); // describe the place first, then retry
        continue;
      }
      if ((tableIndex + 1) * 8 > MAX_REFTABLE_BYTES)
        throw new CorruptImageError('image too large: the refcount table would exceed 8 MiB', { structure: 'refcount table' });
      const block = Buffer.alloc(this.clusterSize);
      while (this.table.length <= tableIndex) this.table.push(0);
      this.table[tableIndex] = place * this.clusterSize;
      this.tableDirty = true;
      this.blocks.add(tableIndex, block);
      await this.set(place, 1); // counted by itself or by the existing block of placeTable
      this.freeHint = place + 1;
      return;
    }
  }

  /**
   * Makes room for the in-memory table on disk: when it outgrew its clusters, allocates a
   * larger table (in clusters it describes) and queues the old clusters for freeing.
   * Must run before writeDirty(); the header must then be rewritten (tableMoved).
   */
  async prepareTable(): Promise<void> {
    const entriesPerCluster = this.clusterSize / 8;
    if (this.table.length <= this.tableClusters * entriesPerCluster) return;
    let clusters = Math.ceil(this.table.length / entriesPerCluster) + Math.ceil(this.tableClusters / 2) + 1;
    for (;;) {
      if (clusters * this.clusterSize > MAX_REFTABLE_BYTES)
        throw new CorruptImageError('image too large: the refcount table would exceed 8 MiB', { structure: 'refcount table' });
      const offset = await this.allocate(clusters);
      if (this.table.length <= clusters * entriesPerCluster) {
        const oldFirst = this.tableOffset / this.clusterSize;
        for (let i = 0; i < this.tableClusters; i++) this.deferFree(oldFirst + i);
        this.tableOffset = offset;
        this.tableClusters = clusters;
        this.tableMoved = true;
        this.tableDirty = true;
        return;
      }
      // Allocating the table needed so many new blocks that it no longer fits: never written, so free at once.
      for (let i = 0; i < clusters; i++) await this.set(offset / this.clusterSize + i, 0);
      this.freeHint = Math.min(this.freeHint, offset / this.clusterSize);
      clusters *= 2;
    }
  }

  hasDirty(): boolean {
    return this.blocks.dirtyCount > 0 || this.tableDirty;
  }

  dirtyBytes(): number {
    return this.blocks.dirtyCount * this.clusterSize;
  }

  /** Writes dirty blocks, then the table if it changed. The caller syncs. */
  async writeDirty(): Promise<void> {
    await this.blocks.writeDirty(
      (t) => this.table[t],
      (offset, block) => this.file.write(offset, block),
    );
    if (this.tableDirty) {
      // I3: a new block, and the block that counts it, durable before the table names it. In
      // one unsynced window a crash could keep the table and lose the blocks: a table naming a
      // block of stale bytes (the dedup crash enumeration found one placed in a cluster a
      // moved journal had freed: "refcount=0 reference=1").
      await this.file.sync();
      const buf = Buffer.alloc(this.tableClusters * this.clusterSize);
      this.table.forEach((o, i) => writeU64(buf, i * 8, o));
      await this.file.write(this.tableOffset, buf);
      this.tableDirty = false;
    }
  }
}
