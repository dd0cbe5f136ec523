// A batch of whole guest clusters waiting for new host clusters (or for a write policy's
// decision): parallel arrays, indexed by the cluster's place in the batch and reused from one
// batch to the next, so that the write path makes no object and no view per cluster
// (docs/PERFORMANCE.md "No object per cluster"). Cluster i's new bytes are the clusterSize
// bytes at `at[i]` of `source[i]`: the caller's buffer, or for a partial write a cluster read
// and patched. They are valid until the batch is written.

import { isZeroRange } from '../format/bytes.ts';
import type { L2Entry } from '../format/l1l2.ts';

export class ClusterBatch {
  /** Clusters in the batch: indexes 0 … length − 1 of the arrays below. */
  length = 0;
  /** Guest cluster number of each. */
  readonly guest: Float64Array;
  /** The buffer holding each one's new bytes… */
  readonly source: Buffer[];
  /** …and where in it they start. */
  readonly at: Float64Array;
  /** The L2 entry each replaces (its reference is dropped after the replacement is mapped). */
  readonly old: L2Entry[];
  /** Each one's index among the clusters of the prepared chunk it came from (PreparedChunk), or -1. */
  readonly prepared: Int32Array;

  constructor(
    readonly clusterSize: number,
    readonly capacity: number,
  ) {
    this.guest = new Float64Array(capacity);
    this.source = new Array<Buffer>(capacity);
    this.at = new Float64Array(capacity);
    this.old = new Array<L2Entry>(capacity);
    this.prepared = new Int32Array(capacity);
  }

  /** Adds a cluster (at most `capacity`). */
  push(guest: number, source: Buffer, at: number, old: L2Entry, prepared: number): void {
    const i = this.length++;
    this.guest[i] = guest;
    this.source[i] = source;
    this.at[i] = at;
    this.old[i] = old;
    this.prepared[i] = prepared;
  }

  /** Empties the batch, letting go of the buffers it named. */
  clear(): void {
    this.source.fill(undefined as unknown as Buffer, 0, this.length);
    this.old.fill(undefined as unknown as L2Entry, 0, this.length);
    this.length = 0;
  }

  /** Cluster i's bytes, as a view (for the paths that need one: each call makes one). */
  data(i: number): Buffer {
    return this.source[i].subarray(this.at[i], this.at[i] + this.clusterSize);
  }

  /** True when cluster i is all zeros (no view made). */
  isZero(i: number): boolean {
    return isZeroRange(this.source[i], this.at[i], this.at[i] + this.clusterSize);
  }

  /** True when cluster i's bytes equal `bytes` (no view made). */
  equals(i: number, bytes: Uint8Array): boolean {
    return bytes.length === this.clusterSize && this.source[i].compare(bytes, 0, bytes.length, this.at[i], this.at[i] + this.clusterSize) === 0;
  }

  /**
   * The bytes of the clusters `indexes` (in that order) as few views as they allow: clusters
   * that follow each other in one buffer share a view, one iovec of a writev.
   */
  views(indexes: ArrayLike<number>): Buffer[] {
    const out: Buffer[] = [];
    const cs = this.clusterSize;
    for (let k = 0; k < indexes.length; ) {
      const first = indexes[k];
      const source = this.source[first];
      const start = this.at[first];
      let end = start + cs;
      for (k++; k < indexes.length && this.source[indexes[k]] === source && this.at[indexes[k]] === end; k++) end += cs;
      out.push(source.subarray(start, end));
    }
    return out;
  }
}
