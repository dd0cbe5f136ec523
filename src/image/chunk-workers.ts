// Work on the clusters of a write chunk shared between worker threads and the main thread,
// for the write pipeline (docs/DESIGN.md "Write pipeline"): the chunk lives in shared memory,
// every worker is handed the whole chunk (one message per chunk and worker), and clusters are
// shared out through an atomic counter in a shared result. When the main thread needs the
// result before the workers are done, it takes the remaining clusters itself instead of
// waiting (SharedClusterWork.complete). So starved, failed or missing workers never change a
// result nor leave the main thread idle; results never depend on which thread did the work.
//
// The worker side is a CommonJS script run with `eval` (no file of its own: it works the same
// from the TypeScript sources and from the esbuild bundle); CLUSTER_LOOP_SOURCE is the
// counter loop each such script runs per message.

import { createRequire } from 'node:module';
import type { Worker } from 'node:worker_threads';
import { InternalError } from '../errors.ts';

/** How long complete() waits for a cluster a worker took before doing it too (the work is idempotent). */
const STALL_MS = 500;

/** A monotonic clock in milliseconds (not `performance.now()`: its first use loads perf_hooks, ~2–3 ms of a start). */
const nowMs = (): number => Number(process.hrtime.bigint()) / 1e6;

/** How long close() waits for a worker to exit by itself before terminating it. */
const CLOSE_WAIT_MS = 5000;

/**
 * The start of every worker script: the message 'close' (WorkerPool.close) ends the worker
 * from JavaScript, after the jobs before it and never inside a native call. Registered first,
 * so the job handler never sees it.
 */
const WORKER_CLOSE_SOURCE = `require('node:worker_threads').parentPort.on('message', (m) => { if (m === 'close') process.exit(0); });\n`;

/** Chunks smaller than this are done on the main thread: a worker takes 30–50 ms to start. */
export const MIN_WORKER_BYTES = 1024 * 1024;

/**
 * Clusters taken at once from a chunk's counter, by a worker or by complete(): the atomic
 * operations and the wake-up of a waiting main thread then cost per run of clusters, not
 * per cluster (per cluster they took 2.5 µs of the hash worker's ~9 µs).
 */
export const CLUSTERS_PER_TAKE = 16;

/**
 * Takes runs of `step` cluster indexes from the counter `ctrl[0]` until none is left, does
 * each run [first, end) with `work`, flags it in `done` and counts it in `ctrl[1]`, waking a
 * thread that waits there. The main thread runs it in complete(), the workers through its
 * source (CLUSTER_LOOP_SOURCE), so it uses nothing from outside itself.
 */
export function takeRuns(done: Uint8Array, ctrl: Int32Array, count: number, step: number, work: (first: number, end: number) => void): void {
  for (;;) {
    const first = Atomics.add(ctrl, 0, step);
    if (first >= count) return;
    const end = Math.min(first + step, count);
    work(first, end);
    done.fill(1, first, end); // plain stores, as the results' are: the Atomics.add after them publishes both
    Atomics.add(ctrl, 1, end - first);
    Atomics.notify(ctrl, 1);
  }
}

/**
 * Worker side, for the eval'd script: `takeClusters(m, work)` calls `work(first, end)` for
 * every run of cluster indexes it takes from the job `m` (fields count, out, doneOffset,
 * ctrlOffset), CLUSTERS_PER_TAKE at a time (takeRuns).
 */
export const CLUSTER_LOOP_SOURCE = `
const takeRuns = (${takeRuns.toString()});
function takeClusters(m, work) {
  takeRuns(new Uint8Array(m.out, m.doneOffset, m.count), new Int32Array(m.out, m.ctrlOffset, 2), m.count, ${CLUSTERS_PER_TAKE}, work);
}`;

/**
 * Layout of the tail of a shared result: `count` done flags, then (4-aligned) two Int32
 * counters: the next cluster to take, the clusters done. `base`: bytes of results before it.
 */
export function controlLayout(base: number, count: number): { done: number; ctrl: number; bytes: number } {
  const ctrl = Math.ceil((base + count) / 4) * 4;
  return { done: base, ctrl, bytes: ctrl + 8 };
}

/** The shared progress of one chunk's clusters: taken by workers and by complete(). */
export class SharedClusterWork {
  private readonly done: Uint8Array;
  private readonly ctrl: Int32Array;
  private completed = false;

  constructor(
    readonly count: number,
    readonly out: SharedArrayBuffer | ArrayBuffer,
    layout: { done: number; ctrl: number },
  ) {
    this.done = new Uint8Array(out, layout.done, count);
    this.ctrl = new Int32Array(out, layout.ctrl, 2);
  }

