// An open QCOW2 image: guest reads and writes through L1/L2 tables, copy on write,
// zero clusters, compressed clusters, backing files, and the commit that writes cached
// metadata back in crash-safe order. Spec: docs/interop/qcow2.rst; design: docs/DESIGN.md.
//
// State: open read-only | open read-write (metadata cached, dirty until commit) → closed.
// Every write to the file is checked against the known metadata clusters first, so a
// hostile L2 entry or a wrong refcount can never make us overwrite a table (BRIEF I4).

import { inflateRawSync } from 'node:zlib';
import { dirname, isAbsolute, resolve } from 'node:path';
import { realpath } from 'node:fs/promises';
import { CorruptImageError, InternalError, IoError, QdedupError, UnsupportedError, hex, printable } from '../errors.ts';
import {
  INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_HOST_OFFSET, MAX_L1_BYTES, QCOW_MAGIC, backingFormatOf, clusterSizeOf,
  decodeHeader, encodeHeader, l2EntriesOf, type Header,
} from '../format/header.ts';
import {
  compressedClusterSpan, decodeL1Entry, decodeL2Entry, encodeL1Entry, encodeL2Entry, type L2Entry,
} from '../format/l1l2.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import { isZero } from '../format/bytes.ts';
import { NodeFile, readvFrom, type BlockFile } from './block-file.ts';
import { WriteBehindFile } from './write-behind.ts';
import { BLK_PERM_ALL, LOCK_READ, forceShare, type LockRequest } from './image-lock.ts';
import { Refcounts } from './refcounts.ts';
import { readSnapshotTable } from './snapshot-table.ts';
import { rebuildRefcounts } from './check/check-open-image.ts';

/** Deepest backing chain followed (QEMU has no fixed limit; this bounds hostile chains). */
export const MAX_BACKING_DEPTH = 32;
/** Dirty metadata held in memory before a write commits on its own (bounds RAM, I5). */
const MAX_DIRTY_METADATA_BYTES = 64 * 1024 * 1024;
/** Clean L2 tables kept in memory before the cache is emptied of them. */
const MAX_CACHED_L2_BYTES = 64 * 1024 * 1024;
/** New clusters gathered into one allocation and one write. */
const MAX_BATCH_BYTES = 8 * 1024 * 1024;
/** Largest host run read with one preadv (neighbouring clusters coalesced). */
const MAX_READ_RUN_BYTES = 4 * 1024 * 1024;
/**
 * Host runs up to this size are read synchronously (BlockFile.readvSync): a cached 4 KiB
 * read costs ~3 µs so, ~20 µs through the thread pool. Larger runs go to the pool.
 */
const SYNC_READ_BYTES = 128 * 1024;
/** Reads of one readRange() in flight at once: libuv's thread pool has 4 threads. */
const READS_IN_FLIGHT = 4;
/** Data written past which a sync starts in the background, so the disk writes back while we go on. */
const WRITEBACK_BYTES = 64 * 1024 * 1024;

/** What a guest range reads from: a QCOW2 image or a raw file. */
export interface GuestReader {
  readonly size: number;
  /** Reads guest bytes; ranges past `size` read as zeros. */
  readGuest(guestOffset: number, length: number): Promise<Buffer>;
  /**
   * readGuest() into dst[dstStart…], whatever it held; with `zeros`, ranges known to be
   * zero without I/O are left as they are and listed there (see Image.readRange).
   */
  readGuestInto?(dst: Buffer, dstStart: number, guestOffset: number, length: number, zeros?: number[]): Promise<void>;
  close(): Promise<void>;
}

export interface OpenOptions {
  writable?: boolean;
  /** Internal: backing chain depth and visited files, to bound hostile chains. */
  chain?: string[];
  /** Test hook: a file implementation to use instead of opening `path`. */
  file?: BlockFile;
  /** false: do not open the backing chain (`info`, like qemu-img info; guest reads then see no backing data). */
  backing?: boolean;
  /**
   * Read-write opens: attaches the write policy of a layer above the engine (inline dedup:
   * src/dedup/open.ts openForWrite passes it). Called once the image is ready for writes;
   * null when the policy has nothing to do for this image. Without one, writes are plain
   * QCOW2 writes and the structures of such a layer are left alone.
   */
  policy?: AttachPolicy;
  /**
   * Read-write opens: the autoclear bits to keep, given the header (the spec clears every bit
   * the writer does not maintain before its first write). Given by the layer that maintains
   * them; without it every autoclear bit is cleared.
   */
  keepAutoclear?: (header: Header) => bigint;
  /**
   * Read-write opens: whole clusters of zeros written without a policy become zero clusters
   * instead of data (qemu-img convert's sparse target, QEMU's detect-zeroes=unmap). A write
   * policy decides zeros for itself (inline dedup always does this).
   */
  detectZeroes?: boolean;
  /**
   * QEMU's image locks to take on the file (./image-lock.ts: LOCK_INFO, LOCK_READ,
   * LOCK_WRITE, or forceShare(…) for -U); none when absent. Backing files then get
   * LOCK_READ (force-shared when this is), as QEMU opens backing images.
   */
  lock?: LockRequest;
}

/** The locks of a backing file opened under an image locked with `lock` (none without). */
export function backingLock(lock: LockRequest | undefined): LockRequest | undefined {
  if (!lock) return undefined;
  return lock.shared === BLK_PERM_ALL ? forceShare(LOCK_READ) : LOCK_READ;
}

/** Guest bytes stored at a host offset, going to dst[dstOffset…] in a read. */
interface DataPiece {
  hostOffset: number;
  dstOffset: number;
  byteLength: number;
}

/** One whole guest cluster of a write, waiting for a new host cluster (or a policy's decision). */
export interface ClusterWrite {
  guestCluster: number;
  /** Its new bytes (a view of the caller's buffer, valid until the batch is written). */
  data: Buffer;
  /** The L2 entry it replaces (its reference is dropped after the replacement is mapped). */
  old: L2Entry;
  /** Its index among the clusters of the prepared chunk it came from (PreparedChunk), or -1. */
  prepared: number;
}

/**
 * A chunk of a long write, prepared ahead (WritePolicy.prepare: its clusters hashed on
 * another thread while the chunk before it is written). `count` whole guest clusters start
 * at byte `start` of the chunk; `result` is the policy's, handed back to writeClusters.
 */
export interface PreparedChunk {
  start: number;
  count: number;
  result: unknown;
}

/**
 * What a layer above the engine (inline deduplication) does at the engine's write and commit
 * points. The engine calls these hooks and never knows what is behind them; the layer acts
 * on the image only through the ImageWriter it was given. Each commit hook names the step
 * of the commit order (Image.flush, docs/DESIGN.md) it belongs to.
 */
