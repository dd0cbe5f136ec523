// The state of an open QCOW2 image and its tables: header, active L1, cached L2 tables
// (clean and dirty), the overlap guard over known metadata clusters, guest → host mapping
// with every entry validated, and the L2 tables made writable for a write (copy on write of
// a shared table). ./image-reads.ts, ./image-commit.ts and ./image.ts build on it.

import { CorruptImageError, InternalError, hex } from '../errors.ts';
import { MAX_HOST_OFFSET, MAX_L1_BYTES, clusterSizeOf, l2EntriesOf, type Header } from '../format/header.ts';
import {
  compressedClusterSpan,
  decodeL1Entry,
  decodeL2Entry,
  l2Offsets,
  encodeL1Entry,
  encodeCompressedL2Entry,
  encodeL2Entry,
  UNALLOCATED,
  type L2Entry,
} from '../format/l1l2.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import type { BlockFile } from './block-file.ts';
import type { GuestReader } from './guest-reader.ts';
import type { Refcounts } from './refcounts.ts';
import { readSnapshotTable } from './snapshot-table.ts';
import type { WritePolicy } from './write-policy.ts';

/** Clean L2 tables kept in memory before the cache is emptied of them. */
const MAX_CACHED_L2_BYTES = 64 * 1024 * 1024;

/** The entries of one L2 table, by guest cluster (Image.l2Reader); `allocated`: there is a table. */
export type L2Reader = ((guestCluster: number) => L2Entry) & { readonly allocated: boolean };

/** An open image's state, tables and mapping (the base of Image, ./image.ts). */
export abstract class ImageTables {
  readonly path: string;
  readonly file: BlockFile;
  header: Header;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly l2Entries: number;
  readonly size: number;
  readonly writable: boolean;
  backing: GuestReader | null = null;
  /** The active L1 table (l1Size entries). */
  readonly l1: Buffer;
  protected readonly l1Dirty = new Set<number>();
  protected readonly l2Cache = new Map<number, Buffer>();
  protected readonly l2Dirty = new Set<number>();
  protected refcounts: Refcounts | null = null;
  /** Cluster index → name of the metadata structure there (overlap guard). */
  protected readonly metadata = new Map<number, string>();
  protected headerDirty = false;
  protected closed = false;
  /** The snapshot table, loaded by read-write opens (their tables join the overlap guard). */
  snapshots: SnapshotEntry[] = [];
  /** True when this read-write open rebuilt the refcounts (QCOW2 dirty bit): structures the rebuild does not know, such as the dedup store, were dropped. */
  refcountsRebuilt = false;
  /** The write policy attached at a read-write open (OpenOptions.policy), or null. */
  policy: WritePolicy | null = null;

  protected constructor(path: string, file: BlockFile, header: Header, l1: Buffer, writable: boolean) {
    this.path = path;
    this.file = file;
    this.header = header;
    this.clusterBits = header.clusterBits;
    this.clusterSize = clusterSizeOf(header);
    this.l2Entries = l2EntriesOf(header);
    this.size = header.size;
    this.l1 = l1;
    this.writable = writable;
  }

  /** Reads the snapshot table (bounded by nb_snapshots and QEMU's per-entry limits). */
  async loadSnapshots(): Promise<SnapshotEntry[]> {
    const out = await readSnapshotTable(this.file, this.header.snapshotsOffset, this.header.nbSnapshots);
    for (const [i, e] of out.entries()) {
      if (e.l1TableOffset % this.clusterSize !== 0)
        throw new CorruptImageError(`snapshot ${i} L1 table offset ${hex(e.l1TableOffset)} is not cluster aligned`, {
          path: this.path,
          offset: e.tableOffset,
          structure: 'snapshot table',
        });
      if (e.l1Size * 8 > MAX_L1_BYTES)
        throw new CorruptImageError(`snapshot ${i} L1 table too large (${e.l1Size} entries)`, {
          path: this.path,
          offset: e.tableOffset + 8,
          structure: 'snapshot table',
        });
    }
    this.snapshots = out;
    return out;
  }

