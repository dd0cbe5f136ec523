// The dedup holder: an internal QCOW2 snapshot, named `qdedup-dedup-holder`, that holds one
// reference on every host cluster the dedup store indexes. Its L1/L2 tables map "guest"
// cluster P to host cluster P (identity), so whether cluster P is held is one L2 lookup.
// Why it exists: docs/DESIGN.md "The COPIED problem". In short, an indexed cluster then
// always has refcount ≥ 2 while a guest cluster uses it, so COPIED stays clear on every
// active entry pointing at it, stock QEMU never writes into it in place, and every step of
// linking, unlinking and freeing is at worst a leak for `qemu-img check`.
//
// Tables are cached here and written by the image's commit: L2 tables with the active L2
// tables (before their sync), the L1 with the active L1. The L1 has a fixed size chosen at
// creation; clusters past what it covers are simply never indexed.

import { CorruptImageError, hex } from '../errors.ts';
import { decodeL1Entry, decodeL2Entry, encodeL1Entry, encodeL2Entry } from '../format/l1l2.ts';
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
}

/** Holder L1 entries for an image of `virtualSize` bytes: room for twice its data plus 256 MiB. */
export function holderL1Size(virtualSize: number, clusterBits: number): number {
  const perL1 = 2 ** (clusterBits + clusterBits - 3);
  const wanted = Math.ceil((2 * virtualSize + 256 * 1024 * 1024) / perL1);
  return Math.min(wanted, (32 * 1024 * 1024) / 8); // QEMU's largest L1 table
}

export class Holder {
  private readonly clusterSize: number;
  private readonly l2Entries: number;
  private readonly l2Cache = new Map<number, Buffer>();
  private readonly l2Dirty = new Set<number>();
  /** L1 clusters (indices within the L1) to rewrite. */
  private readonly l1Dirty = new Set<number>();

  private constructor(private readonly host: HolderHost, readonly l1Offset: number, readonly l1: Buffer) {
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

  get l1Size(): number {
    return this.l1.length / 8;
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
    const out: number[] = [];
    for (let i = 0; i < this.l1Size; i++) {
      const e = decodeL1Entry(this.l1, i);
      if (e.l2Offset) out.push(e.l2Offset);
    }
    return out;
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

  /** True when host cluster `cluster` is held. Throws if the entry is not the identity (not our holder). */
  async holds(cluster: number): Promise<boolean> {
    if (!this.covers(cluster)) return false;
    const l1Index = Math.floor(cluster / this.l2Entries);
    const t = await this.table(l1Index);
    return t ? this.heldIn(t, l1Index, cluster) : false;
  }

  /**
   * holds() without I/O: the answer when the cluster's holder L2 table is in memory (or
   * absent), undefined when it must be read first (call holds()).
   */
  holdsCached(cluster: number): boolean | undefined {
    if (!this.covers(cluster)) return false;
    const l1Index = Math.floor(cluster / this.l2Entries);
    const t = this.l2Cache.get(l1Index);
    if (t) return this.heldIn(t, l1Index, cluster);
    return decodeL1Entry(this.l1, l1Index).l2Offset === 0 ? false : undefined;
  }

  private heldIn(t: Buffer, l1Index: number, cluster: number): boolean {
    const e = decodeL2Entry(t, cluster % this.l2Entries, this.host.clusterBits);
    if (e.kind === 'unallocated') return false;
    if (e.kind !== 'normal' || e.hostOffset !== cluster * this.clusterSize) {
      throw this.corrupt(`entry for cluster ${hex(cluster * this.clusterSize)} maps ${hex(e.hostOffset)}, not itself`, decodeL1Entry(this.l1, l1Index).l2Offset + (cluster % this.l2Entries) * 8);
    }
    return true;
  }

  /** Holds host cluster `cluster` (the caller has added its reference to the refcount). */
  async hold(cluster: number): Promise<void> {
    const l1Index = Math.floor(cluster / this.l2Entries);
    let t = await this.table(l1Index);
    if (!t) {
      const offset = await this.host.allocate(1);
      this.host.markMetadata(offset, this.clusterSize, 'dedup holder L2 table');
      t = Buffer.alloc(this.clusterSize);
      this.l2Cache.set(l1Index, t);
      encodeL1Entry(this.l1, l1Index, offset, false);
      this.l1Dirty.add(Math.floor((l1Index * 8) / this.clusterSize));
    }
    encodeL2Entry(t, cluster % this.l2Entries, cluster * this.clusterSize, false);
    this.l2Dirty.add(l1Index);
  }

  /**
   * hold() without I/O: when the cluster's holder L2 table is in memory, holds it and returns
   * true; otherwise changes nothing and returns false (call hold()).
   */
  holdCached(cluster: number): boolean {
    const l1Index = Math.floor(cluster / this.l2Entries);
    const t = this.l2Cache.get(l1Index);
    if (!t) return false;
    encodeL2Entry(t, cluster % this.l2Entries, cluster * this.clusterSize, false);
    this.l2Dirty.add(l1Index);
    return true;
  }

  /** Drops the hold on `cluster` (the caller queues the refcount decrement for after the commit). */
  async release(cluster: number): Promise<void> {
    const l1Index = Math.floor(cluster / this.l2Entries);
    const t = await this.table(l1Index);
    if (!t) return;
    encodeL2Entry(t, cluster % this.l2Entries, 0, false);
    this.l2Dirty.add(l1Index);
  }

  /** Writes dirty L2 tables (commit step 3; the caller syncs). */
  async writeTables(): Promise<boolean> {
    if (!this.l2Dirty.size) return false;
    for (const i of [...this.l2Dirty].sort((a, b) => a - b)) await this.host.file.write(decodeL1Entry(this.l1, i).l2Offset, this.l2Cache.get(i)!);
    this.l2Dirty.clear();
    if (this.l2Cache.size * this.clusterSize > 16 * 1024 * 1024) this.l2Cache.clear();
    return true;
  }

  /** Writes the dirty parts of the L1 (commit step 4; the caller syncs). */
  async writeL1(): Promise<boolean> {
    if (!this.l1Dirty.size) return false;
    for (const i of [...this.l1Dirty].sort((a, b) => a - b)) {
      const from = i * this.clusterSize;
      await this.host.file.write(this.l1Offset + from, this.l1.subarray(from, Math.min(this.l1.length, from + this.clusterSize)));
    }
    this.l1Dirty.clear();
    return true;
  }

  private corrupt(what: string, offset: number): CorruptImageError {
    return new CorruptImageError(`dedup holder snapshot: ${what}; it is not qdedup's (delete it with 'qemu-img snapshot -d ${HOLDER_NAME}')`, { offset, structure: 'dedup holder' });
  }
}
