// An open QCOW2 image: open (validation, backing chain, read-write preparation) and guest
// writes through L1/L2 tables — copy on write, zero clusters, new clusters in contiguous
// runs, or a write policy's decision. It builds on ./image-tables.ts (state, mapping),
// ./image-reads.ts (guest reads) and ./image-commit.ts (the crash-safe commit). Spec:
// QEMU's docs/interop/qcow2.rst; design: docs/DESIGN.md.
//
// State: open read-only | open read-write (metadata cached, dirty until commit) → closed.
// Every write to the file is checked against the known metadata clusters first, so a
// hostile L2 entry or a wrong refcount can never make us overwrite a table (I4, docs/DESIGN.md).

import { dirname, isAbsolute, resolve } from 'node:path';
import { promises as fsp } from 'node:fs'; // fs/promises loaded on first use (start-up: `info`)
import { CorruptImageError, InternalError, IoError, QdedupError, UnsupportedError, hex, printable } from '../errors.ts';
import {
  CLUSTER_BITS_OFFSET,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_FEATURES_OFFSET,
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  V3_MIN_HEADER_LENGTH,
  backingFormatOf,
  decodeHeader,
  type Header,
} from '../format/header.ts';
import { compressedClusterSpan, decodeL1Entry, type L2Entry } from '../format/l1l2.ts';
import { NodeFile, type BlockFile } from './block-file.ts';
import { WriteBehindFile } from './write-behind.ts';
import { BLK_PERM_ALL, LOCK_READ, forceShare, type LockRequest } from './image-lock.ts';
import { Refcounts } from './refcounts.ts';
import { rebuildRefcounts } from './check/check-open-image.ts';
import { RawImage, probeFormat, type GuestReader } from './guest-reader.ts';
import { ImageCommit } from './image-commit.ts';
import { CompressedWriter } from './compressed-write.ts';
import type { ImageWriter, PreparedChunk, WritePolicy } from './write-policy.ts';
import { ClusterBatch } from './cluster-batch.ts';

/** Deepest backing chain followed (QEMU has no fixed limit; this bounds hostile chains). */
export const MAX_BACKING_DEPTH = 32;
/** New clusters gathered into one allocation and one write. */
const MAX_BATCH_BYTES = 8 * 1024 * 1024;