  /** Adds [offset, +byteLength) to the overlap guard as `what` (also used by the dedup layer). */
  markMetadata(offset: number, byteLength: number, what: string): void {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + Math.max(byteLength, 1) - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) if (!this.metadata.has(c)) this.metadata.set(c, what);
  }

  protected indexMetadata(): void {
    const h = this.header;
    this.markMetadata(0, this.clusterSize, 'header');
    this.markMetadata(h.refcountTableOffset, h.refcountTableClusters * this.clusterSize, 'refcount table');
    if (h.l1Size) this.markMetadata(h.l1TableOffset, h.l1Size * 8, 'active L1 table');
    for (const l2Offset of l2Offsets(this.l1, h.l1Size)) this.markMetadata(l2Offset, this.clusterSize, 'L2 table');
    if (h.nbSnapshots) {
      this.markMetadata(h.snapshotsOffset, 1, 'snapshot table');
      for (const s of this.snapshots) if (s.l1Size) this.markMetadata(s.l1TableOffset, s.l1Size * 8, 'snapshot L1 table');
    }
  }

  /** Throws CorruptImageError if a data write at [offset, +length) would land on metadata. */
  protected guardDataWrite(hostOffset: number, length: number): void {
    const first = Math.floor(hostOffset / this.clusterSize);
    const last = Math.floor((hostOffset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) {
      const what = this.metadata.get(c);
      if (what)
        throw new CorruptImageError(`preventing a data write at ${hex(c * this.clusterSize)}: it overlaps the ${what}`, {
          path: this.path,
          offset: c * this.clusterSize,
          structure: what,
        });
    }
  }

  // ---------------------------------------------------------------- mapping

  /** Loads the L2 table that L1 entry `l1Index` points at (cached), or null if none. */
  protected async l2Table(l1Index: number): Promise<Buffer | null> {
    const cached = this.l2Cache.get(l1Index);
    if (cached) return cached;
    const l2Offset = this.l2OffsetAt(l1Index);
    if (l2Offset === 0) return null;
    if (this.l2Cache.size * this.clusterSize >= MAX_CACHED_L2_BYTES) {
      for (const k of this.l2Cache.keys()) if (!this.l2Dirty.has(k)) this.l2Cache.delete(k);
    }
    const table = await this.file.read(l2Offset, this.clusterSize);
    this.l2Cache.set(l1Index, table);
    return table;
  }

  /** Where L1 entry `l1Index`'s L2 table is (0: none), validated. */
  protected l2OffsetAt(l1Index: number): number {
    if (l1Index >= this.header.l1Size) return 0;
    const e = decodeL1Entry(this.l1, l1Index);
    if (e.l2Offset % this.clusterSize !== 0) {
      throw new CorruptImageError(`L2 table offset ${hex(e.l2Offset)} unaligned (L1 index: ${hex(l1Index)})`, {
        path: this.path,
        offset: this.header.l1TableOffset + l1Index * 8,
        structure: 'L1 table',
      });
    }
    return e.l2Offset;
  }

  /**
   * Read-only walks (map, dedup-stats, offline dedup): the validated entries of L1 entry
   * `l1Index`'s L2 table, which is read without entering the cache (a walk holds one table at
   * a time) unless already there. `allocated` is false when there is no table (every entry
   * then reads as unallocated).
   */
  async l2Reader(l1Index: number): Promise<L2Reader> {
    const l2Offset = this.l2OffsetAt(l1Index);
    const table = this.l2Cache.get(l1Index) ?? (l2Offset ? await this.file.read(l2Offset, this.clusterSize) : null);
    return Object.assign((guestCluster: number) => this.entryIn(table, l1Index, guestCluster), { allocated: table !== null });
  }

  /** The L2 entry of guest cluster `guestCluster`, validated. */
  async entry(guestCluster: number): Promise<L2Entry> {
    const l1Index = Math.floor(guestCluster / this.l2Entries);
    const table = await this.l2Table(l1Index);
    return this.entryIn(table, l1Index, guestCluster);
  }

  protected entryIn(table: Buffer | null, l1Index: number, guestCluster: number): L2Entry {
    if (!table) return UNALLOCATED;
    const l2Index = guestCluster % this.l2Entries;
    const e = decodeL2Entry(table, l2Index, this.clusterBits);
    if (e.kind === 'compressed') {
      if (e.compressedOffset >= MAX_HOST_OFFSET)
        throw this.l2Corruption(l1Index, l2Index, `compressed cluster offset ${hex(e.compressedOffset)} is beyond the largest host offset`);
    } else if (e.hostOffset % this.clusterSize !== 0) {
      throw this.l2Corruption(l1Index, l2Index, `cluster allocation offset ${hex(e.hostOffset)} unaligned`);
    } else if (e.kind === 'zero' && this.header.version === 2) {
      throw this.l2Corruption(l1Index, l2Index, 'zero cluster flag set in a version 2 image');
    }
    return e;
  }

  protected l2Corruption(l1Index: number, l2Index: number, what: string): CorruptImageError {
    const l2Offset = decodeL1Entry(this.l1, l1Index).l2Offset;
    return new CorruptImageError(`${what} (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(l2Index)})`, {
      path: this.path,
      offset: l2Offset + l2Index * 8,
      structure: 'L2 table',
    });
  }

  protected assertWritable(): Refcounts {
    if (!this.writable || !this.refcounts || this.closed) throw new InternalError('image not open for writing');
    return this.refcounts;
  }

  /**
   * Returns the L2 table for L1 entry `l1Index`, ready to be modified: allocates an empty
   * one when the L1 entry is empty, copies it first when it is shared (COPIED clear).
   */
  protected async l2TableForWrite(l1Index: number): Promise<Buffer> {
    const refcounts = this.assertWritable();
    const l1e = decodeL1Entry(this.l1, l1Index);
    if (l1e.l2Offset !== 0 && l1e.copied) {
      // I4: as for data clusters, COPIED is trusted only for a table the refcounts count
      // (checked once: a dirty table was checked or allocated here).
      if (!this.l2Dirty.has(l1Index) && (await refcounts.get(l1e.l2Offset / this.clusterSize)) === 0) {
        throw new CorruptImageError(`L2 table at ${hex(l1e.l2Offset)} has the COPIED flag but refcount 0 (L1 index: ${hex(l1Index)})`, {
          path: this.path,
          offset: this.header.l1TableOffset + l1Index * 8,
          structure: 'L1 table',
        });
      }
      const table = (await this.l2Table(l1Index))!;
      this.l2Dirty.add(l1Index); // writable until the commit: kept in the cache, mapCluster() needs no I/O
      return table;
    }
    let table: Buffer;
    if (l1e.l2Offset === 0) {
      table = Buffer.alloc(this.clusterSize);
    } else {
      // Shared with a snapshot: copy on write. The data clusters keep their counts (one
      // reference moves from the old table to the copy); the old table loses one.
      table = Buffer.from((await this.l2Table(l1Index))!);
      refcounts.deferFree(l1e.l2Offset / this.clusterSize);
    }
    const offset = await refcounts.allocate(1);
    this.markMetadata(offset, this.clusterSize, 'L2 table');
    encodeL1Entry(this.l1, l1Index, offset, true);
    this.l1Dirty.add(Math.floor((l1Index * 8) / this.clusterSize));
    this.l2Cache.set(l1Index, table);
    this.l2Dirty.add(l1Index);
    return table;
  }

  /** Points guest cluster `guestCluster` at `hostOffset`, without I/O: its L2 table made writable (prepareTables) since the last commit. */
  mapCluster(guestCluster: number, hostOffset: number, copied: boolean): void {
    this.setEntry(guestCluster, hostOffset, copied, false);
  }

  /** Points guest cluster `guestCluster` at a compressed stream of `length` bytes at host byte `offset`, without I/O (as mapCluster). */
  mapCompressed(guestCluster: number, offset: number, length: number): void {
    encodeCompressedL2Entry(this.writableTable(guestCluster), guestCluster % this.l2Entries, this.clusterBits, offset, length);
  }

  /**
   * Sets one L2 entry in a table made writable by l2TableForWrite() since the last commit (it
   * is then cached, COPIED in the L1, and never dropped from the cache). Throws InternalError otherwise.
   */
  protected setEntry(guestCluster: number, hostOffset: number, copied: boolean, zero: boolean): void {
    encodeL2Entry(this.writableTable(guestCluster), guestCluster % this.l2Entries, hostOffset, copied, zero);
  }

  /** The L2 table of `guestCluster`, made writable by l2TableForWrite() since the last commit; InternalError otherwise. */
  private writableTable(guestCluster: number): Buffer {
    this.assertWritable();
    const l1Index = Math.floor(guestCluster / this.l2Entries);
    if (!this.l2Dirty.has(l1Index)) throw new InternalError(`L2 table of guest cluster ${guestCluster} not prepared for writing`);
    return this.l2Cache.get(l1Index)!;
  }

  /** Every host cluster dropReference(`old`) releases a reference of (what the policy's prepareRelease needs). */
  clustersReleasedBy(old: L2Entry): number[] {
    if (old.kind !== 'compressed') {
      const c = this.releasedBy(old);
      return c === null ? [] : [c];
    }
    const [first, last] = compressedClusterSpan(old, this.clusterBits);
    return Array.from({ length: last - first + 1 }, (_, k) => first + k);
  }

  /**
   * The host cluster whose reference dropReference(`old`) drops one by one (through the
   * policy's release when there is one): a normal cluster, or the one a zero cluster keeps
   * allocated (QEMU's zero with allocation). Null for none, and for compressed entries.
   */
  releasedBy(old: L2Entry): number | null {
    return old.kind !== 'compressed' && old.hostOffset !== 0 ? old.hostOffset / this.clusterSize : null;
  }
}
