// Hashes the clusters of a write chunk on a worker thread while the main thread decides and
// writes the chunk before it (the write pipeline, docs/DESIGN.md "Write pipeline"). The
// chunk lives in shared memory (a SharedArrayBuffer the engine's chunk ring allocates): the
// worker reads it in place and writes one 32-byte hash and one zero flag per cluster into a
// shared result — no copies, no per-cluster messages. All-zero clusters are found there
// too and not hashed.
//
// The clusters are shared out through an atomic counter: the worker takes them one by one
// from the start, and when the main thread needs the digest (complete()) before the worker
// is done, it takes the rest itself instead of waiting. So a worker starved of CPU (two
// cores, the kernel's writeback and the thread pool's copies) never leaves the main thread
// idle, and a worker that fails or cannot start leaves it all to the main thread: the
// results never depend on the worker.

import { createRequire } from 'node:module';
import type { Worker } from 'node:worker_threads';
import { InternalError } from '../errors.ts';
import { isZero } from '../format/bytes.ts';
import { makeBlake3 } from './blake3.ts';
import { HASH_BYTES } from '../format/hash-entry.ts';
import { LITTLE_ENDIAN, clustersInto, type ClustersInto, type SupportedHashAlgorithm } from './hasher.ts';

/** The hashes of a chunk's clusters: hash i at `hashes[32 i …]`, `zero[i]` = 1 for an all-zero cluster (its hash not computed). */
export interface ChunkDigest {
  readonly count: number;
  readonly hashes: Buffer;
  readonly zero: Uint8Array;
}

/**
 * Layout of a chunk's shared result: `count` hashes, `count` zero flags, `count` done flags,
 * then (4-aligned) two Int32 counters: the next cluster to take, the clusters done.
 */
function resultLayout(count: number): { zero: number; done: number; ctrl: number; bytes: number } {
  const zero = count * HASH_BYTES;
  const done = zero + count;
  const ctrl = Math.ceil((done + count) / 4) * 4;
  return { zero, done, ctrl, bytes: ctrl + 8 };
}

/** How long complete() waits for the worker's last cluster before hashing it too (it is idempotent). */
const STALL_MS = 500;

// The worker runs this as a CommonJS script (eval), so it needs no file of its own and
// works the same from the TypeScript sources and from the esbuild bundle. `__name` is a
// no-op shim for the helper some transpilers (tsx's esbuild with keepNames) insert.
const WORKER_SOURCE = `'use strict';
const { parentPort } = require('node:worker_threads');
const crypto = require('node:crypto');
const __name = (f) => f;
const blake3Into = (${makeBlake3.toString()})();
let zeros = Buffer.alloc(0);
parentPort.on('message', (m) => {
  try {
    const cs = m.clusterSize, n = m.count;
    const data = Buffer.from(m.data, m.byteOffset, n * cs);
    const out = new Uint8Array(m.out);
    const done = new Uint8Array(m.out, m.doneOffset, n);
    const ctrl = new Int32Array(m.out, m.ctrlOffset, 2);
    if (zeros.length < cs) zeros = Buffer.alloc(cs);
    const zero = zeros.subarray(0, cs);
    for (;;) {
      const i = Atomics.add(ctrl, 0, 1);
      if (i >= n) break;
      const at = i * cs;
      const cluster = data.subarray(at, at + cs);
      if (cluster.equals(zero)) out[n * 32 + i] = 1;
      else if (m.algorithm === 'blake3') blake3Into(data, at, cs, out, i * 32);
      else out.set(crypto.hash(m.algorithm, cluster, 'buffer'), i * 32);
      Atomics.store(done, i, 1);
      Atomics.add(ctrl, 1, 1);
      Atomics.notify(ctrl, 1);
    }
    parentPort.postMessage({ id: m.id });
  } catch (e) {
    parentPort.postMessage({ id: m.id, error: String((e && e.stack) || e) });
  }
});`;

/**
 * A chunk being hashed: by the worker, and by the main thread in complete(). Its fields are
 * the ChunkDigest once complete() has returned.
 */
