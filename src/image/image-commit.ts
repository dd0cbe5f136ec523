// The commit of an open image: cached metadata written back in crash-safe order (I3), the
// background writeback that keeps the commit's syncs short, and close. Design:
// docs/DESIGN.md (commit order).

import { encodeHeader } from '../format/header.ts';
import { decodeL1Entry } from '../format/l1l2.ts';
import { ImageReads } from './image-reads.ts';

/** Dirty metadata held in memory before a write commits on its own (bounds RAM, I5). */
const MAX_DIRTY_METADATA_BYTES = 64 * 1024 * 1024;
/**
 * Data written past which a sync starts in the background, so the disk writes back while we
 * go on (one at a time: a sync in flight defers the next). 16 MiB measured best for 1 GiB
 * imports (docs/PERFORMANCE.md "Background writeback"): none left all of it to the last sync.
 */
const WRITEBACK_BYTES = 16 * 1024 * 1024;

/** The commit and close (of Image, ./image.ts). */
export abstract class ImageCommit extends ImageReads {
  /** Data bytes written since the last background sync started. */
  private unsyncedBytes = 0;
  /** A background sync in flight (see WRITEBACK_BYTES), and the error it met, if any. */
  private writeback: Promise<void> | null = null;
  private writebackError: unknown = null;

  /**
   * Counts data written; every WRITEBACK_BYTES starts a sync without waiting for it. Only a
   * speed-up: the disk writes back while we go on, so the commit's syncs find little left
   * to do. Durability and ordering still come from flush() alone.
   */
  protected startWriteback(bytes: number): void {
    if (this.writebackError) throw this.writebackError;
    this.unsyncedBytes += bytes;
    if (this.unsyncedBytes < WRITEBACK_BYTES || this.writeback) return;
    this.unsyncedBytes = 0;
    this.writeback = this.file
      .sync()
      .catch((err) => {
        this.writebackError = err;
      })
      .finally(() => {
        this.writeback = null;
      });
  }

  protected async commitIfLarge(): Promise<void> {
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

  /** Sets header extension `type` to `data` (added when absent) and sets `autoclear` bits; writes the header, then syncs (ImageWriter.writeExtension). */
  async writeExtension(type: number, data: Buffer, autoclear: bigint): Promise<void> {
    const e = this.header.extensions.find((x) => x.type === type);
    if (e) e.data = data;
    else this.header.extensions.push({ type, data });
    this.header.autoclearFeatures |= autoclear;
    await this.writeHeader();
    await this.file.sync();
  }

  /** Points the header at a snapshot table of `count` entries, durable already; writes the header, syncs, reloads the snapshots. */
  async setSnapshotTable(offset: number, count: number): Promise<void> {
    this.header.snapshotsOffset = offset;
    this.header.nbSnapshots = count;
    await this.writeHeader();
    await this.file.sync(); // I3: the header names the table only once the table is durable (the caller synced it)
    await this.loadSnapshots();
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
}
