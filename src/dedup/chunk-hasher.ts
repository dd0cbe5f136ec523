// Hashes the clusters of a write chunk on a worker thread while the main thread decides and
// writes the chunk before it (the write pipeline, docs/DESIGN.md "Write pipeline"). The
// chunk lives in shared memory (a SharedArrayBuffer the engine's chunk ring allocates): the
// worker reads it in place, writes one 32-byte hash and one zero flag per cluster into a
// shared result, and answers with one message per chunk — no copies, no per-cluster
// messages. All-zero clusters are found there too and not hashed.
//
// The results never depend on the worker: a chunk not in shared memory, or a worker that
// fails or cannot start, is hashed on the main thread by the same functions.

import { Worker } from 'node:worker_threads';
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
    const cs = m.clusterSize;
    const data = Buffer.from(m.data, m.byteOffset, m.count * cs);
    const out = new Uint8Array(m.out);
    if (zeros.length < cs) zeros = Buffer.alloc(cs);
    const zero = zeros.subarray(0, cs);
    for (let i = 0, at = 0; i < m.count; i++, at += cs) {
      const cluster = data.subarray(at, at + cs);
      if (cluster.equals(zero)) out[m.count * 32 + i] = 1;
      else if (m.algorithm === 'blake3') blake3Into(data, at, cs, out, i * 32);
      else out.set(crypto.hash(m.algorithm, cluster, 'buffer'), i * 32);
    }
    parentPort.postMessage({ id: m.id });
  } catch (e) {
    parentPort.postMessage({ id: m.id, error: String((e && e.stack) || e) });
  }
});`;

/** Chunks smaller than this are hashed on the main thread: a worker takes 30–50 ms to start. */
const MIN_WORKER_BYTES = 1024 * 1024;

/**
 * One worker thread hashing whole chunks in turn. Up to two chunks may be out at once (the
 * pipeline hashes chunk N+1 while N is decided); the worker takes them in order.
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
   * The digest of the `count` whole clusters of `chunk` from byte `start`. Hashed on the worker
   * when `chunk` is in shared memory (it must not change until the promise settles) and at
   * least MIN_WORKER_BYTES, else here.
   */
  async digest(chunk: Buffer, start: number, count: number): Promise<ChunkDigest> {
    const cs = this.clusterSize;
    if (start < 0 || start + count * cs > chunk.length)
      throw new InternalError(`ChunkHasher: clusters ${start}+${count}×${cs} past a chunk of ` + `${chunk.length} bytes`);
    const shared = chunk.buffer instanceof SharedArrayBuffer && count * cs >= MIN_WORKER_BYTES;
    const out = shared ? new SharedArrayBuffer(count * (HASH_BYTES + 1)) : new ArrayBuffer(count * (HASH_BYTES + 1));
    const result: ChunkDigest = { count, hashes: Buffer.from(out, 0, count * HASH_BYTES), zero: new Uint8Array(out, count * HASH_BYTES, count) };
    if (count === 0) return result;
    if (shared && this.start()) {
      try {
        await this.run({ data: chunk.buffer, byteOffset: chunk.byteOffset + start, count, clusterSize: cs, algorithm: this.algorithm, out });
        return result;
      } catch {
        this.failed = true; // hashed below; later chunks too
        result.zero.fill(0);
      }
    }
    for (let i = 0, at = start; i < count; i++, at += cs) {
      if (isZero(chunk.subarray(at, at + cs))) result.zero[i] = 1;
      else this.into(chunk, at, cs, 1, result.hashes, i * HASH_BYTES);
    }
    return result;
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
      const w = new Worker(WORKER_SOURCE, { eval: true, name: 'qdedup-hash' });
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

  private run(job: {
    data: ArrayBufferLike;
    byteOffset: number;
    count: number;
    clusterSize: number;
    algorithm: string;
    out: SharedArrayBuffer | ArrayBuffer;
  }): Promise<void> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.worker!.ref(); // keep the process alive while a chunk is out
      this.worker!.postMessage({ id, ...job });
    });
  }
}
