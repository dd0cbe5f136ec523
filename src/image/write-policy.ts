// The hooks a layer above the engine (inline deduplication, src/dedup/) plugs into the
// engine's writes and commit, and the narrow ImageWriter through which it changes an image.
// The engine calls them and never imports that layer (docs/DESIGN.md "How dedup plugs into
// the engine"); Image (./image.ts) hands the policy an ImageWriter and calls its hooks.

import type { L2Entry } from '../format/l1l2.ts';
import type { BlockFile } from './block-file.ts';
import type { ClusterBatch } from './cluster-batch.ts';

export type { ClusterBatch };

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
   * clusters with `prepared` ≥ 0 come from. The batch is the engine's, emptied and reused
   * once this resolves.
   */
  writeClusters(batch: ClusterBatch, prepared?: unknown): Promise<void>;
  /** Reads what release() of these host clusters needs into memory (the engine calls it before a release of its own). */
  prepareRelease(clusters: number[]): Promise<void>;
  /**
   * A guest reference to host cluster `cluster` goes (one of each cluster a compressed stream touches): the policy queues the
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
  /** Allocates one contiguous run and writes `buffers` (whole clusters each) there with one call. Returns its host offset. */
  writeRun(buffers: Buffer[]): Promise<number>;
  /** Writes `bytes` at host offset `offset`, in clusters allocate() gave (behind, during a pipelined write). */
  writeBytes(offset: number, bytes: Buffer): Promise<void>;
  /**
   * Makes the L2 tables of these guest clusters writable (allocation; before a run is
   * allocated, so that the run stays contiguous). They stay writable until the next commit.
   */
  prepareTables(guestClusters: number[]): Promise<void>;
  /** Points guest cluster `guestCluster` at `hostOffset`, without I/O: its table prepared. */
  mapCluster(guestCluster: number, hostOffset: number, copied: boolean): void;
  /** Points guest cluster `guestCluster` at the compressed stream of `length` bytes at host byte `offset`, without I/O: its table prepared. */
  mapCompressed(guestCluster: number, offset: number, length: number): void;
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
  /** Every host cluster dropReference(`old`) hands to the policy's release: releasedBy's, or each cluster a compressed stream touches. */
  clustersReleasedBy(old: L2Entry): number[];
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
