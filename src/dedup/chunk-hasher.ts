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
${CLUSTER_LOOP_SOURCE}
parentPort.on('message', (m) => {
  try {
    const cs = m.clusterSize, n = m.count;
    const data = Buffer.from(m.data, m.byteOffset, n * cs);
    const out = new Uint8Array(m.out);
    if (zeros.length < cs) zeros = Buffer.alloc(cs);
    const zero = zeros.subarray(0, cs);
    if (m.algorithm === 'sha256' && sha256Into === undefined) sha256Into = makeSha256();
    const native = m.algorithm === 'sha256' ? sha256Into : null;
    takeClusters(m, (i) => {
      const at = i * cs;
      // A byte other than zero at either end: not zero (most clusters), without a memcmp.
      if (data[at] === 0 && data[at + cs - 1] === 0 && data.subarray(at, at + cs).equals(zero)) out[n * 32 + i] = 1;
      else if (m.algorithm === 'blake3') blake3Into(data, at, cs, out, i * 32);
      else if (native) native(data, at, cs, out, i * 32);
      else out.set((crypto ??= require('node:crypto')).hash(m.algorithm, data.subarray(at, at + cs), 'buffer'), i * 32);
    });
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
    this.work.complete((i) => this.hash(i));
    return this;
  }

  private hash(i: number): void {
    const cs = this.clusterSize;
    const at = this.start + i * cs;
    const c = this.chunk;
    if (c[at] === 0 && c[at + cs - 1] === 0 && isZero(c.subarray(at, at + cs)))
      this.zero[i] = 1; // no slice for most clusters (isZero's first test)
    else this.into(c, at, cs, 1, this.hashes, i * HASH_BYTES);
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