  /**
   * Does every run of clusters no one has taken yet with `work`, then waits for those workers
   * are doing (microseconds; after STALL_MS without progress it does them too). Synchronous.
   */
  complete(work: (first: number, end: number) => void): void {
    if (this.completed) return;
    const { ctrl, done, count } = this;
    const shared = this.out instanceof SharedArrayBuffer;
    takeRuns(done, ctrl, count, CLUSTERS_PER_TAKE, work); // Atomics work on memory that is not shared too
    let seen = Atomics.load(ctrl, 1);
    let since = nowMs();
    while (seen < count) {
      if (shared) Atomics.wait(ctrl, 1, seen, 1);
      const now = Atomics.load(ctrl, 1);
      if (now !== seen) {
        seen = now;
        since = nowMs();
      } else if (nowMs() - since > STALL_MS) {
        // A worker that stopped mid-cluster (killed, stuck): do what it did not finish.
        for (let i = 0; i < count; i++) if (Atomics.load(done, i) === 0) work(i, i + 1);
        break;
      }
    }
    this.completed = true;
  }
}

/**
 * Worker threads running one eval'd script, each handed every job in turn. Started on first
 * use (commands that never need them do not pay for them); when they cannot start or fail,
 * `available` turns false and callers do the work on the main thread.
 */
export class WorkerPool {
  private workers: Worker[] = [];
  /** Workers that have exited (close() need not ask them). */
  private readonly exited = new WeakSet<Worker>();
  private failed = false;
  private nextId = 0;
  private readonly waiting = new Map<number, { left: number; resolve: () => void; reject: (e: Error) => void }>();

  constructor(
    private readonly name: string,
    private readonly source: string,
    private readonly size: number,
  ) {}

  /** True when jobs may be posted (the workers started, or can be). */
  get available(): boolean {
    return !this.failed && this.start();
  }

  /** Hands `job` to every worker; resolves when all have returned from it. */
  post(job: Record<string, unknown>): Promise<void> {
    const id = this.nextId++;
    const p = new Promise<void>((resolve, reject) => {
      this.waiting.set(id, { left: this.workers.length, resolve, reject });
      for (const w of this.workers) {
        w.ref(); // keep the process alive while a job is out
        w.postMessage({ id, ...job });
      }
    });
    p.catch(() => {
      this.failed = true; // complete() does what the workers left; later chunks stay on the main thread
    });
    return p;
  }

  /**
   * Ends the workers (the process may also just exit: idle workers do not keep it alive). Each
   * is asked to exit by itself once its jobs are done ('close', see WORKER_CLOSE_SOURCE), and
   * terminated only if it has not within CLOSE_WAIT_MS: a worker terminated while it is in a
   * native call (koffi loading, OpenSSL hashing) can abort the whole process.
   */
  async close(): Promise<void> {
    const ws = this.workers;
    this.workers = [];
    this.failed = true;
    await Promise.all(
      ws.map(async (w) => {
        if (this.exited.has(w)) return;
        const exited = new Promise<void>((resolve) => w.once('exit', () => resolve()));
        let timer: NodeJS.Timeout | undefined;
        try {
          w.postMessage('close');
        } catch {
          // already gone
        }
        const late = new Promise<'late'>((resolve) => {
          timer = setTimeout(() => resolve('late'), CLOSE_WAIT_MS);
        });
        if ((await Promise.race([exited, late])) === 'late') await w.terminate();
        clearTimeout(timer);
      }),
    );
  }

  private start(): boolean {
    if (this.workers.length) return true;
    try {
      const { Worker: WorkerThread } = createRequire(import.meta.url)('node:worker_threads') as typeof import('node:worker_threads');
      for (let k = 0; k < this.size; k++) {
        const w = new WorkerThread(WORKER_CLOSE_SOURCE + this.source, { eval: true, name: this.name });
        w.unref();
        w.on('message', (m: { id: number; error?: string }) => {
          const p = this.waiting.get(m.id);
          if (!p) return;
          if (m.error !== undefined) {
            this.waiting.delete(m.id);
            p.reject(new InternalError(`${this.name} worker: ${m.error}`));
          } else if (--p.left === 0) {
            this.waiting.delete(m.id);
            p.resolve();
          }
          if (this.waiting.size === 0) for (const x of this.workers) x.unref(); // idle: they do not keep the process alive
        });
        w.on('error', (e) => this.fail(e));
        w.on('exit', (code) => {
          this.exited.add(w);
          this.fail(new InternalError(`${this.name} worker exited (code ${code})`));
        });
        this.workers.push(w);
      }
      return true;
    } catch {
      this.failed = true; // no threads here (resource limits): the main thread does the work
      return false;
    }
  }

  private fail(e: Error): void {
    this.failed = true;
    for (const p of this.waiting.values()) p.reject(e);
    this.waiting.clear();
  }
}
