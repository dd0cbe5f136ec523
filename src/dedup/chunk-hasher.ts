// Hashes the clusters of a write chunk on a worker thread while the main thread decides and
// writes the chunk before it (the write pipeline, docs/DESIGN.md "Write pipeline"). The
// chunk lives in shared memory (a SharedArrayBuffer the engine's chunk ring allocates): the
// worker reads it in place and writes one 32-byte hash and one zero flag per cluster into a
// shared result — no copies, no per-cluster messages. All-zero clusters are found there
// too and not hashed.
//
// The clusters are shared out through an atomic counter (../image/chunk-workers.ts, which
// the compression workers share): the worker takes them in runs of CLUSTERS_PER_TAKE
// from the start, and when the main thread needs the digest (complete()) before the worker
// is done, it takes the rest itself instead of waiting. So a worker starved of CPU (two
// cores, the kernel's writeback and the thread pool's copies) never leaves the main thread
// idle, and a worker that fails or cannot start leaves it all to the main thread: the
// results never depend on the worker.

import { InternalError } from '../errors.ts';
import { isZero } from '../format/bytes.ts';
import { makeBlake3 } from './blake3.ts';
import { makeNativeSha256, nativeSha256Path } from './native-sha256.ts';
import { HASH_BYTES } from '../format/hash-entry.ts';
import { CLUSTER_LOOP_SOURCE, MIN_WORKER_BYTES, SharedClusterWork, WorkerPool, controlLayout } from '../image/chunk-workers.ts';
import { LITTLE_ENDIAN, clustersInto, type ClustersInto, type SupportedHashAlgorithm } from './hasher.ts';

/** The hashes of a chunk's clusters: hash i at `hashes[32 i …]`, `zero[i]` = 1 for an all-zero cluster (its hash not computed). */
export interface ChunkDigest {
  readonly count: number;
  readonly hashes: Buffer;
  readonly zero: Uint8Array;
}

/**
 * Digests clusters [first, end) of a chunk whose cluster 0 starts at data[start]: each
 * all-zero cluster is flagged in `zero` (its hash not computed), and each stretch of the
 * others is hashed by one call of `into` (the native SHA-256 takes up to eight clusters at
 * once), hash i at hashes[32 i …]. The main thread and the worker run it (the worker its
 * source, with its own `isZero`), so it uses nothing from outside itself.
 */
export function digestRun(
  data: Uint8Array,
  start: number,
  cs: number,
  first: number,
  end: number,
  isZero: (cluster: Uint8Array) => boolean,
  into: ClustersInto,
  hashes: Uint8Array,
  zero: Uint8Array,
): void {
  let from = first; // the first cluster of the stretch not hashed yet
  for (let i = first; i < end; i++) {
    const at = start + i * cs;
    // A byte other than zero at either end: not zero (most clusters), without a slice.
    if (data[at] !== 0 || data[at + cs - 1] !== 0 || !isZero(data.subarray(at, at + cs))) continue;
    zero[i] = 1;
    if (i > from) into(data, start + from * cs, cs, i - from, hashes, from * 32);
    from = i + 1;
  }
  if (end > from) into(data, start + from * cs, cs, end - from, hashes, from * 32);
}

/** Layout of a chunk's shared result: `count` hashes, `count` zero flags, then the control tail (../image/chunk-workers.ts). */
function resultLayout(count: number): { zero: number; done: number; ctrl: number; bytes: number } {
  const zero = count * HASH_BYTES;
  return { zero, ...controlLayout(zero + count, count) };
}

// The worker runs this as a CommonJS script (eval), so it needs no file of its own and
// works the same from the TypeScript sources and from the esbuild bundle. `__name` is a
// no-op shim for the helper some transpilers (tsx's esbuild with keepNames) insert.
// `nativePath`: koffi's file, for OpenSSL's SHA256_* (./native-sha256.ts); null: crypto.hash.
function workerSource(nativePath: string | null): string {
  return `'use strict';
const { parentPort } = require('node:worker_threads');
let crypto; // node:crypto, loaded only where OpenSSL's own functions are not used (~9 ms)
const __name = (f) => f;
const blake3Into = (${makeBlake3.toString()})();
// Made at the first sha256 job, not at start: a job keeps the worker alive, so the process
// never ends this thread while koffi loads.
const makeSha256 = ${nativePath ? `() => (${makeNativeSha256.toString()})(require, ${JSON.stringify(nativePath)})` : '() => null'};
let sha256Into;
let zeros = Buffer.alloc(0);
const isZero = (cluster) => cluster.equals(zeros.subarray(0, cluster.length));
const oneByOne = (hashOne) => (data, at, cs, count, out, outOff) => {
  for (let k = 0; k < count; k++) hashOne(data, at + k * cs, cs, out, outOff + k * 32);
};
const blake3Clusters = oneByOne(blake3Into);
const cryptoClusters = (algorithm) =>
  oneByOne((data, at, cs, out, outOff) => out.set((crypto ??= require('node:crypto')).hash(algorithm, data.subarray(at, at + cs), 'buffer'), outOff));
const digestRun = (${digestRun.toString()});
${CLUSTER_LOOP_SOURCE}
parentPort.on('message', (m) => {
  try {
    const cs = m.clusterSize, n = m.count;
    const data = Buffer.from(m.data, m.byteOffset, n * cs);
    const out = new Uint8Array(m.out);
    const zero = new Uint8Array(m.out, n * 32, n);
    if (zeros.length < cs) zeros = Buffer.alloc(cs);
    if (m.algorithm === 'sha256' && sha256Into === undefined) sha256Into = makeSha256();
    const into = m.algorithm === 'blake3' ? blake3Clusters : (m.algorithm === 'sha256' && sha256Into) || cryptoClusters(m.algorithm);
    takeClusters(m, (first, end) => digestRun(data, 0, cs, first, end, isZero, into, out, zero));
    parentPort.postMessage({ id: m.id });
  } catch (e) {
    parentPort.postMessage({ id: m.id, error: String((e && e.stack) || e) });
  }
});`;
}