export interface OpenOptions {
  writable?: boolean;
  /** Internal: backing chain depth and visited files, to bound hostile chains. */
  chain?: string[];
  /** A file implementation to use instead of opening `path` (info reads through SyncReadFile; tests use in-memory and faulty files). */
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
  /** Read-write opens without a policy: whole clusters stored compressed, zeros as zero clusters, as `qemu-img convert -c` (./compressed-write.ts). */
  compress?: boolean;
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

/** Makes the write policy of a read-write open, given the image (to read) and its writer (to change it); null for none. */
export type AttachPolicy = (image: Image, writer: ImageWriter) => Promise<WritePolicy | null>;

/** An open QCOW2 image: open, guest writes (reads: ./image-reads.ts; commit: ./image-commit.ts). */
export class Image extends ImageCommit implements GuestReader {
  /** OpenOptions.detectZeroes. */
  private detectZeroes = false;
  /** OpenOptions.compress: how whole clusters are compressed and packed (none: stored plain). */
  private compressed: CompressedWriter | null = null;
  /** Set during a write() of a prepared chunk: where its new clusters are written behind. */
  private behind: WriteBehindFile | null = null;
  /** The batch writes fill (./cluster-batch.ts), kept for the next write; null while one uses it. */
  private batch: ClusterBatch | null = null;

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
        if (options.compress && !image.policy) image.compressed = new CompressedWriter(image.writer(), !(image.header.version === 2 && image.backing));
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
    const first = await file.read(0, Math.min(fileSize, V3_MIN_HEADER_LENGTH));
    let clusterBytes = 2 ** MIN_CLUSTER_BITS;
    if (first.length >= CLUSTER_BITS_OFFSET + 4) {
      const bits = first.readUInt32BE(CLUSTER_BITS_OFFSET);
      if (bits >= MIN_CLUSTER_BITS && bits <= MAX_CLUSTER_BITS) clusterBytes = 2 ** bits;
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
    const self = await fsp.realpath(this.path).catch(() => resolve(this.path));
    const visited = [...chain, self];
    if (visited.length > MAX_BACKING_DEPTH) throw new CorruptImageError(`backing chain deeper than ${MAX_BACKING_DEPTH} images`, where);
    const target = await fsp.realpath(backingPath).catch(() => {
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
      throw new CorruptImageError("image is marked corrupt (incompatible bit 1); it can only be opened read-only or repaired with 'qdedup check -r all'", {
        path: this.path,
        structure: 'header',
        offset: INCOMPAT_FEATURES_OFFSET,
      });
    }
    if (h.incompatibleFeatures & INCOMPAT_DIRTY) {
      // Refcounts may be stale: rebuild them (and clear the bit) before they are loaded and
      // before any write; the rebuild clears foreign autoclear bits before its own first write.
      await rebuildRefcounts(this);
      this.refcountsRebuilt = true;
    }
    if (h.nbSnapshots > 0) await this.loadSnapshots(); // their tables join the overlap guard
    this.indexMetadata();
    this.refcounts = await Refcounts.load(
      this.file,
      {
        clusterBits: this.clusterBits,
        refcountOrder: h.refcountOrder,
        tableOffset: h.refcountTableOffset,
        tableClusters: h.refcountTableClusters,
      },
      (c) => this.metadata.get(c),
      (c) => this.metadata.delete(c),
    );
    for (const offset of this.refcounts.blockOffsets()) this.markMetadata(offset, this.clusterSize, 'refcount block');
    // Every autoclear bit qdedup does not maintain must be cleared before the first write
    // (the spec's rule); the layer above names the bits it maintains (dedup: bit 60, on dedup images).
    if (h.autoclearFeatures & ~keepAutoclear) {
      h.autoclearFeatures &= keepAutoclear;
      await this.writeHeader();
      await this.file.sync(); // the cleared bits reach disk before any data write
    }
  }

  // ---------------------------------------------------------------- writes

  /**
   * Splits the guest range [guestOffset, +length) at cluster boundaries. Each piece: its
   * guest cluster, the offset inside it, its length, its guest offset and its distance
   * from guestOffset.
   */
  private *pieces(guestOffset: number, length: number): Generator<{ guestCluster: number; inCluster: number; n: number; pos: number; done: number }> {
    for (let pos = guestOffset; pos < guestOffset + length; ) {
      const guestCluster = Math.floor(pos / this.clusterSize);
      const inCluster = pos - guestCluster * this.clusterSize;
      const n = Math.min(this.clusterSize - inCluster, guestOffset + length - pos);
      yield { guestCluster, inCluster, n, pos, done: pos - guestOffset };
      pos += n;
    }
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
    const cs = this.clusterSize;
    const batch = this.takeBatch();
    try {
      let table: Buffer | null = null;
      let tableIndex = -1; // the L1 index `table` belongs to (-1: read it again)
      // Cluster by cluster, without an object or a view per cluster: whole clusters go into
      // the batch as offsets into `data`.
      for (let done = 0; done < data.length; ) {
        const pos = guestOffset + done;
        const guestCluster = Math.floor(pos / cs);
        const inCluster = pos - guestCluster * cs;
        const n = Math.min(cs - inCluster, data.length - done);
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
          if ((await this.assertWritable().get(old.hostOffset / cs)) === 0) {
            throw this.l2Corruption(l1Index, guestCluster % this.l2Entries, `data cluster ${hex(old.hostOffset)} has the COPIED flag but refcount 0`);
          }
          await this.file.write(old.hostOffset + inCluster, data.subarray(done, done + n));
          this.startWriteback(n);
        } else if (n === cs) {
          // A new host cluster: always with dedup (allocate on rewrite), else when not ours alone.
          // Whole clusters stay in the caller's buffer: the batch is written before write() returns.
          const at = prepared ? (done - prepared.start) / cs : -1;
          batch.push(guestCluster, data, done, old, at >= 0 && at < prepared!.count && Number.isInteger(at) ? at : -1);
        } else {
          const full = await this.readCluster(guestCluster, old);
          data.copy(full, inCluster, done, done + n);
          batch.push(guestCluster, full, 0, old, -1);
        }
        done += n;
        if (batch.length === batch.capacity) {
          await this.writeBatch(batch, prepared?.result);
          batch.clear();
          tableIndex = -1; // the batch may have replaced the table (copy on write)
        }
      }
      if (batch.length) await this.writeBatch(batch, prepared?.result);
    } finally {
      batch.clear();
      this.batch = batch;
    }
    await this.commitIfLarge();
  }

