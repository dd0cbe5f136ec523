// The parallel cluster hasher: the main thread and a worker thread share each batch (see
// the measurements at the top of src/dedup/hasher.ts for when it pays).

import { Worker } from 'node:worker_threads';
import { makeBlake3 } from './blake3.ts';
import { InternalError } from '../errors.ts';
import {
  HASH_BYTES, LITTLE_ENDIAN, checkBatch, clustersInto, createHasher,
  type ClustersInto, type HashAlgorithm, type Hasher, type SupportedHashAlgorithm,
} from './hasher.ts';

// The worker runs this as a CommonJS script (eval), so it needs no file of its own and
// works the same from the TypeScript sources and from the esbuild bundle. `__name` is a
// no-op shim for the helper some transpilers (tsx's esbuild with keepNames) insert.
const WORKER_SOURCE = `'use strict';
const { parentPort } = require('node:worker_threads');
const crypto = require('node:crypto');
const __name = (f) => f;
const blake3Into = (${makeBlake3.toString()})();
const now = () => performance.timeOrigin + performance.now();
parentPort.on('message', (m) => {
  try {
    const input = new Uint8Array(m.input), output = new Uint8Array(m.output);
    for (let i = 0, at = m.inputOffset; i < m.count; i++, at += m.clusterSize) {
      const o = m.outputOffset + i * 32;
      if (m.algorithm === 'blake3') blake3Into(input, at, m.clusterSize, output, o);
      else output.set(crypto.hash(m.algorithm, input.subarray(at, at + m.clusterSize), 'buffer'), o);
    }
    parentPort.postMessage({ end: now() });
  } catch (e) {
    parentPort.postMessage({ error: String(e && e.stack || e) });
  }
});`;

interface WorkerJob {
  input: SharedArrayBuffer;
  inputOffset: number;
  output: SharedArrayBuffer;
  outputOffset: number;
  count: number;
  clusterSize: number;
  algorithm: SupportedHashAlgorithm;
}

class HashWorker {
  private readonly worker: Worker;
  private pending: { resolve: (end: number) => void; reject: (e: Error) => void } | undefined;
  failed: Error | undefined;
  /** Measured clusters per ms (0 = not measured yet). */
  rate = 0;

  constructor() {
    this.worker = new Worker(WORKER_SOURCE, { eval: true, name: 'qdedup-hash' });
    this.worker.unref();
    this.worker.on('message', (m: { end?: number; error?: string }) => {
      const p = this.pending;
      this.pending = undefined;
      this.worker.unref();
      if (!p) return;
      if (m.error !== undefined) p.reject(new InternalError(`hash worker: ${m.error}`));
      else p.resolve(m.end ?? 0);
    });
    const fail = (e: Error) => {
      this.failed ??= e;
      const p = this.pending;
      this.pending = undefined;
      p?.reject(e);
    };
    this.worker.on('error', fail);
    this.worker.on('exit', (code) => fail(new InternalError(`hash worker exited (code ${code})`)));
  }

  /** Resolves with the absolute time (performance.timeOrigin + now()) at which the worker finished. */
  run(job: WorkerJob): Promise<number> {
    if (this.failed) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => {
      this.pending = { resolve, reject };
      this.worker.ref(); // keep the process alive while a batch is out
      this.worker.postMessage(job);
    });
  }

  async terminate(): Promise<void> {
    this.failed ??= new InternalError('hash worker closed');
    await this.worker.terminate();
  }
}

export interface ParallelHasherOptions {
  /** Worker threads (default 1: with the main thread, both cores of the reference machine). */
  workers?: number;
  /** Whether the main thread hashes a share too (default true; false leaves it free but waits). */
  mainThread?: boolean;
  /** Batches smaller than this are hashed on the main thread alone (default 1 MiB). */
  minParallelBytes?: number;
}

const now = () => performance.timeOrigin + performance.now();

/**
 * Hashes batches of clusters on the main thread and worker threads together. The batch is
 * read synchronously during the call (the workers' share is copied out before it returns),
 * so the caller may reuse `data` as soon as hashClusters() has returned its promise. Shares
 * follow each participant's measured speed. A worker that fails is dropped and its share
 * hashed on the main thread: results never depend on the workers. One batch at a time: a
 * call made while another is out is hashed on the main thread. close() ends the workers.
 */
export class ParallelHasher {
  readonly algorithm: SupportedHashAlgorithm;
  readonly id: number;
  readonly minParallelBytes: number;
  private readonly sync: Hasher;
  private readonly into: ClustersInto;
  private readonly useMain: boolean;
  private workers: HashWorker[];
  private mainRate = 0;
  private busy = false;
  private input = new SharedArrayBuffer(0);
  private output = new SharedArrayBuffer(0);