/**
 * A chunk being hashed: by the worker, and by the main thread in complete(). Its fields are
 * the ChunkDigest once complete() has returned.
 */
export class PendingDigest implements ChunkDigest {
  readonly hashes: Buffer;
  readonly zero: Uint8Array;
  private readonly work: SharedClusterWork;

  constructor(
    private readonly into: ClustersInto,
    private readonly chunk: Buffer,
    private readonly start: number,
    readonly count: number,
    readonly clusterSize: number,
    readonly out: SharedArrayBuffer | ArrayBuffer,
  ) {
    const l = resultLayout(count);
    this.hashes = Buffer.from(out, 0, l.zero);
    this.zero = new Uint8Array(out, l.zero, count);
    this.work = new SharedClusterWork(count, out, l);
  }

  /** Hashes every cluster no one has taken yet, then waits for those the worker is hashing. Synchronous. Returns the finished digest. */
  complete(): ChunkDigest {
    this.work.complete((first, end) => digestRun(this.chunk, this.start, this.clusterSize, first, end, isZero, this.into, this.hashes, this.zero));
    return this;
  }
}

/**
 * One worker thread hashing whole chunks in turn (the pipeline hands it chunk N+1 while N is
 * decided); the worker takes them in order, and the main thread finishes each one it needs.
 */
export class ChunkHasher {
  private readonly pool: WorkerPool;
  private readonly into: ClustersInto;
  /** The BLAKE3 of the worker is makeBlake3, little-endian only: elsewhere the main thread hashes. */
  private readonly mainOnly: boolean;
  /** The chunk given to the worker last (digest() waits for it). */
  private lastJob: Promise<void> | null = null;

  constructor(
    readonly algorithm: SupportedHashAlgorithm,
    readonly clusterSize: number,
  ) {
    this.into = clustersInto(algorithm);
    this.mainOnly = algorithm === 'blake3' && !LITTLE_ENDIAN;
    this.pool = new WorkerPool('qdedup-hash', workerSource(algorithm === 'sha256' ? nativeSha256Path() : null), 1);
  }

  /**
   * Starts hashing the `count` whole clusters of `chunk` from byte `start`: on the worker when
   * `chunk` is in shared memory and at least MIN_WORKER_BYTES (it must not change until the
   * digest is complete). The caller finishes it with complete(), synchronously.
   */
  begin(chunk: Buffer, start: number, count: number): PendingDigest {
    const cs = this.clusterSize;
    if (start < 0 || start + count * cs > chunk.length) {
      throw new InternalError(`ChunkHasher: clusters ${start}+${count}×${cs} past a chunk of ${chunk.length} bytes`);
    }
    const l = resultLayout(count);
    const shared = chunk.buffer instanceof SharedArrayBuffer && count * cs >= MIN_WORKER_BYTES && !this.mainOnly && this.pool.available;
    const d = new PendingDigest(this.into, chunk, start, count, cs, shared ? new SharedArrayBuffer(l.bytes) : new ArrayBuffer(l.bytes));
    if (shared && count > 0) {
      this.lastJob = this.pool.post({
        data: chunk.buffer,
        byteOffset: chunk.byteOffset + start,
        count,
        clusterSize: cs,
        algorithm: this.algorithm,
        out: d.out,
        doneOffset: l.done,
        ctrlOffset: l.ctrl,
      });
    }
    return d;
  }

  /** The digest of the `count` whole clusters of `chunk` from byte `start`, hashed by the worker (and this thread only if it fails). */
  async digest(chunk: Buffer, start: number, count: number): Promise<ChunkDigest> {
    const d = this.begin(chunk, start, count);
    const last = this.lastJob;
    if (last) await last.catch(() => {});
    return d.complete();
  }

  /** Ends the worker (the process may also just exit: it does not keep it alive when idle). */
  async close(): Promise<void> {
    await this.pool.close();
  }
}