  /** The image's batch (reused from write to write), or a new one while it is in use. */
  private takeBatch(): ClusterBatch {
    const batch = this.batch ?? new ClusterBatch(this.clusterSize, Math.max(1, Math.floor(MAX_BATCH_BYTES / this.clusterSize)));
    this.batch = null;
    return batch;
  }

  /**
   * Starts the policy's work on `chunk`, which write() will be given next at guest offset
   * `guestOffset` (the write pipeline, ./write-pipeline.ts); null when there is none to do.
   */
  prepare(chunk: Buffer, guestOffset: number): Promise<PreparedChunk> {
    const start = Math.min(chunk.length, (this.clusterSize - (guestOffset % this.clusterSize)) % this.clusterSize); // (a chunk may end before the first boundary)
    const count = Math.max(0, Math.floor((chunk.length - start) / this.clusterSize));
    if (this.compressed) return Promise.resolve({ start, count, result: this.compressed.prepare(chunk, start, count) });
    if (!this.policy?.prepare) return Promise.resolve({ start, count, result: undefined });
    return this.policy.prepare(chunk, start, count).then((result) => ({ start, count, result }));
  }

  private async writeBatch(batch: ClusterBatch, prepared?: unknown): Promise<void> {
    if (this.policy) await this.policy.writeClusters(batch, prepared);
    else if (this.compressed) {
      this.forgetDecompressed(); // the new streams may reuse a freed cluster's bytes
      await this.compressed.writeClusters(batch, prepared);
    } else await this.writeNewClusters(batch);
  }

  /** The whole current content of a guest cluster (a fresh buffer). */
  private async readCluster(guestCluster: number, e: L2Entry): Promise<Buffer> {
    const guestOffset = guestCluster * this.clusterSize;
    switch (e.kind) {
      case 'normal':
        return this.file.read(e.hostOffset, this.clusterSize);
      case 'compressed':
        return Buffer.from(await this.decompress(e));
      case 'zero':
        return Buffer.alloc(this.clusterSize);
      case 'unallocated':
        return this.backing ? this.backing.readGuest(guestOffset, this.clusterSize) : Buffer.alloc(this.clusterSize);
    }
  }

  /**
   * Allocates one contiguous run for the batch, writes it with one call, then maps it. With
   * detectZeroes, whole clusters of zeros become zero clusters instead.
   */
  private async writeNewClusters(batch: ClusterBatch): Promise<void> {
    const data: number[] = [];
    // (A v2 image cannot say "zeros" over a backing file: there its zeros stay data.)
    const detect = this.detectZeroes && !(this.header.version === 2 && this.backing);
    for (let i = 0; i < batch.length; i++) {
      if (!detect || !batch.isZero(i)) data.push(i);
      else if (!this.readsAsZeros(batch.old[i])) await this.zeroCluster(batch.guest[i]);
    }
    if (!data.length) return;
    await this.prepareTables(data.map((i) => batch.guest[i]));
    const start = await this.writeRun(batch.views(data));
    for (let k = 0; k < data.length; k++) {
      this.mapCluster(batch.guest[data[k]], start + k * this.clusterSize, true);
      this.dropReference(batch.old[data[k]]); // no policy here: never a promise
    }
  }

