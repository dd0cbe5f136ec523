// Helpers shared by the differential tests (test/interop/differential-*.test.ts): a seeded
// PRNG, a raw "shadow" file that receives the same writes as the image under test,
// asynchronous runs of bin/qdedup / qemu-img / qemu-io (so independent cases overlap on
// two cores), and header peeking. Not a test file itself (no .test.ts suffix).

import { spawn } from 'node:child_process';
import { createCipheriv } from 'node:crypto';
import { openSync, writeSync, closeSync, ftruncateSync, readSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { BIN, tempDir } from '../helpers.ts';

// ------------------------------------------------------------------ PRNG

/**
 * sfc32-like 32-bit generator seeded through splitmix32: fast, reproducible across
 * platforms (only 32-bit integer arithmetic), good enough for picking offsets.
 */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;
  readonly seed: number;

  constructor(seed: number) {
    this.seed = seed >>> 0;
    let s = this.seed;
    const next = () => {
      s = (s + 0x9e3779b9) >>> 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.a = next();
    this.b = next();
    this.c = next();
    this.d = next();
    for (let i = 0; i < 12; i++) this.u32();
  }

  u32(): number {
    const t = (((this.a + this.b) >>> 0) + this.d) >>> 0;
    this.d = (this.d + 1) >>> 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) >>> 0;
    this.c = ((this.c << 21) | (this.c >>> 11)) >>> 0;
    this.c = (this.c + t) >>> 0;
    return t;
  }

  /** Uniform float in [0, 1). */
  float(): number {
    return this.u32() / 0x1_0000_0000;
  }

  /** Uniform integer in [lo, hi] (inclusive; safe for ranges up to 2^53). */
  int(lo: number, hi: number): number {
    if (hi <= lo) return lo;
    const span = hi - lo + 1;
    if (span <= 0x1_0000_0000) return lo + Math.floor(this.float() * span);
    return lo + Math.floor((this.u32() * 0x1_0000_0000 + this.u32()) % span);
  }

  chance(p: number): boolean {
    return this.float() < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(0, items.length - 1)];
  }

  /**
   * `n` pseudo-random bytes: AES-128-CTR over zeros, keyed from this generator (fast for
   * megabytes, and as reproducible as the generator itself).
   */
  bytes(n: number): Buffer {
    const key = Buffer.alloc(16);
    for (let i = 0; i < 16; i += 4) key.writeUInt32LE(this.u32(), i);
    const cipher = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
    return Buffer.concat([cipher.update(Buffer.alloc(n)), cipher.final()]);
  }
}

/**
 * The seed of the case named `label` in a run with base seed `base`: FNV-1a over the label
 * and a murmur3 finaliser, so that labels differing in one character get unrelated seeds.
 */
export function deriveSeed(base: number, label: string): number {
  let h = (base ^ 0x811c9dc5) >>> 0;
  for (const ch of label) h = Math.imul(h ^ ch.charCodeAt(0), 0x01000193);
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

// ------------------------------------------------------------------ shadow raw file

/** A raw file of the virtual size that receives every write the image receives. */
export class Shadow {
  private readonly fd: number;
  constructor(
    readonly path: string,
    size: number,
    initial?: Buffer,
  ) {
    this.fd = openSync(path, 'w+');
    ftruncateSync(this.fd, size);
    if (initial) this.write(0, initial);
  }

  write(offset: number, data: Buffer): void {
    for (let done = 0; done < data.length; ) done += writeSync(this.fd, data, done, data.length - done, offset + done);
  }

  /** Writes zeros in bounded chunks. */
  zero(offset: number, length: number): void {
    const chunk = Buffer.alloc(Math.min(length, 4 << 20));
    for (let done = 0; done < length; done += chunk.length) {
      this.write(offset + done, chunk.subarray(0, Math.min(chunk.length, length - done)));
    }
  }

  close(): void {
    closeSync(this.fd);
  }
}

// ------------------------------------------------------------------ processes

export interface AsyncResult {
  status: number;
  stdout: string;
  stderr: string;
  stdoutBytes: Buffer;
}

/** Runs a command asynchronously (so several cases can overlap), with optional stdin. */
export function runAsync(cmd: string, args: string[], input?: Buffer | string, env?: NodeJS.ProcessEnv, cwd?: string): Promise<AsyncResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: env ?? process.env, cwd });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.on('error', reject);
    child.stdin.on('error', () => {}); // the child may exit before reading all of stdin
    child.on('close', (code, signal) => {
      const stdoutBytes = Buffer.concat(out);
      resolve({ status: code ?? (signal ? 128 : -1), stdout: stdoutBytes.toString('utf8'), stderr: Buffer.concat(err).toString('utf8'), stdoutBytes });
    });
    child.stdin.end(input ?? '');
  });
}

/** Runs bin/qdedup asynchronously. */
export function qdedupAsync(args: string[], input?: Buffer | string, cwd?: string): Promise<AsyncResult> {
  return runAsync(process.execPath, [BIN, ...args], input, { ...process.env, NO_COLOR: '1' }, cwd);
}

