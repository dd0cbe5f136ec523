// Compressed writes (`write -c`, `convert -c`): each whole guest cluster of a batch is stored as
// a raw deflate stream (../format/deflate.ts), the streams of the batch packed byte-tight into
// one run of new clusters (./compressed-packing.ts) and named by compressed L2 descriptors —
// what `qemu-img convert -c` writes, so stock QEMU reads it. A cluster that does not shrink is
// stored plain; an all-zero cluster becomes a zero cluster. Streams come from the chunk
// compressor's workers when the write pipeline prepared the chunk, else are made here.
//
// Order within a batch, as for plain runs (I3): the run is allocated and written (behind,
// during a pipelined write) before any L2 entry names it; the L2 tables reach the disk only
// at the commit, after the data (Image.flush). Old references are dropped after their
// replacement is mapped.

import { compressCluster } from '../format/deflate.ts';
import { encodeStreamHeader } from '../format/stream-header.ts';
import { ChunkCompressor, ZERO_CLUSTER, compressedClusterOf, type CompressedChunk, type PendingCompression } from './chunk-compressor.ts';
import { packStreams, type PackedRun } from './compressed-packing.ts';
import type { ClusterBatch, ImageWriter } from './write-policy.ts';

export class CompressedWriter {
  private compressor: ChunkCompressor | null = null;

  /**
   * `zeroClusters`: an all-zero cluster may become a zero cluster (not in a v2 image with a
   * backing file, where that would read the backing file's bytes: such zeros are compressed).
   */
  constructor(
    private readonly writer: ImageWriter,
    private readonly zeroClusters: boolean,
  ) {}

  /** Starts compressing a chunk of the write pipeline (Image.prepare); writeClusters() gets the result. */
  prepare(chunk: Buffer, start: number, count: number): PendingCompression {
    this.compressor ??= new ChunkCompressor(this.writer.clusterSize);
    return this.compressor.begin(chunk, start, count);
  }

  /** Writes a batch of whole guest clusters: zero clusters, one plain run, one packed run of streams. */
  async writeClusters(batch: ClusterBatch, prepared?: unknown): Promise<void> {
    const w = this.writer;
    const cs = w.clusterSize;
    const chunk: CompressedChunk | undefined = (prepared as PendingCompression | undefined)?.complete();
    // Batch indexes of the clusters that become zero clusters, stay plain, are compressed.
    const zeros: number[] = [];
    const plain: number[] = [];
    const packed: number[] = [];
    const streams: Buffer[] = [];
    for (let c = 0; c < batch.length; c++) {
      let stream = compressedClusterOf(batch, c, chunk);
      if (stream === ZERO_CLUSTER) {
        if (this.zeroClusters) {
          if (!w.readsAsZeros(batch.old[c])) zeros.push(c);
          continue;
        }
        stream = compressCluster(batch.data(c));
      }
      if (stream) {
        packed.push(c);
        streams.push(stream);
      } else plain.push(c);
    }
    await w.prepareTables([...zeros, ...plain, ...packed].map((c) => batch.guest[c]));
    for (const c of zeros) w.zeroCluster(batch.guest[c], batch.old[c]); // no policy: never a promise
    if (plain.length) {
      const start = await w.writeRun(batch.views(plain));
      plain.forEach((c, k) => {
        w.mapCluster(batch.guest[c], start + k * cs, true);
        w.dropReference(batch.old[c]);
      });
    }
    if (!packed.length) return;
    const { start, run } = await writeStreamRun(w, streams, w.refcountMax, false);
    countStreamReferences(w, start, run);
    packed.forEach((c, k) => {
      w.mapCompressed(batch.guest[c], start + run.offsets[k], streams[k].length);
      w.dropReference(batch.old[c]);
    });
  }

  async close(): Promise<void> {
    await this.compressor?.close();
  }
}

/**
 * Writes `streams` packed into one run of new clusters (`framed`: each after its header, as in
 * a dedup image) and returns where: the run's host offset and its layout. Each cluster of the
 * run has refcount 1 (allocate's); the caller counts the other references.
 */
export async function writeStreamRun(w: ImageWriter, streams: Buffer[], maxTouches: number, framed: boolean): Promise<{ start: number; run: PackedRun }> {
  const cs = w.clusterSize;
  const run = packStreams(
    streams.map((s) => s.length),
    cs,
    maxTouches,
    framed,
  );
  const start = await w.allocate(run.clusters);
  const bytes = Buffer.alloc(run.clusters * cs);
  streams.forEach((s, k) => {
    if (framed) encodeStreamHeader(bytes, run.headers[k], s.length);
    s.copy(bytes, run.offsets[k]);
  });
  await w.writeBytes(start, bytes);
  return { start, run };
}

/** One reference per stream touching each cluster of a run writeStreamRun wrote (allocate's is the first). */
export function countStreamReferences(w: ImageWriter, start: number, run: PackedRun): void {
  for (let k = 0; k < run.clusters; k++) for (let t = 1; t < run.touches[k]; t++) w.increment(start / w.clusterSize + k);
}
