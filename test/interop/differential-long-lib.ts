// Helpers for the long differential test (test/interop/differential-long.test.ts): one
// long, seeded sequence of operations applied in batches to three twins: an image written
// by qdedup (engine in-process, plus a sample through bin/qdedup), an image written by
// qemu-io (one process per batch, every operation a `-c` command) and a raw shadow file.
// After each batch `qemu-img compare` checks both images against the shadow. Not a test
// file itself (no .test.ts suffix).

import { spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, ftruncateSync, mkdirSync, openSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import type { Image } from '../../src/image/image.ts';
import { BIN } from '../helpers.ts';
import { Rng, qdedupAsync, runAsync, sizeName } from './differential-lib.ts';
import { openForWrite } from '../../src/dedup/open.ts';

// ------------------------------------------------------------------ image creation

let dedupKnown: boolean | undefined;

/** True when `qdedup create -o help` lists a `dedup` key (dedup is being added, default on). */
export function createKnowsDedup(): boolean {
  if (dedupKnown === undefined) {
    const r = spawnSync(process.execPath, [BIN, 'create', '-o', 'help'], { encoding: 'utf8', env: { ...process.env, NO_COLOR: '1' } });
    dedupKnown = /^\s*dedup\b/m.test(r.stdout ?? '');
  }
  return dedupKnown;
}

/**
 * The one place these tests create a qcow2 image with bin/qdedup: `-o dedup=off` is added
 * when the CLI knows the key, so the images stay plain QCOW2 that qemu-io may write.
 */
export async function qdedupCreate(path: string, size: number, options: string): Promise<void> {
  const o = createKnowsDedup() ? `${options},dedup=off` : options;
  const r = await qdedupAsync(['create', '-q', '-f', 'qcow2', '-o', o, path, String(size)]);
  if (r.status !== 0) throw new Error(`qdedup create -o ${o} ${path} ${size} exited ${r.status}: ${r.stderr.trim()}`);
}

// ------------------------------------------------------------------ the shadow

/** A sparse raw file of the virtual size that receives every write, and can be read back. */
export class RawShadow {
  private readonly fd: number;
  constructor(
    readonly path: string,
    readonly size: number,
  ) {
    this.fd = openSync(path, 'w+');
    ftruncateSync(this.fd, size);
  }
  write(offset: number, data: Buffer): void {
    for (let done = 0; done < data.length; ) done += writeSync(this.fd, data, done, data.length - done, offset + done);
  }
  zero(offset: number, length: number): void {
    this.write(offset, Buffer.alloc(length));
  }
  read(offset: number, length: number): Buffer {
    const b = Buffer.alloc(length);
    for (let done = 0; done < length; ) {
      const n = readSync(this.fd, b, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return b;
  }
  close(): void {
    closeSync(this.fd);
  }
}

// ------------------------------------------------------------------ configurations

export interface LongConfig {
  label: string;
  clusterBits: number;
  compat: '1.1' | '0.10';
  refcountBits: number;
  size: number;
  /** Sparse wide disk: offsets mostly near the hot points (start, L2 boundaries, end). */
  wide: boolean;
}

export function configText(c: LongConfig): string {
  return `cluster_size=${sizeName(2 ** c.clusterBits)} compat=${c.compat} refcount_bits=${c.refcountBits} size=${c.size} (${Math.ceil(c.size / l2Span(c))} L2 tables)`;
}

/** Guest bytes one L2 table maps. */
export function l2Span(c: LongConfig): number {
  const cs = 2 ** c.clusterBits;
  return cs * (cs / 8);
}

export function createOptionString(c: LongConfig): string {
  return `cluster_size=${2 ** c.clusterBits},compat=${c.compat},refcount_bits=${c.refcountBits}`;
}

// ------------------------------------------------------------------ operations

export type LongOp =
  | { kind: 'pattern'; offset: number; length: number; pattern: number }
  | { kind: 'data'; offset: number; length: number; seed: number; via?: 'file' | 'stdin' }
  | { kind: 'zero'; offset: number; length: number; unmap?: boolean }
  /** Read back: qdedup's bytes must equal the shadow's; `pattern` set when the range is one byte value (qemu-io `read -P`). */
  | { kind: 'read'; offset: number; length: number; pattern?: number; raw?: boolean };

export function opText(op: LongOp): string {
  const r = `${op.offset}+${op.length}`;
  switch (op.kind) {
    case 'pattern':
      return `write -P 0x${op.pattern.toString(16)} ${r}`;
    case 'data':
      return `write -i${op.via ? `(${op.via})` : ''} #${op.seed.toString(16)} ${r}`;
    case 'zero':
      return `write -z${op.unmap ? ' -u' : ''} ${r}`;
    case 'read':
      return `read${op.pattern !== undefined ? ` -P 0x${op.pattern.toString(16)}` : ''}${op.raw ? ' (raw)' : ''} ${r}`;
  }
}

/** The bytes of a data operation (deterministic from its seed). */
export function opData(op: LongOp & { kind: 'data' }): Buffer {
  return new Rng(op.seed).bytes(op.length);
}

/** Largest length of one operation. */
const MAX_OP = 256 * 1024;

/**
 * Draws operations for one configuration. Keeps the recent ranges so that later
 * operations overlap or exactly rewrite them, and aims offsets at L2-table boundaries and
 * the ends of the disk, where ranges span tables.
 */
export class OpGenerator {
  private readonly cs: number;
  private readonly hot: number[];
  private readonly recent: { offset: number; length: number }[] = [];

  constructor(
    private readonly rng: Rng,
    private readonly cfg: LongConfig,
    private readonly shadow: RawShadow,
  ) {
    this.cs = 2 ** cfg.clusterBits;
    const span = l2Span(cfg);
    this.hot = [0, cfg.size];
    for (let k = 1; k * span < cfg.size && this.hot.length < 40; k++) this.hot.push(k * span);
  }

  private clamp(offset: number, length: number): { offset: number; length: number } {
    const V = this.cfg.size;
    offset = Math.max(0, Math.min(V - 1, offset));
    length = Math.max(1, Math.min(length, MAX_OP, V - offset));
    return { offset, length };
  }

  /** A range: offsets near hot points, overlapping earlier ranges, aligned or not. */
  range(): { offset: number; length: number } {
    const { rng, cs } = this;
    const V = this.cfg.size;
    if (this.recent.length && rng.chance(0.12)) return { ...rng.pick(this.recent) }; // exact rewrite
    let offset: number;
    const p = rng.float();
    if (p < 0.3) offset = rng.pick(this.hot) + rng.int(-3 * cs, 3 * cs);
    else if (p < 0.5 && this.recent.length) {
      const r = rng.pick(this.recent);
      offset = r.offset + rng.int(-cs, r.length);
    } else {
      // Anywhere (a wide disk: mostly within 64 clusters of a hot point, to stay sparse).
      const centre = rng.pick(this.hot);
      const window = this.cfg.wide && !rng.chance(0.05) ? [centre - 64 * cs, centre + 64 * cs] : [0, V - 1];
      offset = rng.int(Math.max(0, window[0]), Math.min(V - 1, window[1]));
      if (p < 0.7) offset -= offset % cs;
    }
    const l = rng.float();
    let length: number;
    if (l < 0.2) length = rng.int(1, 64);
    else if (l < 0.5) length = rng.int(1, cs);
    else if (l < 0.75) length = rng.int(cs, 3 * cs);
    else if (l < 0.9) length = rng.int(1, 4) * cs;
    else length = rng.int(1, 8) * 512;
    return this.clamp(offset, length);
  }

  /** The next write operation (pattern, data or zero). */
  write(opts: { cli?: boolean } = {}): LongOp {
    const { rng } = this;
    const { offset, length } = this.range();
    this.recent.push({ offset, length });
    if (this.recent.length > 64) this.recent.splice(rng.int(0, 63), 1);
    const k = rng.float();
    if (k < 0.25) return { kind: 'zero', offset, length, unmap: rng.chance(0.3) };
    if (k < 0.65) return { kind: 'pattern', offset, length, pattern: rng.int(0, 255) };
    return { kind: 'data', offset, length, seed: rng.u32(), via: opts.cli ? rng.pick(['file', 'stdin'] as const) : undefined };
  }

  /**
   * A read of a range the shadow holds now: mostly a piece of an earlier range (so
   * written data is read back), shrunk to its longest one-byte-value prefix when it has
   * one of at least 1 byte, so that qemu-io can verify it with `read -P` too.
   */
  read(opts: { raw?: boolean } = {}): LongOp {
    const { rng } = this;
    let { offset, length } = this.range();
    if (this.recent.length && rng.chance(0.7)) {
      const r = rng.pick(this.recent);
      const a = rng.int(0, r.length - 1);
      offset = r.offset + a;
      length = rng.int(1, r.length - a);
    }
    const bytes = this.shadow.read(offset, length);
    if (opts.raw) return { kind: 'read', offset, length, raw: true };
    let same = 1;
    while (same < bytes.length && bytes[same] === bytes[0]) same++;
    if (same === bytes.length || rng.chance(0.6)) return { kind: 'read', offset, length: same, pattern: bytes[0] };
    return { kind: 'read', offset, length };
  }
}

/** Applies a write to the shadow. */
export function shadowApply(shadow: RawShadow, op: LongOp): void {
  if (op.kind === 'zero') shadow.zero(op.offset, op.length);
  else if (op.kind === 'pattern') shadow.write(op.offset, Buffer.alloc(op.length, op.pattern));
  else if (op.kind === 'data') shadow.write(op.offset, opData(op));
}

/** Applies an operation through the engine; a read returns its mismatch (or null). */
export async function engineApply(image: Image, shadow: RawShadow, op: LongOp): Promise<string | null> {
  switch (op.kind) {
    case 'zero':
      await image.writeZeroes(op.offset, op.length);
      return null;
    case 'pattern':
      await image.write(op.offset, Buffer.alloc(op.length, op.pattern));
      return null;
    case 'data':
      await image.write(op.offset, opData(op));
      return null;
    case 'read': {
      const got = await image.read(op.offset, op.length);
      const want = shadow.read(op.offset, op.length);
      return got.equals(want) ? null : `engine ${opText(op)}: first difference at guest offset ${op.offset + firstDiff(got, want)}`;
    }
  }
}

export function firstDiff(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

/** The qemu-io command of an operation (data operations read `dataFile`); null: nothing to do. */
export function qemuIoCommand(op: LongOp, dataFile: () => string): string | null {
  const r = `${op.offset} ${op.length}`;
  switch (op.kind) {
    case 'zero':
      return `write -q -z${op.unmap ? ' -u' : ''} ${r}`;
    case 'pattern':
      return `write -q -P ${op.pattern} ${r}`;
    case 'data': {
      const f = dataFile();
      writeFileSync(f, opData(op));
      return `write -q -s ${f} ${r}`;
    }
    case 'read':
      return op.pattern === undefined ? null : `read -q -P ${op.pattern} ${r}`;
  }
}

/** Runs qemu-io commands on an image (writeback caching: `-t unsafe`); returns any problem it printed. */
export async function qemuIoBatch(image: string, commands: string[]): Promise<string | null> {
  const r = await runAsync('qemu-io', ['-f', 'qcow2', '-t', 'unsafe', ...commands.flatMap((c) => ['-c', c]), image]);
  const out = (r.stdout + r.stderr).trim();
  if (r.status !== 0 || out !== '') return `qemu-io exited ${r.status}: ${out.split('\n').slice(0, 5).join(' | ')}`;
  return null;
}

/** Applies one operation through bin/qdedup; returns a problem or null. */
export async function cliApply(image: string, shadow: RawShadow, op: LongOp, dir: string, rng: Rng): Promise<string | null> {
  const off = rng.chance(0.3) ? `0x${op.offset.toString(16)}` : String(op.offset);
  const len = String(op.length);
  let args: string[];
  let input: Buffer | undefined;
  let expected: string;
  switch (op.kind) {
    case 'zero':
      args = ['write', '-z', image, off, len];
      expected = `wrote ${op.length}/${op.length} bytes at offset ${op.offset}\n`;
      break;
    case 'pattern':
      args = ['write', '-P', `0x${op.pattern.toString(16)}`, image, off, len];
      expected = `wrote ${op.length}/${op.length} bytes at offset ${op.offset}\n`;
      break;
    case 'data':
      if (op.via === 'stdin') {
        input = opData(op);
        args = ['write', '-i', '-', image, off, len];
      } else {
        const f = join(dir, `cli-${op.seed.toString(16)}.bin`);
        writeFileSync(f, opData(op));
        args = ['write', '-i', f, image, off];
      }
      expected = `wrote ${op.length}/${op.length} bytes at offset ${op.offset}\n`;
      break;
    case 'read':
      if (op.raw || op.pattern === undefined) args = ['read', image, off, len];
      else args = ['read', '-P', String(op.pattern), image, off, len];
      expected = op.raw || op.pattern === undefined ? '' : `read ${op.length}/${op.length} bytes at offset ${op.offset}\n`;
      break;
  }
  const r = await qdedupAsync(args, input);
  const cmd = `qdedup ${args.join(' ')}`;
  if (r.status !== 0) return `${cmd} exited ${r.status}: ${r.stderr.trim()}`;
  if (op.kind === 'read' && (op.raw || op.pattern === undefined)) {
    const want = shadow.read(op.offset, op.length);
    if (!r.stdoutBytes.equals(want))
      return `${cmd}: ${r.stdoutBytes.length} bytes, first difference at guest offset ${op.offset + firstDiff(r.stdoutBytes, want)}`;
  } else if (r.stdout !== expected) return `${cmd}: stdout ${JSON.stringify(r.stdout)}, expected ${JSON.stringify(expected)}`;
  return null;
}

/**
 * `qemu-img compare` of both images against the shadow and `qemu-img check` of both, in
 * one shell process. Returns the problems found ([] when all is well).
 */
export async function compareTwins(qdedupImage: string, qemuImage: string, shadow: string): Promise<string[]> {
  const script = [
    'qemu-img compare -f qcow2 -F raw "$1" "$3" 2>&1; echo "@@cmpD=$?"',
    'qemu-img compare -f qcow2 -F raw "$2" "$3" 2>&1; echo "@@cmpQ=$?"',
    'qemu-img check -q -f qcow2 "$1" 2>&1; echo "@@chkD=$?"',
    'qemu-img check -q -f qcow2 "$2" 2>&1; echo "@@chkQ=$?"',
  ].join('; ');
  const r = await runAsync('sh', ['-c', script, 'sh', qdedupImage, qemuImage, shadow]);
  const problems: string[] = [];
  const re = /([\s\S]*?)@@(cmpD|cmpQ|chkD|chkQ)=(\d+)\n/g;
  let seen = 0;
  for (let m: RegExpExecArray | null; (m = re.exec(r.stdout)); ) {
    seen++;
    if (m[3] === '0') continue;
    const what = {
      cmpD: 'qemu-img compare (qdedup image vs shadow)',
      cmpQ: 'qemu-img compare (qemu-io image vs shadow)',
      chkD: 'qemu-img check (qdedup image)',
      chkQ: 'qemu-img check (qemu-io image)',
    }[m[2]]!;
    problems.push(`${what} exited ${m[3]}: ${m[1].trim().split('\n').slice(0, 4).join(' | ')}`);
  }
  if (seen !== 4) problems.push(`compare script: unexpected output (${r.status}): ${r.stdout}${r.stderr}`);
  return problems;
}

/** The guest offset a problem names (qemu-img compare's or a read's first difference), if any. */
export function mismatchOffset(problem: string): number | null {
  const m = /(?:Content mismatch at offset|first difference at guest offset) (\d+)/.exec(problem);
  return m ? Number(m[1]) : null;
}

// ------------------------------------------------------------------ one long sequence

export interface SequenceResult {
  ops: number;
  cliOps: number;
  batches: number;
  mismatches: number;
  /** Report of the first failing batch (seed, ops touching the mismatch, reproduction). */
  failure?: string;
}

export interface SequenceOptions {
  cfg: LongConfig;
  seed: number;
  /** Operations wanted in total (the sequence runs whole batches until it has them). */
  ops: number;
  batchSize: number;
  dir: string;
  /** How to rerun this sequence alone (printed with a failure). */
  reproduce: string;
}

/**
 * Runs one long sequence: creates the qdedup image (bin/qdedup create) and its qemu-io
 * twin (a copy), then batch after batch: the engine applies every operation in-process
 * (reopening and flushing at random), bin/qdedup applies one write and one read at the
 * end, qemu-io applies the same operations to the twin in one process, and qemu-img
 * compares both images with the shadow. Stops at the first failing batch.
 */
export async function runLongSequence(o: SequenceOptions): Promise<SequenceResult> {
  const { cfg, dir } = o;
  const rng = new Rng(o.seed);
  const D = join(dir, 'qdedup.qcow2');
  const Q = join(dir, 'qemu.qcow2');
  await qdedupCreate(D, cfg.size, createOptionString(cfg));
  copyFileSync(D, Q);
  const shadow = new RawShadow(join(dir, 'shadow.raw'), cfg.size);
  const gen = new OpGenerator(rng, cfg, shadow);
  const log: { batch: number; op: LongOp; via: string }[] = [];
  const res: SequenceResult = { ops: 0, cliOps: 0, batches: 0, mismatches: 0 };
  const report = (batch: number, problems: string[]): string => {
    const lines = [
      `${cfg.label}: ${configText(cfg)}, seed 0x${o.seed.toString(16)}, batch ${batch} (operations ${res.ops - log.filter((l) => l.batch === batch).length}…${res.ops - 1})`,
      ...problems.map((p) => `  ${p}`),
    ];
    const at = problems.map(mismatchOffset).find((x) => x !== null);
    // qemu-img compare names the first differing sector: list what touched that sector.
    const touching = log.filter((l) => at === undefined || at === null || (l.op.offset < at + 512 && at < l.op.offset + l.op.length));
    lines.push(at !== undefined && at !== null ? `  last operations touching guest bytes ${at}…${at + 511}:` : '  last operations:');
    for (const l of touching.slice(-12)) lines.push(`    batch ${l.batch} ${l.via}: ${opText(l.op)}`);
    lines.push(`  images kept in ${dir}`, `  reproduce: ${o.reproduce}`);
    return lines.join('\n');
  };
  try {
    for (let batch = 0; res.ops < o.ops; batch++) {
      const bdir = join(dir, `b${batch}`);
      mkdirSync(bdir);
      const problems: string[] = [];
      const qemuCommands: string[] = [];
      let dataFiles = 0;
      const dataFile = () => join(bdir, `d${dataFiles++}.bin`);
      const t0 = Date.now(); // phase times: QDEDUP_LONG_TIMING=1
      // 1. The engine, in-process: every operation generated now, against the shadow as it is.
      let image = await openForWrite(D);
      try {
        for (let i = 0; i < o.batchSize - 2; i++) {
          const op = rng.chance(0.22) ? gen.read() : gen.write();
          shadowApply(shadow, op);
          const bad = await engineApply(image, shadow, op);
          if (bad) problems.push(bad);
          const cmd = qemuIoCommand(op, dataFile);
          if (cmd) qemuCommands.push(cmd);
          log.push({ batch, op, via: 'engine' });
          res.ops++;
          const r = rng.float();
          if (r < 0.006) {
            await image.close();
            image = await openForWrite(D);
          } else if (r < 0.012) await image.flush();
        }
        await image.close();
      } catch (err) {
        await image.abandon();
        problems.push(`engine threw: ${(err as Error).stack ?? err}`);
      }
      const t1 = Date.now();
      // 2. One write and one read through bin/qdedup, while qemu-io runs the whole batch on its twin.
      const cliWrite = gen.write({ cli: true });
      shadowApply(shadow, cliWrite);
      const cliRead = gen.read({ raw: rng.chance(0.4) });
      for (const op of [cliWrite, cliRead]) {
        const cmd = qemuIoCommand(op, dataFile);
        if (cmd) qemuCommands.push(cmd);
        log.push({ batch, op, via: 'bin/qdedup' });
      }
      res.ops += 2;
      res.cliOps += 2;
      const cliRng = new Rng(rng.u32());
      const [cliProblems, qemuProblem] = await Promise.all([
        (async () => {
          const w = await cliApply(D, shadow, cliWrite, bdir, cliRng);
          return [w, w ? null : await cliApply(D, shadow, cliRead, bdir, cliRng)];
        })(),
        qemuIoBatch(Q, qemuCommands),
      ]);
      for (const p of [...cliProblems, qemuProblem]) if (p) problems.push(p);
      const t2 = Date.now();
      // 3. Both images against the shadow.
      problems.push(...(await compareTwins(D, Q, shadow.path)));
      if (process.env.QDEDUP_LONG_TIMING)
        console.log(`${cfg.label} batch ${batch}: engine ${t1 - t0} ms, cli+qemu-io ${t2 - t1} ms, compare ${Date.now() - t2} ms`);
      res.batches++;
      rmSync(bdir, { recursive: true, force: true });
      if (problems.length) {
        res.mismatches += problems.length;
        res.failure = report(batch, problems);
        break;
      }
    }
  } finally {
    shadow.close();
  }
  return res;
}
