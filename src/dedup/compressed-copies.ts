// Compressed copies in a dedup image (`-c`, docs/DESIGN.md "Compressed clusters"): the unique
// clusters of a batch become framed deflate streams (../format/stream-header.ts) packed into
// one run of new clusters, the streams indexed by the hash of their uncompressed bytes and
// their duplicates linked to them (a guest L2 entry is then the same compressed descriptor).
// The holder design holds per cluster a stream touches:
//
// - every cluster of a run is held (one reference: the holder's), and each stream adds one
//   reference per guest entry naming it on every cluster it touches; so a run cluster has
//   refcount 1 + its streams' guest references, and "only the holder would be left" is still
//   the moment it dies (Dedup.release);
// - before a dying cluster is freed, the index entries of every stream touching it are
//   deleted (I2): streamsTouching() finds them from the cluster's bytes and the one before;
// - a stream is linked only when every cluster it touches is held and under the cap, and
//   compared (inflated) when verifying or when its entry is not confirmed this session (I1).

import { compressCluster, inflateCluster } from '../format/deflate.ts';
import { compressedReadLength } from '../format/l1l2.ts';
import { framedStreamsTouching } from '../format/stream-header.ts';
import { ZERO_CLUSTER, compressedClusterOf, type CompressedChunk } from '../image/chunk-compressor.ts';
import { countStreamReferences, writeStreamRun } from '../image/compressed-write.ts';
import { clusterSpan } from './clusters.ts';
import type { ClusterBatch, ImageWriter } from '../image/write-policy.ts';
import type { Holder } from './holder.ts';

/**
 * Smallest refcount of a cluster the write path links to: a guest reference and the holder's.
 * A held cluster of refcount 1 is the store's own (a journal, an incarnation, …) or an orphan:
 * an index entry naming it is never followed, whatever its bytes (I1).
 */
export const MIN_LINK_REFCOUNT = 2;

export class CompressedCopies {
  constructor(
    private readonly writer: ImageWriter,
    private readonly holder: Holder,
    /** The refcount at which a cluster takes no further link (Dedup's cap, read at each use: tests lower it). */
    private readonly cap: () => number,
  ) {}

  /** The host clusters the stream of `length` bytes at `offset` touches, first and last. */
  span(offset: number, length: number): [number, number] {
    return clusterSpan(offset, length, this.writer.clusterSize);
  }

  /** The clusters of span(), for prepareRelease. */
  clusters(offset: number, length: number): number[] {
    const [first, last] = this.span(offset, length);
    return first === last ? [first] : [first, last];
  }

  /**
   * True when the stream may be linked to: every cluster it touches held, with a guest's
   * reference besides the holder's, and under the cap. Without I/O (its clusters fetched).
   */
  linkable(offset: number, length: number): boolean {
    const [first, last] = this.span(offset, length);
    for (let c = first; c <= last; c++) {
      if (!this.holder.holds(c)) return false;
      const refcount = this.writer.refcount(c);
      if (refcount < MIN_LINK_REFCOUNT || refcount >= this.cap()) return false;
    }
    return true;
  }

  /** True when every cluster the stream touches is under the cap (a duplicate may still link to it). */
  underCap(offset: number, length: number): boolean {
    const [first, last] = this.span(offset, length);
    for (let c = first; c <= last; c++) if (this.writer.refcount(c) >= this.cap()) return false;
    return true;
  }

  /**
   * The compressed stream of each miss (`misses`: indexes into `batch`), or null for a
   * cluster that does not shrink (stored whole): from the chunk the workers compressed when
   * the cluster came from it, else compressed here.
   */
  streamsOf(batch: ClusterBatch, misses: number[], chunk: CompressedChunk | undefined): (Buffer | null)[] {
    return misses.map((c) => {
      const stream = compressedClusterOf(batch, c, chunk);
      return stream === ZERO_CLUSTER ? compressCluster(batch.data(c)) : stream; // (a miss is never all zeros)
    });
  }

  /**
   * True when the stream inflates to exactly `data` (a synchronous read, as Dedup.sameBytes),
   * read as a guest read of the linked entry will read it: the whole sectors its descriptor
   * names. A stream whose end is damaged runs on into the bytes after it (I1).
   */
  sameBytes(offset: number, length: number, data: Buffer): boolean {
    const inflated = this.inflate(this.writer.file.readSync(offset, compressedReadLength(offset, length)));
    return inflated?.equals(data) ?? false;
  }

  /** Points guest cluster `guestCluster` at the stream: one reference on each cluster it touches, then its compressed entry. */
  link(guestCluster: number, offset: number, length: number): void {
    const [first, last] = this.span(offset, length);
    for (let c = first; c <= last; c++) this.writer.increment(c);
    this.writer.mapCompressed(guestCluster, offset, length);
  }

  /**
   * Writes `streams` as one framed run of new clusters, held when the holder can cover them
   * all (then each cluster's refcount is 1, the holder's, until link() adds the guests'),
   * and returns each stream's host offset. Not held (past the holder's reach: rare): the run
   * counts one reference per stream touching a cluster, the streams are not to be indexed.
   * Nothing names the run until the caller links its streams.
   */
  async writeRun(streams: Buffer[]): Promise<{ offsets: number[]; held: boolean }> {
    const w = this.writer;
    const { start, run } = await writeStreamRun(w, streams, w.refcountMax - 1 /* room for the holder's reference */, true);
    const first = start / w.clusterSize;
    // Before any entry names the run: the holder's table writes come at the commit, after the data.
    const held = this.holder.canHold(first + run.clusters - 1);
    if (held)
      await this.holder.holdRun(first, run.clusters); // allocate's reference is the holder's
    else countStreamReferences(w, start, run); // allocate's is one stream's
    return { offsets: run.offsets.map((o) => start + o), held };
  }

  /** Maps an unheld stream (writeRun's `held` false): its references were counted by writeRun. */
  mapUnheld(guestCluster: number, offset: number, length: number): void {
    this.writer.mapCompressed(guestCluster, offset, length);
  }

  /**
   * The uncompressed bytes of every framed stream touching host cluster `cluster`, with its
   * offset: for the deletion of their index entries before the cluster is freed. Reads the
   * cluster and the one before (synchronously); a header-like pattern that does not inflate
   * to one cluster is skipped (the caller deletes only entries naming exactly these offsets).
   */
  streamsTouching(cluster: number): { offset: number; data: Buffer }[] {
    const cs = this.writer.clusterSize;
    const from = Math.max(0, cluster - 1) * cs;
    const bytes = this.writer.file.readSync(from, (cluster + 1) * cs - from);
    const out: { offset: number; data: Buffer }[] = [];
    for (const s of framedStreamsTouching(bytes, from, cs, cluster)) {
      const data = this.inflate(this.writer.file.readSync(s.offset, s.length));
      if (data) out.push({ offset: s.offset, data });
    }
    return out;
  }

  /** One cluster inflated from `stream`, or null when it does not inflate to exactly that. */
  private inflate(stream: Buffer): Buffer | null {
    const cs = this.writer.clusterSize;
    try {
      const data = inflateCluster(stream, cs);
      return data.length === cs ? data : null;
    } catch {
      return null;
    }
  }
}