export interface WritePolicy {
  /**
   * Optional: starts the work writeClusters will need for the `count` whole clusters of
   * `chunk` from byte `start` (the write pipeline calls it for the chunk it writes next,
   * while the current one is written). `chunk` does not change until the write of it ends.
   */
  prepare?(chunk: Buffer, start: number, count: number): Promise<unknown>;
  /**
   * Writes a batch of whole guest clusters (in guest order) in place of the engine's one
   * new run. Every old reference must be dropped (ImageWriter.dropReference) after its
   * replacement is mapped. `prepared`: the result of prepare() for the chunk the batch's
   * clusters with `prepared` ≥ 0 come from.
   */
  writeClusters(batch: ClusterWrite[], prepared?: unknown): Promise<void>;
  /** Reads what release() of these host clusters needs into memory (the engine calls it before a release of its own). */
  prepareRelease(clusters: number[]): Promise<void>;
  /**
   * A guest reference to uncompressed host cluster `cluster` goes: the policy queues the
   * decrement(s) with ImageWriter.deferFree (I2: after whatever must be durable first).
   * Decides without I/O (prepareRelease() first); returns a promise only when it started
   * I/O that must end before the next decision.
   */
  release(cluster: number): Promise<void> | undefined;
  /** Commit step 2, before the refcount increments are written and synced (I2: hash deletions durable before any free). */
  beforeRefcounts(): Promise<void>;
  /** Commit step 4: writes the policy's own tables with the L2 tables (the engine syncs). True when it wrote any. */
  writeL2Tables(): Promise<boolean>;
  /** Commit step 5: writes the policy's own L1 with the L1 (the engine syncs). True when it wrote any. */
  writeL1(): Promise<boolean>;
  /** Commit step 6 done: the queued decrements are applied. */
  afterFrees(): void;
  /** Clean close, after the last commit (I3: e.g. a dirty flag cleared only now). */
  close(): Promise<void>;
}

/** Makes the write policy of a read-write open, given the image (to read) and its writer (to change it); null for none. */
export type AttachPolicy = (image: Image, writer: ImageWriter) => Promise<WritePolicy | null>;

/**
 * The narrow interface through which a write policy changes an image open for writing: the
 * engine's allocation, data runs, mapping, references and refcounts, the header's extension
 * and snapshot table fields, and the overlap guard. Nothing else of Image's internals.
 */
export interface ImageWriter {
  readonly file: BlockFile;
  readonly clusterSize: number;
  readonly clusterBits: number;
  /** Largest refcount the image's refcount width holds. */
  readonly refcountMax: number;
  /** Allocates `n` contiguous clusters (refcount 1) and returns the host offset of the first. */
  allocate(n: number): Promise<number>;
  /** Allocates one contiguous run and writes `clusters` there with one call. Returns its host offset. */
  writeRun(clusters: Buffer[]): Promise<number>;
  /**
   * Makes the L2 tables of these guest clusters writable (allocation; before a run is
   * allocated, so that the run stays contiguous). They stay writable until the next commit.
   */
  prepareTables(guestClusters: number[]): Promise<void>;
  /** Points guest cluster `guestCluster` at `hostOffset`, without I/O: its table prepared. */
  mapCluster(guestCluster: number, hostOffset: number, copied: boolean): void;
  /** True when entry `old` already reads as zeros and holds no cluster: zeroCluster() changes nothing and needs no table. */
  readsAsZeros(old: L2Entry): boolean;
  /**
   * Makes whole guest cluster `guestCluster`, whose entry was `old`, read as zeros and drops
   * `old`'s reference, without I/O: its table prepared, the policy's release prepared. A
   * promise only when the release returned one.
   */
  zeroCluster(guestCluster: number, old: L2Entry): Promise<void> | undefined;
  /** Drops the references an old L2 entry held (the policy's release for releasedBy(old)), without I/O; a promise as zeroCluster. */
  dropReference(old: L2Entry): Promise<void> | undefined;
  /** The host cluster dropReference(`old`) hands to the policy's release, or null (prepare its release first). */
  releasedBy(old: L2Entry): number | null;
  /** Reads the refcount blocks of these host clusters into memory (until the next fetch). */
  fetchRefcounts(clusters: Iterable<number>): Promise<void>;
  /** Refcount of host cluster `cluster`, without I/O: its block fetched (or allocated) since the last fetch. */
  refcount(cluster: number): number;
  /** Adds one reference to `cluster`, without I/O (its block fetched or allocated); written with the commit's increments. Throws past the maximum. */
  increment(cluster: number): number;
  /** Queues one reference of `cluster` to be dropped at the commit, after the tables are durable (step 6). */
  deferFree(cluster: number): void;
  /** Adds a host range to the overlap guard as `what`. */
  markMetadata(offset: number, byteLength: number, what: string): void;
  /** Sets header extension `type` to `data` (added when absent) and sets `autoclear` bits; writes the header, then syncs. */
  writeExtension(type: number, data: Buffer, autoclear: bigint): Promise<void>;
  /** Points the header at a snapshot table (durable already) of `count` entries; writes the header, syncs, reloads the snapshots. */
  setSnapshotTable(offset: number, count: number): Promise<void>;
  /** Commits every cached change (Image.flush). */
  commit(): Promise<void>;
}

export class Image implements GuestReader {
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
  private readonly l1Dirty = new Set<number>();
  private readonly l2Cache = new Map<number, Buffer>();
  private readonly l2Dirty = new Set<number>();
  private refcounts: Refcounts | null = null;
  /** Cluster index → name of the metadata structure there (overlap guard). */
  private readonly metadata = new Map<number, string>();
  private headerDirty = false;
  private lastCompressed: { offset: number; data: Buffer } | null = null;
  /** OpenOptions.detectZeroes. */
  private detectZeroes = false;
  /** Set during a write() of a prepared chunk: where its new clusters are written behind. */
  private behind: WriteBehindFile | null = null;
  /** Data bytes written since the last background sync started. */
  private unsyncedBytes = 0;
  /** A background sync in flight (see WRITEBACK_BYTES), and the error it met, if any. */
  private writeback: Promise<void> | null = null;
  private writebackError: unknown = null;
  private closed = false;
  /** The snapshot table, loaded by read-write opens (their tables join the overlap guard). */
  snapshots: SnapshotEntry[] = [];
  /** True when this read-write open rebuilt the refcounts (QCOW2 dirty bit): structures the rebuild does not know, such as the dedup store, were dropped. */
  refcountsRebuilt = false;
  /** The write policy attached at a read-write open (OpenOptions.policy), or null. */
  policy: WritePolicy | null = null;

