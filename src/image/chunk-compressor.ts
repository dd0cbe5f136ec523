// Compresses the clusters of a write chunk on worker threads while the main thread writes the
// chunk before it (`write -c`, `convert -c`; the write pipeline, docs/DESIGN.md). Each cluster
// becomes a raw deflate stream exactly as ../format/deflate.ts makes it, written into a
// shared result: the stream at `i × clusterSize`, its length in `lengths[i]` (0: it did not
// shrink and is stored plain; -1: all zeros, a zero cluster). Clusters are shared out as
// ./chunk-workers.ts describes, so the result never depends on the workers.

import { createRequire } from 'node:module';
import { InternalError } from '../errors.ts';
import { isZero } from '../format/bytes.ts';
import { DEFLATE_LEVEL, DEFLATE_MEM_LEVEL, DEFLATE_WINDOW_BITS, compressCluster } from '../format/deflate.ts';
import type { ClusterBatch } from './write-policy.ts';
import { CLUSTER_LOOP_SOURCE, MIN_WORKER_BYTES, SharedClusterWork, WorkerPool, controlLayout } from './chunk-workers.ts';

/** os.availableParallelism(): node:os is loaded when a compressor is made, not with this module (every start of `info` loads it). */
const cpus = (): number => (createRequire(import.meta.url)('node:os') as typeof import('node:os')).availableParallelism();

/** `lengths[i]` of an all-zero cluster. */
export const ZERO_CLUSTER = -1;
/** `lengths[i]` of a cluster that does not shrink (stored plain). */
export const INCOMPRESSIBLE = 0;

/** Layout of a chunk's shared result: count streams of up to a cluster, count Int32 lengths, then the control tail. */
function resultLayout(count: number, clusterSize: number) {
  const lengths = count * clusterSize;
  const control = controlLayout(lengths + count * 4, count);
  return { lengths, ...control };
}

const WORKER_SOURCE = `'use strict';
const { parentPort } = require('node:worker_threads');
const zlib = require('node:zlib');
const options = { level: ${DEFLATE_LEVEL}, windowBits: ${DEFLATE_WINDOW_BITS}, memLevel: ${DEFLATE_MEM_LEVEL} };
let zeros = Buffer.alloc(0);
${CLUSTER_LOOP_SOURCE}
parentPort.on('message', (m) => {
  try {
    const cs = m.clusterSize;
    const data = Buffer.from(m.data, m.byteOffset, m.count * cs);
    const out = Buffer.from(m.out);
    const lengths = new Int32Array(m.out, m.lengthsOffset, m.count);
    if (zeros.length < cs) zeros = Buffer.alloc(cs);
    const zero = zeros.subarray(0, cs);
    takeClusters(m, (first, end) => {
      for (let i = first; i < end; i++) {
        const cluster = data.subarray(i * cs, (i + 1) * cs);
        if (cluster.equals(zero)) {
          Atomics.store(lengths, i, ${ZERO_CLUSTER});
          continue;
        }
        const z = zlib.deflateRawSync(cluster, options);
        if (z.length >= cs) {
          Atomics.store(lengths, i, ${INCOMPRESSIBLE});
          continue;
        }
        z.copy(out, i * cs);
        Atomics.store(lengths, i, z.length);
      }
    });
    parentPort.postMessage({ id: m.id });
  } catch (e) {
    parentPort.postMessage({ id: m.id, error: String((e && e.stack) || e) });
  }
});`;

/** The compressed clusters of a chunk: stream i is `streams[i × clusterSize …][0, lengths[i])`. */
export interface CompressedChunk {
  readonly count: number;
  readonly clusterSize: number;
  readonly streams: Buffer;
  readonly lengths: Int32Array;
}

/**
 * Whole cluster `c` of `batch` compressed: from `chunk` when the workers compressed the chunk
 * it came from, else here. ZERO_CLUSTER when it is all zeros, null when it does not shrink.
 */
