// The refcounts as stored on disk, as check reads and repairs them: the refcount table
// (read whole, ≤ 8 MiB, unvalidated: its entries are what the check judges) and the blocks,
// through the engine's RefcountBlockCache (../refcounts.ts) bounded to MAX_CACHED_REFBLOCKS.
// Unlike the engine's Refcounts, it never refuses a table: an unusable entry reads as
// "cannot get the refcount", as QEMU's qcow2_get_refcount fails.

import { decodeReftableEntry, getRefcount, setRefcount, type ReftableEntry } from '../../format/refcount.ts';
import { RefcountBlockCache } from '../refcounts.ts';
import { sharpHex } from './types.ts';

/** Refcount blocks kept in memory while comparing and repairing. */
const MAX_CACHED_REFBLOCKS = 256;

/** What the reader needs of the check: geometry, clipped reads, guarded writes, the corruption signal. */
export interface StoredRefcountsIo {
  clusterSize: number;
  blockEntries: number;
  refcountOrder: number;
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer): Promise<void>;
  signalCorruption(what: string): void;
}

export class StoredRefcounts {
  readonly entries: number;
  private readonly blocks: RefcountBlockCache;

  constructor(
    private readonly io: StoredRefcountsIo,
    readonly tableOffset: number,
    readonly table: Buffer,
  ) {
    this.entries = table.length / 8;
    this.blocks = new RefcountBlockCache(io.clusterSize, io.read);
  }

  /** Table entry `tableIndex`: the block's masked offset (0 when absent), its halves and reserved bits. */
  blockOffset(tableIndex: number): ReftableEntry {
    return decodeReftableEntry(this.table, tableIndex);
  }

  /** The block covering table entry `tableIndex`, null if none, undefined if unreadable (unaligned). */
  async block(tableIndex: number): Promise<Buffer | null | undefined> {
    if (tableIndex >= this.entries) return null;
    const cached = this.blocks.cached(tableIndex);
    if (cached) return cached;
    const { offset, hi, lo } = this.blockOffset(tableIndex);
    if (offset === 0) return null;
    if (lo % this.io.clusterSize !== 0) {
      this.io.signalCorruption(`Refblock offset ${sharpHex((BigInt(hi) << 32n) | BigInt(lo))} unaligned (reftable index: ${sharpHex(tableIndex)})`);
      return undefined;
    }
    if (this.blocks.size >= MAX_CACHED_REFBLOCKS) await this.blocks.evict(MAX_CACHED_REFBLOCKS / 2, (t) => this.blockOffset(t).offset, this.io.write);
    return this.blocks.read(tableIndex, offset);
  }

  /** Stored refcount of host cluster `clusterIndex`; undefined when it cannot be read. */
  async get(clusterIndex: number): Promise<number | undefined> {
    const per = this.io.blockEntries;
    const t = Math.floor(clusterIndex / per);
    const block = await this.block(t);
    if (block === undefined) return undefined;
    return block ? getRefcount(block, clusterIndex - t * per, this.io.refcountOrder) : 0;
  }

  /** Sets a stored refcount (the block must exist). Returns false when it does not. */
  async set(clusterIndex: number, value: number): Promise<boolean> {
    const per = this.io.blockEntries;
    const t = Math.floor(clusterIndex / per);
    const block = await this.block(t);
    if (!block) return false;
    setRefcount(block, clusterIndex - t * per, this.io.refcountOrder, value);
    this.blocks.markDirty(t);
    return true;
  }

  /** Writes the changed blocks back (the caller syncs). */
  async flush(): Promise<void> {
    await this.blocks.writeDirty((t) => this.blockOffset(t).offset, this.io.write);
  }
}