  private constructor(path: string, file: BlockFile, header: Header, l1: Buffer, writable: boolean) {
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

  /**
   * Opens and validates an image. Read-write opens refuse corrupt images, clear unknown
   * autoclear bits (synced before any other write) and rebuild refcounts of dirty images.
   * Throws NotQcow2Error, CorruptImageError, UnsupportedError or IoError.
   */
  static async open(path: string, options: OpenOptions = {}): Promise<Image> {
    const writable = options.writable ?? false;
    const opened = options.file ?? (await NodeFile.open(path, writable, options.lock));
    // A writer's data runs may be written behind (./write-behind.ts: the write pipeline).
    const file = writable ? new WriteBehindFile(opened) : opened;
    let image: Image | undefined;
    try {
      image = await Image.load(path, file, writable);
      if (options.backing !== false) await image.openBacking(options.chain ?? [], backingLock(options.lock));
      if (writable) {
        await image.prepareForWrites(options.keepAutoclear?.(image.header) ?? 0n);
        image.detectZeroes = options.detectZeroes ?? false;
        if (options.policy) image.policy = await options.policy(image, image.writer());
      }
      return image;
    } catch (err) {
      await file.close().catch(() => {});
      await image?.backing?.close().catch(() => {});
      // Name the file the error is in (this image, not the top of its backing chain) when
      // the thrower could not: header decoding is pure and knows no path.
      if (err instanceof QdedupError && !err.details.path) err.details.path = path;
      throw err;
    }
  }

  private static async load(path: string, file: BlockFile, writable: boolean): Promise<Image> {
    const fileSize = await file.size();
    const first = await file.read(0, Math.min(fileSize, 104));
    let clusterBytes = 512;
    if (first.length >= 24) {
      const bits = first.readUInt32BE(20);
      if (bits >= 9 && bits <= 21) clusterBytes = 2 ** bits;
    }
    const headBuf = (await file.read(0, clusterBytes)).subarray(0, Math.max(Math.min(fileSize, clusterBytes), 0));
    const header = decodeHeader(headBuf);
    const l1 = header.l1Size ? await file.read(header.l1TableOffset, header.l1Size * 8) : Buffer.alloc(0);
    return new Image(path, file, header, l1, writable);
  }

  private async openBacking(chain: string[], lock: LockRequest | undefined): Promise<void> {
    const name = this.header.backingFile;
    if (name === undefined) return;
    const where = { path: this.path, structure: 'backing file name', offset: this.header.backingFileOffset };
    if (name.includes('\0')) throw new CorruptImageError('backing file name contains a NUL byte', where);
    const shown = printable(name);
    if (/^[a-z][a-z0-9+.-]*:/i.test(name) && !isAbsolute(name)) throw new UnsupportedError(`backing file '${shown}': protocols are not supported`, where);
    const backingPath = isAbsolute(name) ? name : resolve(dirname(this.path), name);
    const self = await realpath(this.path).catch(() => resolve(this.path));
    const visited = [...chain, self];
    if (visited.length > MAX_BACKING_DEPTH) throw new CorruptImageError(`backing chain deeper than ${MAX_BACKING_DEPTH} images`, where);
    const target = await realpath(backingPath).catch(() => {
      throw new IoError(`cannot open backing file '${shown}': No such file or directory`, { path: printable(backingPath) }, 'ENOENT');
    });
    if (visited.includes(target)) throw new CorruptImageError(`backing chain loops back to '${shown}'`, where);
    const format = backingFormatOf(this.header) ?? (await probeFormat(target));
    if (format === 'qcow2') this.backing = await Image.open(target, { chain: visited, lock });
    else if (format === 'raw') this.backing = await RawImage.open(target, lock);
    else throw new UnsupportedError(`backing file format '${format}' is not supported (qcow2 or raw)`, where);
  }

  /** Read-write open: refuse corrupt images, clear foreign autoclear bits, load refcounts. */
  private async prepareForWrites(keepAutoclear: bigint): Promise<void> {
    const h = this.header;
    if (h.incompatibleFeatures & INCOMPAT_CORRUPT) {
      throw new CorruptImageError("image is marked corrupt (incompatible bit 1); it can only be opened read-only or repaired with 'qdedup check -r all'", { path: this.path, structure: 'header', offset: 72 });
    }
    if (h.incompatibleFeatures & INCOMPAT_DIRTY) {
      // Refcounts may be stale: rebuild them (and clear the bit) before they are loaded and
      // before any write; the rebuild clears foreign autoclear bits before its own first write.
      await rebuildRefcounts(this);
      this.refcountsRebuilt = true;
    }
    if (h.nbSnapshots > 0) await this.loadSnapshots(); // their tables join the overlap guard
    this.indexMetadata();
    this.refcounts = await Refcounts.load(this.file, {
      clusterBits: this.clusterBits, refcountOrder: h.refcountOrder,
      tableOffset: h.refcountTableOffset, tableClusters: h.refcountTableClusters,
    }, (c) => this.metadata.get(c), (c) => this.metadata.delete(c));
    for (const offset of this.refcounts.blockOffsets()) this.markMetadata(offset, this.clusterSize, 'refcount block');
    // Every autoclear bit qdedup does not maintain must be cleared before the first write
    // (the spec's rule); the layer above names the bits it maintains (dedup: bit 60, on dedup images).
    if (h.autoclearFeatures & ~keepAutoclear) {
      h.autoclearFeatures &= keepAutoclear;
      await this.writeHeader();
      await this.file.sync(); // the cleared bits reach disk before any data write
    }
  }

  /** Reads the snapshot table (bounded by nb_snapshots and QEMU's per-entry limits). */
  async loadSnapshots(): Promise<SnapshotEntry[]> {
    const out = await readSnapshotTable(this.file, this.header.snapshotsOffset, this.header.nbSnapshots);
    for (const [i, e] of out.entries()) {
      if (e.l1TableOffset % this.clusterSize !== 0) throw new CorruptImageError(`snapshot ${i} L1 table offset ${hex(e.l1TableOffset)} is not cluster aligned`, { path: this.path, offset: e.tableOffset, structure: 'snapshot table' });
      if (e.l1Size * 8 > MAX_L1_BYTES) throw new CorruptImageError(`snapshot ${i} L1 table too large (${e.l1Size} entries)`, { path: this.path, offset: e.tableOffset + 8, structure: 'snapshot table' });
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

  private indexMetadata(): void {
    const h = this.header;
    this.markMetadata(0, this.clusterSize, 'header');
    this.markMetadata(h.refcountTableOffset, h.refcountTableClusters * this.clusterSize, 'refcount table');
    if (h.l1Size) this.markMetadata(h.l1TableOffset, h.l1Size * 8, 'active L1 table');
    for (let i = 0; i < h.l1Size; i++) {
      const e = decodeL1Entry(this.l1, i);
      if (e.l2Offset) this.markMetadata(e.l2Offset, this.clusterSize, 'L2 table');
    }
    if (h.nbSnapshots) {
      this.markMetadata(h.snapshotsOffset, 1, 'snapshot table');
      for (const s of this.snapshots) if (s.l1Size) this.markMetadata(s.l1TableOffset, s.l1Size * 8, 'snapshot L1 table');
    }
  }

  /** Throws CorruptImageError if a data write at [offset, +length) would land on metadata. */
  private guardDataWrite(hostOffset: number, length: number): void {
    const first = Math.floor(hostOffset / this.clusterSize);
    const last = Math.floor((hostOffset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) {
      const what = this.metadata.get(c);
      if (what) throw new CorruptImageError(`preventing a data write at ${hex(c * this.clusterSize)}: it overlaps the ${what}`, { path: this.path, offset: c * this.clusterSize, structure: what });
    }
  }

  // ---------------------------------------------------------------- mapping

  /** Loads the L2 table that L1 entry `l1Index` points at (cached), or null if none. */
  private async l2Table(l1Index: number): Promise<Buffer | null> {
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
  private l2OffsetAt(l1Index: number): number {
    if (l1Index >= this.header.l1Size) return 0;
    const e = decodeL1Entry(this.l1, l1Index);
    if (e.l2Offset % this.clusterSize !== 0) {
      throw new CorruptImageError(`L2 table offset ${hex(e.l2Offset)} unaligned (L1 index: ${hex(l1Index)})`, { path: this.path, offset: this.header.l1TableOffset + l1Index * 8, structure: 'L1 table' });
    }
    return e.l2Offset;
  }

  /**
   * Read-only walks (map): the validated entries of L1 entry `l1Index`'s L2 table, which is
   * read without entering the cache (a walk holds one table at a time) unless already there.
   */
  async l2Reader(l1Index: number): Promise<(guestCluster: number) => L2Entry> {
    const l2Offset = this.l2OffsetAt(l1Index);
    const table = this.l2Cache.get(l1Index) ?? (l2Offset ? await this.file.read(l2Offset, this.clusterSize) : null);
    return (guestCluster) => this.entryIn(table, l1Index, guestCluster);
  }

  /** The L2 entry of guest cluster `guestCluster`, validated. */
  async entry(guestCluster: number): Promise<L2Entry> {
    const l1Index = Math.floor(guestCluster / this.l2Entries);
    const table = await this.l2Table(l1Index);
    return this.entryIn(table, l1Index, guestCluster);
  }

  /**
   * The entries of the L2 table L1 entry `l1Index` points at, each validated as entry()
   * validates it, or null when there is none (for walks over every mapping: dedup-stats).
   */
  async l2TableEntries(l1Index: number): Promise<L2Entry[] | null> {
    const table = await this.l2Table(l1Index);
    if (!table) return null;
    return Array.from({ length: this.l2Entries }, (_, j) => this.entryIn(table, l1Index, l1Index * this.l2Entries + j));
  }

  private entryIn(table: Buffer | null, l1Index: number, guestCluster: number): L2Entry {
    if (!table) return UNALLOCATED;
    const l2Index = guestCluster % this.l2Entries;
    const e = decodeL2Entry(table, l2Index, this.clusterBits);
    if (e.kind === 'compressed') {
      if (e.compressedOffset >= MAX_HOST_OFFSET) throw this.l2Corruption(l1Index, l2Index, `compressed cluster offset ${hex(e.compressedOffset)} is beyond the largest host offset`);
    } else if (e.hostOffset % this.clusterSize !== 0) {
      throw this.l2Corruption(l1Index, l2Index, `cluster allocation offset ${hex(e.hostOffset)} unaligned`);
    } else if (e.kind === 'zero' && this.header.version === 2) {
      throw this.l2Corruption(l1Index, l2Index, 'zero cluster flag set in a version 2 image');
    }
    return e;
  }

  private l2Corruption(l1Index: number, l2Index: number, what: string): CorruptImageError {
    const l2Offset = decodeL1Entry(this.l1, l1Index).l2Offset;
    return new CorruptImageError(`${what} (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(l2Index)})`, { path: this.path, offset: l2Offset + l2Index * 8, structure: 'L2 table' });
  }

  // ---------------------------------------------------------------- reads

  /** Reads `length` guest bytes at `guestOffset`; the range must lie inside the disk. */
  async read(guestOffset: number, length: number): Promise<Buffer> {
    this.checkRange(guestOffset, length);
    const dst = Buffer.allocUnsafe(length);
    await this.readRange(dst, 0, guestOffset, length);
    return dst;
  }

  async readGuest(guestOffset: number, length: number): Promise<Buffer> {
    const dst = Buffer.allocUnsafe(length);
    await this.readGuestInto(dst, 0, guestOffset, length);
    return dst;
  }

  async readGuestInto(dst: Buffer, dstStart: number, guestOffset: number, length: number, zeros?: number[]): Promise<void> {
    const inside = Math.max(0, Math.min(length, this.size - guestOffset));
    if (inside > 0) await this.readRange(dst, dstStart, guestOffset, inside, zeros);
    if (inside < length) zeroRange(dst, dstStart + inside, dstStart + length, zeros);
  }

  /**
   * Splits the guest range [guestOffset, +length) at cluster boundaries. Each piece: its
   * guest cluster, the offset inside it, its length, its guest offset and its distance
   * from guestOffset.
   */
  private *pieces(guestOffset: number, length: number): Generator<{ guestCluster: number; inCluster: number; n: number; pos: number; done: number }> {
    for (let pos = guestOffset; pos < guestOffset + length;) {
      const guestCluster = Math.floor(pos / this.clusterSize);
      const inCluster = pos - guestCluster * this.clusterSize;
      const n = Math.min(this.clusterSize - inCluster, guestOffset + length - pos);
      yield { guestCluster, inCluster, n, pos, done: pos - guestOffset };
      pos += n;
    }
  }

  /**
   * Reads guest bytes [guestOffset, +length) (inside the disk) into dst[dstStart…], whatever
   * dst held before. Ranges that read as zeros without I/O (zero clusters, unallocated
   * clusters without backing data) are zero-filled; when `zeros` is given they are left as
   * they are instead and appended to it as [dstStart, dstEnd) pairs, in order and merged,
   * so a caller can skip them (read's sparse output).
   *
   * Cost: one await per L2 table, then one synchronous pass over the entries; the data
   * pieces are sorted by host offset and read with one preadv per contiguous host run
   * (which gathers the scattered clusters of a dedup image written in one go): large runs
   * through the thread pool, up to READS_IN_FLIGHT at once, small ones synchronously
   * meanwhile (SYNC_READ_BYTES); a host range read twice in a call is read once and copied.
   */
  async readRange(dst: Buffer, dstStart: number, guestOffset: number, length: number, zeros?: number[]): Promise<void> {
    this.checkRange(guestOffset, length);
    if (length === 0) return;
    const cs = this.clusterSize;
    const firstCluster = Math.floor(guestOffset / cs);
    const lastCluster = Math.floor((guestOffset + length - 1) / cs);
    const firstTable = Math.floor(firstCluster / this.l2Entries);
    const tables: (Buffer | null)[] = [];
    for (let t = firstTable; t <= Math.floor(lastCluster / this.l2Entries); t++) tables.push(await this.l2Table(t));

    // The plan, in one synchronous pass: data pieces, and tasks for the rest.
    const pieces: DataPiece[] = [];
    let sorted = true;
    const tasks: (() => Promise<void>)[] = [];
    const ownZeros: number[] = [];
    const backingZeros: number[][] = [];
    let backingDst = -1; // a pending run of guest bytes that come from the backing file
    let backingGuest = 0;
    let backingLen = 0;
    const flushBacking = () => {
      if (backingLen === 0) return;
      const [at, pos, n] = [backingDst, backingGuest, backingLen];
      const backing = this.backing!;
      // Each backing read lists its zeros apart: they finish in any order (merged below).
      const listed = zeros ? [] as number[] : undefined;
      if (listed) backingZeros.push(listed);
      if (backing.readGuestInto) tasks.push(() => backing.readGuestInto!(dst, at, pos, n, listed));
      else tasks.push(async () => { (await backing.readGuest(pos, n)).copy(dst, at); });
      backingLen = 0;
    };
    for (let pos = guestOffset, end = guestOffset + length; pos < end;) {
      const guestCluster = Math.floor(pos / cs);
      const inCluster = pos - guestCluster * cs;
      const n = Math.min(cs - inCluster, end - pos);
      const at = dstStart + (pos - guestOffset);
      const l1Index = Math.floor(guestCluster / this.l2Entries);
      const e = this.entryIn(tables[l1Index - firstTable], l1Index, guestCluster);
      if (e.kind === 'unallocated' && this.backing) {
        if (backingLen > 0 && backingGuest + backingLen === pos) backingLen += n;
        else {
          flushBacking();
          [backingDst, backingGuest, backingLen] = [at, pos, n];
        }
      } else {
        flushBacking();
        if (e.kind === 'normal') {
          const hostOffset = e.hostOffset + inCluster;
          const last = pieces[pieces.length - 1];
          if (last && last.hostOffset + last.byteLength === hostOffset && last.dstOffset + last.byteLength === at) last.byteLength += n;
          else {
            if (last && hostOffset < last.hostOffset) sorted = false;
            pieces.push({ hostOffset, dstOffset: at, byteLength: n });
          }
        } else if (e.kind === 'compressed') {
          tasks.push(async () => { (await this.decompress(e)).copy(dst, at, inCluster, inCluster + n); });
        } else {
          zeroRange(dst, at, at + n, zeros ? ownZeros : undefined); // zero, or unallocated without backing
        }
      }
      pos += n;
    }
    flushBacking();
    if (!sorted) pieces.sort((a, b) => a.hostOffset - b.hostOffset || a.byteLength - b.byteLength);

    // Host-contiguous pieces become one preadv; a piece that repeats the one before it
    // (a cluster shared by dedup, read twice in this range) is copied once that is read.
    const copies: [DataPiece, DataPiece][] = [];
    const syncReads: [number, Buffer[]][] = [];
    for (let i = 0; i < pieces.length;) {
      const group = [pieces[i]];
      let hostEnd = pieces[i].hostOffset + pieces[i].byteLength;
      let bytes = pieces[i].byteLength;
      let j = i + 1;
      for (; j < pieces.length; j++) {
        const p = pieces[j];
        const prev = pieces[j - 1];
        if (p.hostOffset === prev.hostOffset && p.byteLength === prev.byteLength) {
          copies.push([p, copies.length && copies[copies.length - 1][0] === prev ? copies[copies.length - 1][1] : prev]);
          continue;
        }
        if (p.hostOffset !== hostEnd || bytes + p.byteLength > MAX_READ_RUN_BYTES) break;
        group.push(p);
        hostEnd += p.byteLength;
        bytes += p.byteLength;
      }
      const hostOffset = group[0].hostOffset;
      const views = group.map((p) => dst.subarray(p.dstOffset, p.dstOffset + p.byteLength));
      if (bytes <= SYNC_READ_BYTES && this.file.readvSync) syncReads.push([hostOffset, views]);
      else tasks.push(() => readvFrom(this.file, hostOffset, views));
      i = j;
    }
    // The large reads go to the thread pool first; the small ones run here meanwhile.
    const pending = inParallel(tasks, READS_IN_FLIGHT);
    try {
      for (const [hostOffset, views] of syncReads) this.file.readvSync!(hostOffset, views);
    } finally {
      await pending; // (its error, if both failed)
    }
    for (const [p, from] of copies) dst.copy(dst, p.dstOffset, from.dstOffset, from.dstOffset + from.byteLength);
    if (zeros) appendMerged(zeros, ownZeros.concat(...backingZeros));
  }

  /** Inflates a compressed cluster (raw deflate) to exactly one cluster of bytes. */
  private async decompress(e: L2Entry): Promise<Buffer> {
    if (this.lastCompressed?.offset === e.compressedOffset) return this.lastCompressed.data;
    const input = await this.file.read(e.compressedOffset, e.compressedLength);
    let data: Buffer;
    try {
      data = inflateRawSync(input, { finishFlush: 2 /* Z_SYNC_FLUSH: the stream may end mid-sector */, maxOutputLength: this.clusterSize });
    } catch (err) {
      throw new CorruptImageError(`compressed cluster at ${hex(e.compressedOffset)} does not inflate: ${(err as Error).message}`, { path: this.path, offset: e.compressedOffset, structure: 'compressed cluster' });
    }
    if (data.length < this.clusterSize) {
      throw new CorruptImageError(`compressed cluster at ${hex(e.compressedOffset)} inflates to ${data.length} bytes, not ${this.clusterSize}`, { path: this.path, offset: e.compressedOffset, structure: 'compressed cluster' });
    }
    this.lastCompressed = { offset: e.compressedOffset, data };
    return data;
  }

  private checkRange(guestOffset: number, length: number): void {
    if (!Number.isSafeInteger(guestOffset) || !Number.isSafeInteger(length) || guestOffset < 0 || length < 0 || guestOffset + length > this.size) {
      throw new QdedupError(`offset ${guestOffset} + length ${length} is outside the virtual disk (${this.size} bytes)`, 'ERANGE', 1, { path: this.path });
    }
  }

  // ---------------------------------------------------------------- writes

  private assertWritable(): Refcounts {
    if (!this.writable || !this.refcounts || this.closed) throw new InternalError('image not open for writing');
    return this.refcounts;
  }

  /**
   * Writes `data` at guest offset `guestOffset` (any alignment). Clusters owned by this
   * L2 entry alone (COPIED) are written in place; every other cluster (unallocated, zero,
   * compressed, shared) gets a new host cluster, filled from the old contents where the
   * write covers it only in part. Metadata is committed by flush()/close().
   */
  async write(guestOffset: number, data: Buffer, prepared?: PreparedChunk): Promise<void> {
    this.checkRange(guestOffset, data.length);
    this.assertWritable();
    // A prepared chunk comes from the write pipeline, which keeps it unchanged until
    // settled(): its new clusters are written behind. Other callers get their buffer back.
    this.behind = prepared && this.file instanceof WriteBehindFile ? this.file : null;
    try {
      await this.writeClusters(guestOffset, data, prepared);
    } finally {
      this.behind = null;
    }
  }

  /** Resolves when the writes behind started so far have ended (the write pipeline may then reuse their buffers). */
  async settled(): Promise<void> {
    if (this.file instanceof WriteBehindFile) await this.file.settled();
  }

  private async writeClusters(guestOffset: number, data: Buffer, prepared?: PreparedChunk): Promise<void> {
    let batch: ClusterWrite[] = [];
    let table: Buffer | null = null;
    let tableIndex = -1; // the L1 index `table` belongs to (-1: read it again)
    for (const { guestCluster, inCluster, n, done } of this.pieces(guestOffset, data.length)) {
      const part = data.subarray(done, done + n);
      const l1Index = Math.floor(guestCluster / this.l2Entries);
      if (l1Index !== tableIndex) {
        table = await this.l2Table(l1Index); // once per table, not per cluster
        tableIndex = l1Index;
      }
      const old = this.entryIn(table, l1Index, guestCluster);
      if (old.kind === 'normal' && old.copied && !this.policy) {
        this.guardDataWrite(old.hostOffset + inCluster, n);
        // I4: COPIED is trusted only for a cluster the refcounts count. A hostile entry
        // (say at 1 TiB, past every refcount block) had us grow the file to 1 TiB.
        if ((await this.assertWritable().get(old.hostOffset / this.clusterSize)) === 0) {
          throw this.l2Corruption(Math.floor(guestCluster / this.l2Entries), guestCluster % this.l2Entries, `data cluster ${hex(old.hostOffset)} has the COPIED flag but refcount 0`);
        }
        await this.file.write(old.hostOffset + inCluster, part);
        this.startWriteback(n);
      } else {
        // A new host cluster: always with dedup (allocate on rewrite), else when not ours alone.
        // Whole clusters stay views of the caller's buffer: the batch is written before write() returns.
        let full = part;
        if (n < this.clusterSize) {
          full = await this.readCluster(guestCluster, old);
          part.copy(full, inCluster);
        }
        const at = prepared && n === this.clusterSize ? (done - prepared.start) / this.clusterSize : -1;
        batch.push({ guestCluster, data: full, old, prepared: at >= 0 && at < prepared!.count && Number.isInteger(at) ? at : -1 });
        if (batch.length * this.clusterSize >= MAX_BATCH_BYTES) {
          await this.writeBatch(batch, prepared?.result);
          batch = [];
          tableIndex = -1; // the batch may have replaced the table (copy on write)
        }
      }
    }
    if (batch.length) await this.writeBatch(batch, prepared?.result);
    await this.commitIfLarge();
  }

  /**
   * Starts the policy's work on `chunk`, which write() will be given next at guest offset
   * `guestOffset` (the write pipeline, ./write-pipeline.ts); null when there is none to do.
   */
  prepare(chunk: Buffer, guestOffset: number): Promise<PreparedChunk> {
    const start = (this.clusterSize - (guestOffset % this.clusterSize)) % this.clusterSize;
    const count = Math.max(0, Math.floor((chunk.length - start) / this.clusterSize));
    if (!this.policy?.prepare) return Promise.resolve({ start, count, result: undefined });
    return this.policy.prepare(chunk, start, count).then((result) => ({ start, count, result }));
  }

  private async writeBatch(batch: ClusterWrite[], prepared?: unknown): Promise<void> {
    if (this.policy) await this.policy.writeClusters(batch, prepared);
    else await this.writeNewClusters(batch);
  }

  /** The whole current content of a guest cluster (a fresh buffer). */
  private async readCluster(guestCluster: number, e: L2Entry): Promise<Buffer> {
    const guestOffset = guestCluster * this.clusterSize;
    switch (e.kind) {
      case 'normal': return this.file.read(e.hostOffset, this.clusterSize);
      case 'compressed': return Buffer.from(await this.decompress(e));
      case 'zero': return Buffer.alloc(this.clusterSize);
      case 'unallocated': return this.backing ? this.backing.readGuest(guestOffset, this.clusterSize) : Buffer.alloc(this.clusterSize);
    }
  }

  /**
   * Allocates one contiguous run for the batch, writes it with one call, then maps it. With
   * detectZeroes, whole clusters of zeros become zero clusters instead.
   */
  private async writeNewClusters(batch: ClusterWrite[]): Promise<void> {
    let data = batch;
    // (A v2 image cannot say "zeros" over a backing file: there its zeros stay data.)
    if (this.detectZeroes && !(this.header.version === 2 && this.backing)) {
      data = [];
      for (const w of batch) {
        if (!isZero(w.data)) data.push(w);
        else if (!this.readsAsZeros(w.old)) await this.zeroCluster(w.guestCluster);
      }
      if (!data.length) return;
    }
    await this.prepareTables(data.map((p) => p.guestCluster));
    const start = await this.writeRun(data.map((p) => p.data));
    for (let i = 0; i < data.length; i++) {
      this.mapCluster(data[i].guestCluster, start + i * this.clusterSize, true);
      this.dropReference(data[i].old); // no policy here: never a promise
    }
  }

  /**
   * Makes the L2 tables of these guest clusters writable, once per table. Done before a
   * data run is allocated: allocating a table takes a cluster, and the run must stay contiguous.
   */
  async prepareTables(guestClusters: number[]): Promise<void> {
    const seen = new Set<number>();
    for (const c of guestClusters) {
      const l1Index = Math.floor(c / this.l2Entries);
      if (!seen.has(l1Index)) {
        seen.add(l1Index);
        await this.l2TableForWrite(l1Index);
      }
    }
  }

  /** Allocates one contiguous run of new clusters and writes `clusters` there with one call. Returns its host offset. */
  async writeRun(clusters: Buffer[]): Promise<number> {
    const start = await this.assertWritable().allocate(clusters.length);
    this.guardDataWrite(start, clusters.length * this.clusterSize);
    if (this.behind) this.behind.writeBehind(start, clusters);
    else await this.file.writev(start, clusters);
    this.startWriteback(clusters.length * this.clusterSize);
    return start;
  }

  /**
   * Makes guest clusters read as zeros. Whole clusters become zero clusters (v3) or
   * unallocated (v2 without backing) and release their host clusters; partial clusters,
   * and whole ones of a v2 image with a backing file, get written zeros.
   */
  async writeZeroes(guestOffset: number, length: number): Promise<void> {
    this.checkRange(guestOffset, length);
    this.assertWritable();
    for (const { guestCluster, inCluster, n, pos } of this.pieces(guestOffset, length)) {
      const wholeCluster = n === this.clusterSize || (inCluster === 0 && pos + n === this.size);
      if (!wholeCluster || (this.header.version === 2 && this.backing)) {
        await this.write(pos, Buffer.alloc(n));
      } else {
        await this.zeroCluster(guestCluster);
      }
    }
    await this.commitIfLarge();
  }

  /** Makes one whole guest cluster read as zeros (its old reference dropped). */
  async zeroCluster(guestCluster: number): Promise<void> {
    const old = await this.entry(guestCluster);
    if (this.readsAsZeros(old)) return; // no table to allocate, nothing to drop
    await this.l2TableForWrite(Math.floor(guestCluster / this.l2Entries));
    const released = this.releasedBy(old);
    if (this.policy && released !== null) await this.policy.prepareRelease([released]);
    await this.zeroMapped(guestCluster, old);
  }

  /**
   * zeroCluster() once the table is writable and the release prepared: the decision, without
   * I/O. A promise only when the policy's release returned one.
   */
  private zeroMapped(guestCluster: number, old: L2Entry): Promise<void> | undefined {
    if (this.readsAsZeros(old)) return undefined;
    this.setEntry(guestCluster, 0, false, this.header.version === 3);
    return this.dropReference(old);
  }

  /** True when an entry already reads as zeros and holds no cluster: zeroing it changes nothing. */
  readsAsZeros(old: L2Entry): boolean {
    return (old.kind === 'zero' && old.hostOffset === 0) || (old.kind === 'unallocated' && !this.backing);
  }

  /**
   * Queues the references an old L2 entry held for release at commit, without I/O (through
   * the write policy's release, prepared beforehand, when there is one). A promise only when
   * the policy's release returned one.
   */
  dropReference(old: L2Entry): Promise<void> | undefined {
    const refcounts = this.assertWritable();
    if (old.kind === 'compressed') {
      const [first, last] = compressedClusterSpan(old, this.clusterBits);
      for (let c = first; c <= last; c++) refcounts.deferFree(c);
      return undefined;
    }
    const released = this.releasedBy(old);
    if (released === null) return undefined;
    if (this.policy) return this.policy.release(released);
    refcounts.deferFree(released);
    return undefined;
  }

  /**
   * The host cluster whose reference dropReference(`old`) drops one by one (through the
   * policy's release when there is one): a normal cluster, or the one a zero cluster keeps
   * allocated (QEMU's zero with allocation). Null for none, and for compressed entries.
   */
  releasedBy(old: L2Entry): number | null {
    return old.kind !== 'compressed' && old.hostOffset !== 0 ? old.hostOffset / this.clusterSize : null;
  }

  /**
   * Returns the L2 table for L1 entry `l1Index`, ready to be modified: allocates an empty
   * one when the L1 entry is empty, copies it first when it is shared (COPIED clear).
   */
  private async l2TableForWrite(l1Index: number): Promise<Buffer> {
    const refcounts = this.assertWritable();
    const l1e = decodeL1Entry(this.l1, l1Index);
    if (l1e.l2Offset !== 0 && l1e.copied) {
      // I4: as for data clusters, COPIED is trusted only for a table the refcounts count
      // (checked once: a dirty table was checked or allocated here).
      if (!this.l2Dirty.has(l1Index) && (await refcounts.get(l1e.l2Offset / this.clusterSize)) === 0) {
        throw new CorruptImageError(`L2 table at ${hex(l1e.l2Offset)} has the COPIED flag but refcount 0 (L1 index: ${hex(l1Index)})`, { path: this.path, offset: this.header.l1TableOffset + l1Index * 8, structure: 'L1 table' });
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

  /**
   * Sets one L2 entry in a table made writable by l2TableForWrite() since the last commit (it
   * is then cached, COPIED in the L1, and never dropped from the cache). Throws InternalError otherwise.
   */
  private setEntry(guestCluster: number, hostOffset: number, copied: boolean, zero: boolean): void {
    this.assertWritable();
    const l1Index = Math.floor(guestCluster / this.l2Entries);
    if (!this.l2Dirty.has(l1Index)) throw new InternalError(`L2 table of guest cluster ${guestCluster} not prepared for writing`);
    encodeL2Entry(this.l2Cache.get(l1Index)!, guestCluster % this.l2Entries, hostOffset, copied, zero);
  }

  /**
   * Counts data written; every WRITEBACK_BYTES starts a sync without waiting for it. Only a
   * speed-up: the disk writes back while we go on, so the commit's syncs find little left
   * to do. Durability and ordering still come from flush() alone.
   */
  private startWriteback(bytes: number): void {
    if (this.writebackError) throw this.writebackError;
    this.unsyncedBytes += bytes;
    if (this.unsyncedBytes < WRITEBACK_BYTES || this.writeback) return;
    this.unsyncedBytes = 0;
    this.writeback = this.file.sync()
      .catch((err) => { this.writebackError = err; })
      .finally(() => { this.writeback = null; });
  }

  private async commitIfLarge(): Promise<void> {
    const dirty = this.l2Dirty.size * this.clusterSize + (this.refcounts?.dirtyBytes() ?? 0);
    if (dirty >= MAX_DIRTY_METADATA_BYTES) await this.flush();
  }

  // ---------------------------------------------------------------- commit

  /**
   * Writes all cached metadata back and makes every write durable. Order (I3: a crash at
   * any point leaves at worst leaked clusters):
   *   1. refcount increments (and a moved refcount table), then sync — data written
   *      earlier is durable with them;
   *   2. the header, if the refcount table moved, then sync;
   *   3. L2 tables, then sync;
   *   4. L1 entries, then sync;
   *   5. queued decrements (frees), then sync.
   */
  async flush(): Promise<void> {
    if (!this.writable || this.closed) return;
    const refcounts = this.assertWritable();
    if (this.writeback) await this.writeback;
    if (this.writebackError) throw this.writebackError;
    await this.policy?.beforeRefcounts(); // I2: hash deletions are durable with the refcount increments, before any free
    await refcounts.prepareTable();
    if (refcounts.hasDirty()) await refcounts.writeDirty();
    await this.file.sync(); // I3: data and refcount increments durable before anything points at them
    if (refcounts.tableMoved || this.headerDirty) {
      this.header.refcountTableOffset = refcounts.tableOffset;
      this.header.refcountTableClusters = refcounts.tableClusters;
      this.markMetadata(refcounts.tableOffset, refcounts.tableClusters * this.clusterSize, 'refcount table');
      await this.writeHeader();
      await this.file.sync(); // I3: the new refcount table is in use before L2 entries rely on it
      refcounts.tableMoved = false;
    }
    const holderTables = (await this.policy?.writeL2Tables()) ?? false;
    if (this.l2Dirty.size || holderTables) {
      const order = [...this.l2Dirty].sort((a, b) => decodeL1Entry(this.l1, a).l2Offset - decodeL1Entry(this.l1, b).l2Offset);
      for (const l1Index of order) await this.file.write(decodeL1Entry(this.l1, l1Index).l2Offset, this.l2Cache.get(l1Index)!);
      this.l2Dirty.clear();
      // I3: new L2 tables durable before the L1 points at them, and the write durable at all
      // when the L1 does not change (a crash test found that case unsynced).
      await this.file.sync();
    }
    const holderL1 = (await this.policy?.writeL1()) ?? false;
    if (this.l1Dirty.size || holderL1) {
      for (const i of [...this.l1Dirty].sort((a, b) => a - b)) {
        const from = i * this.clusterSize;
        const to = Math.min(this.l1.length, from + this.clusterSize);
        await this.file.write(this.header.l1TableOffset + from, this.l1.subarray(from, to));
      }
      this.l1Dirty.clear();
      await this.file.sync();
    }
    if (refcounts.hasPendingFrees()) {
      // Old references are gone from durable tables: only now may the clusters be freed (and reused).
      await refcounts.applyPendingFrees();
      await refcounts.writeDirty();
      await this.file.sync();
    }
    this.policy?.afterFrees();
  }

  /** Rewrites the header cluster's bytes from `this.header`. */
  async writeHeader(): Promise<void> {
    await this.file.write(0, encodeHeader(this.header));
    this.headerDirty = false;
  }

  /** Marks the header for rewriting at the next flush. */
  markHeaderDirty(): void {
    this.headerDirty = true;
  }

  /** Commits (read-write) and closes this image and its backing chain. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (this.writable) {
        await this.flush();
        await this.policy?.close(); // I3: e.g. the dedup dirty flag cleared only once everything else is durable
      }
    } finally {
      this.closed = true;
      await this.file.close().catch(() => {});
      if (this.backing) await this.backing.close();
    }
  }

  /** Closes without committing (after an error): the file keeps what was already durable. */
  async abandon(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.file.close().catch(() => {});
    if (this.backing) await this.backing.close().catch(() => {});
  }

  /** The narrow interface a write policy changes this image through (read-write opens). */
  private writer(): ImageWriter {
    const refcounts = this.assertWritable();
    return {
      file: this.file,
      clusterSize: this.clusterSize,
      clusterBits: this.clusterBits,
      refcountMax: refcounts.max,
      allocate: (n) => refcounts.allocate(n),
      writeRun: (clusters) => this.writeRun(clusters),
      prepareTables: (guestClusters) => this.prepareTables(guestClusters),
      mapCluster: (g, h, copied) => this.mapCluster(g, h, copied),
      readsAsZeros: (old) => this.readsAsZeros(old),
      zeroCluster: (g, old) => this.zeroMapped(g, old),
      dropReference: (old) => this.dropReference(old),
      releasedBy: (old) => this.releasedBy(old),
      fetchRefcounts: (clusters) => refcounts.fetch(clusters),
      refcount: (c) => refcounts.count(c),
      increment: (c) => refcounts.increment(c),
      deferFree: (c) => refcounts.deferFree(c),
      markMetadata: (offset, bytes, what) => this.markMetadata(offset, bytes, what),
      writeExtension: async (type, data, autoclear) => {
        const e = this.header.extensions.find((x) => x.type === type);
        if (e) e.data = data;
        else this.header.extensions.push({ type, data });
        this.header.autoclearFeatures |= autoclear;
        await this.writeHeader();
        await this.file.sync();
      },
      setSnapshotTable: async (offset, count) => {
        this.header.snapshotsOffset = offset;
        this.header.nbSnapshots = count;
        await this.writeHeader();
        await this.file.sync(); // I3: the header names the table only once the table is durable (the caller synced it)
        await this.loadSnapshots();
      },
      commit: () => this.flush(),
    };
  }

  /** Internal access for check and rebuild. */
  get refcountState(): Refcounts | null {
    return this.refcounts;
  }
}

/** Zero-fills dst[start, end), or (with `zeros`) lists the range there instead, merged with its predecessor. */
function zeroRange(dst: Buffer, start: number, end: number, zeros: number[] | undefined): void {
  if (start >= end) return;
  if (!zeros) {
    dst.fill(0, start, end);
    return;
  }
  if (zeros.length && zeros[zeros.length - 1] === start) zeros[zeros.length - 1] = end;
  else zeros.push(start, end);
}

/**
 * Appends the [start, end) pairs of `ranges` (in any order, not overlapping) to `into`,
 * sorted and merged. The pairs already in `into` must lie before all of them.
 */
function appendMerged(into: number[], ranges: number[]): void {
  const order: number[] = [];
  for (let i = 0; i < ranges.length; i += 2) order.push(i);
  order.sort((a, b) => ranges[a] - ranges[b]);
  for (const i of order) {
    const [start, end] = [ranges[i], ranges[i + 1]];
    if (into.length && into[into.length - 1] >= start) into[into.length - 1] = Math.max(into[into.length - 1], end);
    else into.push(start, end);
  }
}

/** Runs the tasks with at most `limit` in flight; waits for all that started, then throws the first error. */
async function inParallel(tasks: (() => Promise<void>)[], limit: number): Promise<void> {
  let next = 0;
  let failure: { err: unknown } | null = null;
  const worker = async () => {
    while (next < tasks.length && !failure) {
      const task = tasks[next++];
      try {
        await task();
      } catch (err) {
        failure ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
  if (failure) throw (failure as { err: unknown }).err;
}

const UNALLOCATED: L2Entry = Object.freeze({ kind: 'unallocated', hostOffset: 0, copied: false, reservedBits: false, compressedOffset: 0, compressedLength: 0 });

/** A raw file used as a backing image: guest offset = file offset. */
export class RawImage implements GuestReader {
  private constructor(private readonly file: BlockFile, readonly size: number) {}

  static async open(path: string, lock?: LockRequest): Promise<RawImage> {
    const file = await NodeFile.open(path, false, lock);
    return new RawImage(file, await file.size());
  }

  async readGuest(guestOffset: number, length: number): Promise<Buffer> {
    const inside = Math.max(0, Math.min(length, this.size - guestOffset));
    if (inside === length) return this.file.read(guestOffset, length);
    const out = Buffer.alloc(length);
    if (inside > 0) (await this.file.read(guestOffset, inside)).copy(out);
    return out;
  }

  async readGuestInto(dst: Buffer, dstStart: number, guestOffset: number, length: number, zeros?: number[]): Promise<void> {
    const inside = Math.max(0, Math.min(length, this.size - guestOffset));
    if (inside > 0) await readvFrom(this.file, guestOffset, [dst.subarray(dstStart, dstStart + inside)]);
    zeroRange(dst, dstStart + inside, dstStart + length, zeros);
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}

/** 'qcow2' when the file starts with the QCOW2 magic, else 'raw' (QEMU's probe, reduced to two formats). */
export async function probeFormat(path: string): Promise<string> {
  const file = await NodeFile.open(path, false);
  try {
    const magic = await file.read(0, 4);
    return magic.readUInt32BE(0) === QCOW_MAGIC ? 'qcow2' : 'raw';
  } finally {
    await file.close();
  }
}