  /**
   * Makes the L2 tables of these guest clusters writable, once per table. Done before a
   * data run is allocated: allocating a table takes a cluster, and the run must stay contiguous.
   */
  async prepareTables(guestClusters: number[]): Promise<void> {
    const seen = new Set<number>();
    // An index loop: a for…of holding an await made an iterator result per cluster.
    for (let i = 0; i < guestClusters.length; i++) {
      const l1Index = Math.floor(guestClusters[i] / this.l2Entries);
      if (!seen.has(l1Index)) {
        seen.add(l1Index);
        await this.l2TableForWrite(l1Index);
      }
    }
  }

  /** Allocates one contiguous run of new clusters and writes `buffers` (whole clusters each) there with one call. Returns its host offset. */
  async writeRun(buffers: Buffer[]): Promise<number> {
    let bytes = 0;
    for (const b of buffers) bytes += b.length;
    if (bytes % this.clusterSize !== 0) throw new InternalError(`writeRun: ${bytes} bytes are not whole ${this.clusterSize}-byte clusters`);
    const start = await this.assertWritable().allocate(bytes / this.clusterSize);
    this.guardDataWrite(start, bytes);
    if (this.behind) this.behind.writeBehind(start, buffers);
    else await this.file.writev(start, buffers);
    this.startWriteback(bytes);
    return start;
  }

  /** Writes `bytes` at `offset`, clusters allocate() just gave (behind, during a pipelined write). */
  private async writeBytes(offset: number, bytes: Buffer): Promise<void> {
    this.guardDataWrite(offset, bytes.length);
    if (this.behind) this.behind.writeBehind(offset, [bytes]);
    else await this.file.write(offset, bytes);
    this.startWriteback(bytes.length);
  }

  /** Ends the compression workers with the image. */
  override async close(): Promise<void> {
    try {
      await super.close();
    } finally {
      await this.compressed?.close();
    }
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
    if (this.policy) await this.policy.prepareRelease(this.clustersReleasedBy(old));
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
      // One reference on every cluster the stream touches, each released in turn.
      const [first, last] = compressedClusterSpan(old, this.clusterBits);
      const policy = this.policy;
      if (!policy) {
        for (let c = first; c <= last; c++) refcounts.deferFree(c);
        return undefined;
      }
      const from = (c: number): Promise<void> | undefined => {
        for (; c <= last; c++) {
          const releasing = policy.release(c);
          if (releasing) return releasing.then(() => from(c + 1));
        }
        return undefined;
      };
      return from(first);
    }
    const released = this.releasedBy(old);
    if (released === null) return undefined;
    if (this.policy) return this.policy.release(released);
    refcounts.deferFree(released);
    return undefined;
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
      writeBytes: (offset, bytes) => this.writeBytes(offset, bytes),
      mapCompressed: (g, offset, length) => this.mapCompressed(g, offset, length),
      prepareTables: (guestClusters) => this.prepareTables(guestClusters),
      mapCluster: (g, h, copied) => this.mapCluster(g, h, copied),
      readsAsZeros: (old) => this.readsAsZeros(old),
      zeroCluster: (g, old) => this.zeroMapped(g, old),
      dropReference: (old) => this.dropReference(old),
      releasedBy: (old) => this.releasedBy(old),
      clustersReleasedBy: (old) => this.clustersReleasedBy(old),
      fetchRefcounts: (clusters) => refcounts.fetch(clusters),
      refcount: (c) => refcounts.count(c),
      increment: (c) => refcounts.increment(c),
      deferFree: (c) => refcounts.deferFree(c),
      markMetadata: (offset, bytes, what) => this.markMetadata(offset, bytes, what),
      writeExtension: (type, data, autoclear) => this.writeExtension(type, data, autoclear),
      setSnapshotTable: (offset, count) => this.setSnapshotTable(offset, count),
      commit: () => this.flush(),
    };
  }

  /** Internal access for check and rebuild. */
  get refcountState(): Refcounts | null {
    return this.refcounts;
  }
}