export function compressedClusterOf(batch: ClusterBatch, c: number, chunk: CompressedChunk | undefined): Buffer | null | typeof ZERO_CLUSTER {
  const i = chunk ? batch.prepared[c] : -1;
  if (i < 0) return batch.isZero(c) ? ZERO_CLUSTER : compressCluster(batch.data(c));
  const length = chunk!.lengths[i];
  if (length === ZERO_CLUSTER) return ZERO_CLUSTER;
  return length === INCOMPRESSIBLE ? null : chunk!.streams.subarray(i * chunk!.clusterSize, i * chunk!.clusterSize + length);
}

/** A chunk being compressed, by the workers and by complete(). Its fields are the CompressedChunk once complete() returned. */
export class PendingCompression implements CompressedChunk {
  readonly streams: Buffer;
  readonly lengths: Int32Array;
  private readonly work: SharedClusterWork;

  constructor(
    private readonly chunk: Buffer,
    private readonly start: number,
    readonly count: number,
    readonly clusterSize: number,
    readonly out: SharedArrayBuffer | ArrayBuffer,
  ) {
    const l = resultLayout(count, clusterSize);
    this.streams = Buffer.from(out, 0, l.lengths);
    this.lengths = new Int32Array(out, l.lengths, count);
    this.work = new SharedClusterWork(count, out, l);
  }

  /** Compresses every cluster the workers have not taken, waits for those they are on; synchronous. */
  complete(): CompressedChunk {
    this.work.complete((first, end) => {
      for (let i = first; i < end; i++) this.compress(i);
    });
    return this;
  }

  private compress(i: number): void {
    const cs = this.clusterSize;
    const cluster = this.chunk.subarray(this.start + i * cs, this.start + (i + 1) * cs);
    if (isZero(cluster)) return void Atomics.store(this.lengths, i, ZERO_CLUSTER);
    const z = compressCluster(cluster);
    if (!z) return void Atomics.store(this.lengths, i, INCOMPRESSIBLE);
    z.copy(this.streams, i * cs);
    Atomics.store(this.lengths, i, z.length);
  }
}

/** Compression workers: one per core, up to this many (each costs ~10 MiB and ~40 ms to start). */
const MAX_WORKERS = 8;

/** Worker threads compressing whole chunks in turn, one per core (the main thread helps in complete()). */
export class ChunkCompressor {
  private readonly pool = new WorkerPool('qdedup-compress', WORKER_SOURCE, Math.min(MAX_WORKERS, Math.max(1, cpus())));

  constructor(readonly clusterSize: number) {}

  /**
   * Starts compressing the `count` whole clusters of `chunk` from byte `start`: on the
   * workers when `chunk` is in shared memory and large enough (it must not change until the
   * result is complete). The caller finishes it with complete().
   */
  begin(chunk: Buffer, start: number, count: number): PendingCompression {
    const cs = this.clusterSize;
    if (start < 0 || start + count * cs > chunk.length) {
      throw new InternalError(`ChunkCompressor: clusters ${start}+${count}×${cs} past a chunk of ${chunk.length} bytes`);
    }
    const l = resultLayout(count, cs);
    const shared = chunk.buffer instanceof SharedArrayBuffer && count * cs >= MIN_WORKER_BYTES && this.pool.available;
    const p = new PendingCompression(chunk, start, count, cs, shared ? new SharedArrayBuffer(l.bytes) : new ArrayBuffer(l.bytes));
    if (shared && count > 0) {
      this.pool
        .post({
          data: chunk.buffer,
          byteOffset: chunk.byteOffset + start,
          count,
          clusterSize: cs,
          out: p.out,
          lengthsOffset: l.lengths,
          doneOffset: l.done,
          ctrlOffset: l.ctrl,
        })
        .catch(() => {}); // complete() does what the workers leave
    }
    return p;
  }

  async close(): Promise<void> {
    await this.pool.close();
  }
}