/** Runs bin/qdedup and throws (with its stderr) unless it exits 0. */
export async function qdedupOk(args: string[], input?: Buffer | string): Promise<AsyncResult> {
  const r = await qdedupAsync(args, input);
  if (r.status !== 0) throw new Error(`qdedup ${args.join(' ')} exited ${r.status}: ${r.stderr.trim()}`);
  return r;
}

/** Runs a command and throws (with its stderr) unless it exits 0. */
export async function runOk(cmd: string, args: string[], input?: Buffer | string): Promise<AsyncResult> {
  const r = await runAsync(cmd, args, input);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${(r.stderr || r.stdout).trim()}`);
  return r;
}

/** `qemu-img compare` of a qcow2 image against a raw file: exit status and message. */
export async function compareRaw(qcow2: string, raw: string): Promise<AsyncResult> {
  return runAsync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, raw]);
}

/** `qemu-img check --output=json`: exit status, parsed JSON (null if none) and stderr. */
export async function checkImage(file: string): Promise<{ status: number; json: Record<string, unknown> | null; stderr: string }> {
  const r = await runAsync('qemu-img', ['check', '-f', 'qcow2', '--output=json', file]);
  let json = null;
  try {
    json = JSON.parse(r.stdout);
  } catch {
    json = null;
  }
  return { status: r.status, json, stderr: r.stderr };
}

/**
 * `qemu-img compare` against a raw file and `qemu-img check`, in one shell process (a
 * spawn from a test process with a large heap costs more than the commands themselves).
 * Returns each exit status and each output (stdout and stderr merged).
 */
export async function compareAndCheck(qcow2: string, raw: string): Promise<{ compare: number; compareOutput: string; check: number; checkOutput: string }> {
  const script = 'qemu-img compare -f qcow2 -F raw "$1" "$2" 2>&1; echo "@@compare=$?"; qemu-img check -f qcow2 "$1" 2>&1; echo "@@check=$?"';
  const r = await runAsync('sh', ['-c', script, 'sh', qcow2, raw]);
  const m = /^([\s\S]*?)@@compare=(\d+)\n([\s\S]*?)@@check=(\d+)\n?$/.exec(r.stdout);
  if (!m) throw new Error(`compareAndCheck: unexpected output (${r.status}): ${r.stdout}${r.stderr}`);
  return { compareOutput: m[1].trim(), compare: Number(m[2]), checkOutput: m[3].trim(), check: Number(m[4]) };
}

/** qemu-img convert -O raw of an image (optionally of an internal snapshot) to `out`. */
export async function toRaw(image: string, out: string, opts: { format?: string; snapshot?: string } = {}): Promise<void> {
  const args = ['convert', '-f', opts.format ?? 'qcow2'];
  if (opts.snapshot) args.push('-l', `snapshot.name=${opts.snapshot}`);
  args.push('-O', 'raw', image, out);
  await runOk('qemu-img', args);
}

/** Runs `tasks` with at most `limit` in flight; resolves to their results in order. */
export async function pool<T>(limit: number, tasks: (() => Promise<T>)[]): Promise<T[]> {
  const results: T[] = new Array(tasks.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, tasks.length) }, async () => {
    while (next < tasks.length) {
      const i = next++;
      results[i] = await tasks[i]();
    }
  });
  await Promise.all(workers);
  return results;
}

// ------------------------------------------------------------------ header peeking

export interface HeaderPeek {
  version: number;
  clusterBits: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  refcountOrder: number;
}

/** The fixed header fields, read straight from the file (independent of src/). */
export function peekHeader(path: string): HeaderPeek {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(104);
    const n = readSync(fd, b, 0, b.length, 0);
    if (n < 72) throw new Error(`${path}: header too short`);
    const version = b.readUInt32BE(4);
    return {
      version,
      clusterBits: b.readUInt32BE(20),
      size: Number(b.readBigUInt64BE(24)),
      l1Size: b.readUInt32BE(36),
      l1TableOffset: Number(b.readBigUInt64BE(40)),
      refcountTableOffset: Number(b.readBigUInt64BE(48)),
      refcountTableClusters: b.readUInt32BE(56),
      nbSnapshots: b.readUInt32BE(60),
      refcountOrder: version >= 3 ? b.readUInt32BE(96) : 4,
    };
  } finally {
    closeSync(fd);
  }
}

/** Human form of a byte count for test names: 512, 4k, 2M. */
export function sizeName(n: number): string {
  if (n >= 1 << 20 && n % (1 << 20) === 0) return `${n / (1 << 20)}M`;
  if (n >= 1024 && n % 1024 === 0) return `${n / 1024}k`;
  return String(n);
}

/**
 * Per-test-file helpers: `scratch()` makes a fresh subfolder of one temporary folder, and
 * `seedOf(label)` gives the stable seed of the case named `label` for a base seed.
 */
export function testFolders(prefix: string, baseSeed: number): { scratch: () => string; seedOf: (label: string) => number } {
  const dir = tempDir(prefix);
  let next = 0;
  return {
    scratch: () => {
      const sub = join(dir, `s${next++}`);
      mkdirSync(sub, { recursive: true });
      return sub;
    },
    seedOf: (label: string) => deriveSeed(baseSeed, label),
  };
}