export class PendingDigest implements ChunkDigest {
  readonly hashes: Buffer;
  readonly zero: Uint8Array;
  private readonly done: Uint8Array;
  private readonly ctrl: Int32Array;
  private completed = false;

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
    this.done = new Uint8Array(out, l.done, count);
    this.ctrl = new Int32Array(out, l.ctrl, 2);
  }

  /**
   * Hashes every cluster no one has taken yet, then waits for those the worker is hashing
   * (a few microseconds; after STALL_MS without progress it hashes them too: the same bytes).
   * Synchronous. Returns the finished digest.
   */
  complete(): ChunkDigest {
    if (this.completed) return this;
    const { ctrl, done, count } = this;
    const shared = this.out instanceof SharedArrayBuffer;
    for (;;) {
      const i = shared ? Atomics.add(ctrl, 0, 1) : ctrl[0]++;
      if (i >= count) break;
      this.hash(i);
    }
    let seen = Atomics.load(ctrl, 1);
    let since = performance.now();
    while (seen < count) {
      if (shared) Atomics.wait(ctrl, 1, seen, 1);
      const now = Atomics.load(ctrl, 1);
      if (now !== seen) {
        seen = now;
        since = performance.now();
      } else if (performance.now() - since > STALL_MS) {
        // A worker that stopped mid-cluster (killed, stuck): hash what it did not finish.
        for (let i = 0; i < count; i++) if (Atomics.load(done, i) === 0) this.hash(i);
        break;
      }
    }
    this.completed = true;
    return this;
  }

  private hash(i: number): void {
    const cs = this.clusterSize;
    const at = this.start + i * cs;
    if (isZero(this.chunk.subarray(at, at + cs))) this.zero[i] = 1;
    else this.into(this.chunk, at, cs, 1, this.hashes, i * HASH_BYTES);
    Atomics.store(this.done, i, 1);
    Atomics.add(this.ctrl, 1, 1);
  }
}

/** Chunks smaller than this are hashed on the main thread: a worker takes 30–50 ms to start. */
const MIN_WORKER_BYTES = 1024 * 1024;

/**
 * One worker thread hashing whole chunks in turn (the pipeline hands it chunk N+1 while N is
 * decided); the worker takes them in order, and the main thread finishes each one it needs.
 */
export class ChunkHasher {
  private worker: Worker | null = null;
  private failed = false;
  private nextId = 0;
  private readonly waiting = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  private readonly into: ClustersInto;

  constructor(
    readonly algorithm: SupportedHashAlgorithm,
    readonly clusterSize: number,
  ) {
    this.into = clustersInto(algorithm);
    // The worker's BLAKE3 is makeBlake3, little-endian only: elsewhere the main thread hashes.
    if (algorithm === 'blake3' && !LITTLE_ENDIAN) this.failed = true;
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
    const shared = chunk.buffer instanceof SharedArrayBuffer && count * cs >= MIN_WORKER_BYTES;
    const bytes = resultLayout(count).bytes;
    const d = new PendingDigest(this.into, chunk, start, count, cs, shared ? new SharedArrayBuffer(bytes) : new ArrayBuffer(bytes));
    if (shared && count > 0 && this.start()) {
      const l = resultLayout(count);
      const job = {
        data: chunk.buffer,
        byteOffset: chunk.byteOffset + start,
        count,
        clusterSize: cs,
        algorithm: this.algorithm,
        out: d.out,
        doneOffset: l.done,
        ctrlOffset: l.ctrl,
      };
      this.run(job).catch(() => {
        this.failed = true; // complete() hashes what it left; later chunks stay on the main thread
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
    const w = this.worker;
    this.worker = null;
    this.failed = true;
    if (w) await w.terminate();
  }

  private start(): boolean {
    if (this.failed) return false;
    if (this.worker) return true;
    try {
      // Loaded on first use: commands that never hash a chunk (info, check, …) do not pay for it.
      const { Worker: WorkerThread } = createRequire(import.meta.url)('node:worker_threads') as typeof import('node:worker_threads');
      const w = new WorkerThread(WORKER_SOURCE, { eval: true, name: 'qdedup-hash' });
      w.unref();
      w.on('message', (m: { id: number; error?: string }) => {
        const p = this.waiting.get(m.id);
        this.waiting.delete(m.id);
        if (this.waiting.size === 0) w.unref();
        if (m.error !== undefined) p?.reject(new InternalError(`hash worker: ${m.error}`));
        else p?.resolve();
      });
      const fail = (e: Error) => {
        this.failed = true;
        for (const p of this.waiting.values()) p.reject(e);
        this.waiting.clear();
      };
      w.on('error', fail);
      w.on('exit', (code) => fail(new InternalError(`hash worker exited (code ${code})`)));
      this.worker = w;
      return true;
    } catch {
      this.failed = true; // no threads here (resource limits): the main thread hashes
      return false;
    }
  }

  /** The message of the chunk given to the worker last (digest() waits for it). */
  private lastJob: Promise<void> | null = null;

  private run(job: Record<string, unknown>): Promise<void> {
    const id = this.nextId++;
    this.lastJob = new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.worker!.ref(); // keep the process alive while a chunk is out
      this.worker!.postMessage({ id, ...job });
    });
    return this.lastJob;
  }
}