  constructor(algorithm: HashAlgorithm | number, options: ParallelHasherOptions = {}) {
    this.sync = createHasher(algorithm);
    this.algorithm = this.sync.algorithm;
    this.id = this.sync.id;
    this.into = clustersInto(this.algorithm);
    this.useMain = options.mainThread ?? true;
    this.minParallelBytes = options.minParallelBytes ?? 1024 * 1024;
    const requested = options.workers ?? 1;
    if (!Number.isInteger(requested) || requested < 0 || (requested === 0 && !this.useMain)) throw new InternalError(`ParallelHasher: bad worker count ${requested}`);
    // The workers' BLAKE3 is makeBlake3, little-endian only: elsewhere the main thread hashes.
    const count = this.algorithm === 'blake3' && !LITTLE_ENDIAN ? 0 : requested;
    this.workers = [];
    try {
      for (let i = 0; i < count; i++) this.workers.push(new HashWorker());
    } catch {
      // No threads here (resource limits): the main thread does all the work.
    }
  }

  hash(data: Uint8Array): Buffer {
    return this.sync.hash(data);
  }

  /** Workers not failed nor closed. */
  get workerCount(): number {
    return this.workers.filter((w) => !w.failed).length;
  }

  async hashClusters(data: Uint8Array, clusterSize: number): Promise<Buffer> {
    const n = checkBatch(data, clusterSize);
    const workers = this.workers.filter((w) => !w.failed);
    const parties = workers.length + (this.useMain ? 1 : 0);
    if (this.busy || workers.length === 0 || data.length < this.minParallelBytes || n < parties) return this.sync.hashClusters(data, clusterSize);
    this.busy = true;
    try {
      return await this.hashShared(data, clusterSize, n, workers);
    } finally {
      this.busy = false;
    }
  }

  private async hashShared(data: Uint8Array, clusterSize: number, n: number, workers: HashWorker[]): Promise<Buffer> {
    const start = now();
    // Shares proportional to measured rates (equal until measured), main thread first.
    const rates = workers.map((w) => w.rate || 1);
    const mainRate = this.useMain ? this.mainRate || 1 : 0;
    const total = mainRate + rates.reduce((a, b) => a + b, 0);
    const mainCount = this.useMain ? Math.max(1, Math.min(n - workers.length, Math.round((n * mainRate) / total))) : 0;
    const shared = n - mainCount;
    const counts: number[] = [];
    let left = shared;
    for (let i = 0; i < workers.length; i++) {
      const c = i === workers.length - 1 ? left : Math.max(1, Math.min(left - (workers.length - 1 - i), Math.round((shared * rates[i]) / (total - mainRate))));
      counts.push(c);
      left -= c;
    }
    // The workers' clusters go to a shared buffer; digests come back through another.
    const inBytes = shared * clusterSize;
    if (this.input.byteLength < inBytes) this.input = new SharedArrayBuffer(inBytes);
    if (this.output.byteLength < shared * HASH_BYTES) this.output = new SharedArrayBuffer(shared * HASH_BYTES);
    new Uint8Array(this.input, 0, inBytes).set(data.subarray(mainCount * clusterSize));
    const jobs: Promise<number | Error>[] = [];
    const firsts: number[] = [];
    for (let i = 0, first = 0; i < workers.length; first += counts[i], i++) {
      firsts.push(first);
      const job: WorkerJob = { input: this.input, inputOffset: first * clusterSize, output: this.output, outputOffset: first * HASH_BYTES, count: counts[i], clusterSize, algorithm: this.algorithm };
      jobs.push(workers[i].run(job).catch((e: Error) => e));
    }
    const out = Buffer.allocUnsafe(n * HASH_BYTES);
    if (mainCount > 0) {
      this.into(data, 0, clusterSize, mainCount, out, 0);
      this.mainRate = blend(this.mainRate, mainCount / Math.max(now() - start, 1e-3));
    }
    const ends = await Promise.all(jobs);
    const digests = new Uint8Array(this.output);
    for (let i = 0; i < workers.length; i++) {
      const at = (mainCount + firsts[i]) * HASH_BYTES;
      const end = ends[i];
      if (end instanceof Error) {
        // Worker lost: hash its share here, from the shared copy (the caller may have reused
        // its buffer by now).
        this.into(new Uint8Array(this.input), firsts[i] * clusterSize, clusterSize, counts[i], out, at);
      } else {
        out.set(digests.subarray(firsts[i] * HASH_BYTES, (firsts[i] + counts[i]) * HASH_BYTES), at);
        workers[i].rate = blend(workers[i].rate, counts[i] / Math.max(end - start, 1e-3));
      }
    }
    return out;
  }

  async close(): Promise<void> {
    const workers = this.workers;
    this.workers = [];
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

function blend(old: number, sample: number): number {
  return old === 0 ? sample : 0.5 * old + 0.5 * sample;
}
