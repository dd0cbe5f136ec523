// Differential writes: random write sequences go through qdedup and,
// identically, onto a raw "shadow" file; afterwards `qemu-img compare` must find the
// image identical to the shadow and `qemu-img check` must exit 0.
//
// Sequences are generated from a seeded PRNG. Every test name carries its sequence seed;
// a failure prints the base seed, the configuration and the operations. Reproduce with
//   QDEDUP_SEED=<base seed> npm test -- differential-write
// and narrow to one sequence with QDEDUP_ONLY=<test number, e.g. 17 or cli-3>. For a longer
// soak: QDEDUP_SEQUENCES=2000 QDEDUP_CLI_SEQUENCES=100 QDEDUP_SEED=$RANDOM npm test -- differential-write
//
// Most sequences drive the engine in-process (Image class) to stay fast; the `cli-*`
// ones, and the special images (backing files, compressed, zero and snapshot-shared
// clusters, refcount table growth), go through the real bin/qdedup as well.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join, basename } from 'node:path';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import type { Image } from '../../src/image/image.ts';
import { createImage } from '../../src/image/create.ts';
import { NO_QEMU } from '../helpers.ts';
import {
  Rng,
  Shadow,
  testFolders,
  checkImage,
  compareAndCheck,
  compareRaw,
  peekHeader,
  qdedupOk,
  runAsync,
  runOk,
  sizeName,
  toRaw,
} from './differential-lib.ts';
import { openForWrite } from '../../src/dedup/open.ts';

const BASE_SEED = process.env.QDEDUP_SEED ? Number(process.env.QDEDUP_SEED) >>> 0 : 0x2d5e_ed02;
const ONLY = process.env.QDEDUP_ONLY;
/** In-process random sequences (each: create, 3–10 operations with reopenings, verify). QDEDUP_SEQUENCES=N soaks. */
const IN_PROCESS_SEQUENCES = Number(process.env.QDEDUP_SEQUENCES ?? 100);
/** Random sequences run entirely through bin/qdedup (create/write as separate processes). */
const CLI_SEQUENCES = Number(process.env.QDEDUP_CLI_SEQUENCES ?? 20);
/** Whole-disk writes happen only on disks this small (in bytes and in clusters). */
const WHOLE_DISK_MAX = 24 << 20;
const WHOLE_DISK_MAX_CLUSTERS = 8192;

const { scratch, seedOf } = testFolders('qdedup-diffw-', BASE_SEED);

const only = (label: string) => ONLY === undefined || ONLY === label;

// ------------------------------------------------------------------ configurations

interface Config {
  clusterBits: number;
  version: 2 | 3;
  refcountBits: number;
  size: number;
}

function describeConfig(c: Config): string {
  return `cs=${sizeName(2 ** c.clusterBits)} compat=${c.version === 3 ? '1.1' : '0.10'} refcount_bits=${c.refcountBits} size=${c.size}`;
}

/** Every (compat, refcount width) pair: v2 has 16-bit refcounts only. */
const WIDTHS: [2 | 3, number][] = [
  [2, 16],
  [3, 1],
  [3, 2],
  [3, 4],
  [3, 8],
  [3, 16],
  [3, 32],
  [3, 64],
];

/**
 * Configuration of sequence `i`: cluster sizes cycle through 512 B … 2 MiB, and each
 * cluster size meets every compat / refcount width in turn. The virtual size is either
 * small (2–6 L2 tables' worth, at most 24 MiB: whole-disk writes possible) or wide (two
 * L2 tables and a bit, sparse: up to 1 TiB with 2 MiB clusters).
 */
function configFor(i: number, rng: Rng): Config {
  const clusterBits = 9 + (i % 13);
  const [version, refcountBits] = WIDTHS[(Math.floor(i / 13) + clusterBits) % WIDTHS.length];
  const cs = 2 ** clusterBits;
  const span = cs * (cs / 8); // bytes mapped by one L2 table
  let size: number;
  if (span * 2 <= WHOLE_DISK_MAX && rng.chance(0.75)) {
    size = rng.int(Math.max(3 * cs, 2 * span), Math.min(WHOLE_DISK_MAX, 6 * span));
  } else if (rng.chance(0.5)) {
    size = rng.int(3 * cs, Math.min(WHOLE_DISK_MAX, 12 * cs));
  } else {
    size = 2 * span + rng.int(1, 3 * cs); // crosses into a third L2 table
  }
  size = Math.ceil(size / 512) * 512;
  if (rng.chance(0.5)) size = Math.ceil(size / cs) * cs; // else often a partial last cluster
  return { clusterBits, version, refcountBits, size };
}

// ------------------------------------------------------------------ operations

type Op =
  | { kind: 'pattern'; offset: number; length: number; pattern: number }
  | { kind: 'data'; offset: number; length: number; seed: number; via?: 'file' | 'stdin'; fileExtra?: number; omitLength?: boolean }
  | { kind: 'zero'; offset: number; length: number };

function opText(op: Op): string {
  const range = `${op.offset}+${op.length}`;
  if (op.kind === 'pattern') return `P0x${op.pattern.toString(16)}@${range}`;
  if (op.kind === 'zero') return `Z@${range}`;
  return `D${op.via ? `(${op.via}${op.fileExtra ? `+${op.fileExtra}` : ''}${op.omitLength ? ',nolen' : ''})` : ''}@${range}#${op.seed.toString(16)}`;
}

/** The bytes of a data operation (deterministic from its seed). */
function opData(op: Op & { kind: 'data' }): Buffer {
  return new Rng(op.seed).bytes(op.length + (op.fileExtra ?? 0));
}

/**
 * `count` random operations on a disk of `cfg.size` bytes: unaligned and aligned
 * offsets, places around L2-table boundaries, the start and the end of the disk,
 * overlaps and exact rewrites of earlier ranges, tiny to multi-cluster lengths, and now
 * and then the whole disk. `focus` (a byte range) draws 40 % of the offsets from it,
 * for example the part of the disk a backing file provides.
 */
function genOps(rng: Rng, cfg: Config, count: number, opts: { cli?: boolean; zeroWeight?: number; focus?: [number, number] } = {}): Op[] {
  const cs = 2 ** cfg.clusterBits;
  const V = cfg.size;
  const span = cs * (cs / 8);
  const maxOp = Math.min(8 << 20, Math.max(1 << 20, 4 * cs));
  const hot = [0, V];
  for (let k = 1; k * span < V && k <= 8; k++) hot.push(k * span);
  if (opts.focus) hot.push(opts.focus[1]);
  const ops: Op[] = [];
  for (let i = 0; i < count; i++) {
    let offset: number;
    let length: number;
    if (V <= WHOLE_DISK_MAX && V / cs <= WHOLE_DISK_MAX_CLUSTERS && rng.chance(0.06)) {
      offset = 0;
      length = V;
    } else {
      const place = rng.float();
      if (opts.focus && rng.chance(0.4)) offset = rng.int(opts.focus[0], opts.focus[1]);
      else if (place < 0.35) offset = rng.pick(hot) + rng.int(-2 * cs, 2 * cs);
      else if (place < 0.55 && ops.length) {
        const p = rng.pick(ops);
        offset = p.offset + rng.int(-cs, p.length);
      } else if (place < 0.75) offset = rng.int(0, Math.floor((V - 1) / cs)) * cs;
      else offset = rng.int(0, V - 1);
      offset = Math.max(0, Math.min(V - 1, offset));
      const lr = rng.float();
      if (lr < 0.2) length = rng.int(1, 64);
      else if (lr < 0.5) length = rng.int(1, cs);
      else if (lr < 0.75) length = rng.int(cs, 4 * cs);
      else if (lr < 0.9) length = rng.int(1, 4) * cs;
      else if (ops.length) {
        const p = rng.pick(ops);
        offset = p.offset;
        length = p.length;
      } else length = rng.int(1, 2 * cs);
      length = Math.max(1, Math.min(length, maxOp, V - offset));
    }
    const k = rng.float();
    const zw = opts.zeroWeight ?? 0.25;
    if (k < zw) ops.push({ kind: 'zero', offset, length });
    else if (k < zw + (1 - zw) / 2) ops.push({ kind: 'pattern', offset, length, pattern: rng.int(0, 255) });
    else {
      const op: Op = { kind: 'data', offset, length, seed: rng.u32() };
      if (opts.cli) {
        op.via = rng.chance(0.3) ? 'stdin' : 'file';
        if (rng.chance(0.25))
          op.fileExtra = rng.int(1, 3000); // input longer than LENGTH
        else if (rng.chance(0.5)) op.omitLength = true; // LENGTH from the input's size
      }
      ops.push(op);
    }
  }
  return ops;
}

/** Applies an operation to the shadow file. */
function shadowApply(shadow: Shadow, op: Op): void {
  if (op.kind === 'zero') shadow.zero(op.offset, op.length);
  else if (op.kind === 'pattern') shadow.write(op.offset, Buffer.alloc(op.length, op.pattern));
  else shadow.write(op.offset, opData(op).subarray(0, op.length));
}

/** Applies an operation through the engine. */
async function engineApply(image: Image, op: Op): Promise<void> {
  if (op.kind === 'zero') await image.writeZeroes(op.offset, op.length);
  else if (op.kind === 'pattern') await image.write(op.offset, Buffer.alloc(op.length, op.pattern));
  else await image.write(op.offset, opData(op).subarray(0, op.length));
}

/** An offset or length in one of the notations qemu accepts (decimal, hex, k/M suffix). */
function notation(rng: Rng, n: number): string {
  const r = rng.float();
  if (r < 0.3) return `0x${n.toString(16)}`;
  if (r < 0.5 && n > 0 && n % (1 << 20) === 0) return `${n / (1 << 20)}M`;
  if (r < 0.6 && n > 0 && n % 1024 === 0) return `${n / 1024}k`;
  return String(n);
}

/** Applies an operation through bin/qdedup and checks qemu-io's `wrote` line. */
async function cliApply(dir: string, image: string, op: Op, rng: Rng): Promise<void> {
  const off = notation(rng, op.offset);
  const len = notation(rng, op.length);
  const quiet = rng.chance(0.3);
  const args = ['write', ...(quiet ? ['-q'] : [])];
  let input: Buffer | undefined;
  if (op.kind === 'zero') args.push('-z', image, off, len);
  else if (op.kind === 'pattern') args.push('-P', rng.chance(0.5) ? `0x${op.pattern.toString(16)}` : String(op.pattern), image, off, len);
  else {
    const data = opData(op);
    if (op.via === 'stdin') {
      args.push('-i', '-');
      input = data;
    } else {
      const f = join(dir, `in-${op.seed.toString(16)}.bin`);
      writeFileSync(f, data);
      args.push('-i', f);
    }
    args.push(image, off);
    if (!op.omitLength) args.push(len);
  }
  const r = await qdedupOk(args, input);
  const expected = quiet ? '' : `wrote ${op.length}/${op.length} bytes at offset ${op.offset}\n`;
  assert.equal(r.stdout, expected, `stdout of qdedup ${args.join(' ')}`);
}

// ------------------------------------------------------------------ verification

/** qemu-img compare against the shadow and qemu-img check, with a reproducible report. */
async function verify(image: string, shadowPath: string, context: string): Promise<void> {
  const r = await compareAndCheck(image, shadowPath);
  const report = `${context}\n  base seed: QDEDUP_SEED=0x${BASE_SEED.toString(16)}\n  image: ${image}`;
  assert.equal(r.compare, 0, `qemu-img compare exited ${r.compare}: ${r.compareOutput}\n${report}`);
  assert.equal(r.check, 0, `qemu-img check exited ${r.check}: ${r.checkOutput}\n${report}`);
}

function context(label: string, seed: number, cfg: Config | string, ops: Op[]): string {
  return `sequence ${label} (seed 0x${seed.toString(16)}) ${typeof cfg === 'string' ? cfg : describeConfig(cfg)}\n  ops: ${ops.map(opText).join(' ')}`;
}

/** Applies `ops` through the engine, reopening and flushing at random points. */
async function engineSequence(path: string, ops: Op[], rng: Rng, shadow: Shadow): Promise<void> {
  let image = await openForWrite(path);
  try {
    for (const op of ops) {
      await engineApply(image, op);
      shadowApply(shadow, op);
      const r = rng.float();
      if (r < 0.25) {
        await image.close();
        image = await openForWrite(path);
      } else if (r < 0.35) await image.flush();
    }
    await image.close();
  } catch (err) {
    await image.abandon();
    throw err;
  }
}

function createOptions(cfg: Config) {
  return {
    size: cfg.size,
    clusterBits: cfg.clusterBits,
    version: cfg.version,
    refcountOrder: Math.log2(cfg.refcountBits),
    lazyRefcounts: false,
    force: true,
  };
}

// ------------------------------------------------------------------ special-image helpers

/** Runs qemu-io commands on an image (read-write) and throws unless all succeed. */
async function qemuIo(image: string, commands: string[], format = 'qcow2'): Promise<void> {
  await runOk('qemu-io', ['-f', format, ...commands.flatMap((c) => ['-c', c]), image]);
}

/** The guest content of an image as qemu reads it. */
async function guestBytes(image: string, format = 'qcow2', snapshot?: string): Promise<Buffer> {
  const out = join(scratch(), 'guest.raw');
  await toRaw(image, out, { format, snapshot });
  return readFileSync(out);
}

/**
 * qemu-io commands that leave a mix of data, zero (preallocated and not), discarded and
 * unallocated clusters on an image of `size` bytes with `cs`-byte clusters.
 */
function seedCommands(rng: Rng, size: number, cs: number, opts: { zero?: boolean } = {}): string[] {
  const cmds: string[] = [];
  const clusters = Math.floor(size / cs);
  for (let i = 0; i < 6; i++) {
    const off = rng.int(0, Math.max(0, clusters - 4)) * cs + (rng.chance(0.5) ? rng.int(0, cs - 1) : 0);
    const len = Math.max(1, Math.min(size - off, rng.int(1, 4 * cs)));
    cmds.push(`write -P 0x${rng.int(1, 255).toString(16)} ${off} ${len}`);
  }
  if (opts.zero) {
    for (let i = 0; i < 3; i++) {
      const off = rng.int(0, Math.max(0, clusters - 3)) * cs;
      const len = Math.min(size - off, rng.int(1, 2) * cs);
      cmds.push(rng.pick([`write -z ${off} ${len}`, `write -z -u ${off} ${len}`, `discard ${off} ${len}`]));
    }
  }
  return cmds;
}

/**
 * Random operations through both paths on an image that already has content (`before`
 * is its guest content): in-process (`engine`) or through bin/qdedup, then verify.
 */
async function differentialOnExisting(
  label: string,
  img: string,
  before: Buffer,
  size: number,
  clusterBits: number,
  version: 2 | 3,
  via: 'engine' | 'cli',
  count: number,
  opts: { zeroWeight?: number; focus?: [number, number] } = {},
): Promise<Op[]> {
  const seed = seedOf(label);
  const rng = new Rng(seed);
  const cfg: Config = { clusterBits, version, refcountBits: 2 ** peekHeader(img).refcountOrder, size };
  const ops = genOps(rng, cfg, count, { cli: via === 'cli', zeroWeight: opts.zeroWeight, focus: opts.focus });
  const dir = scratch();
  const shadow = new Shadow(join(dir, 'shadow.raw'), size, before);
  const ctx = () => context(label, seed, `${describeConfig(cfg)} on ${basename(img)}`, ops);
  try {
    if (via === 'engine') await engineSequence(img, ops, rng, shadow);
    else
      for (const op of ops) {
        await cliApply(dir, img, op, rng);
        shadowApply(shadow, op);
      }
  } catch (err) {
    (err as Error).message += `\n${ctx()}`;
    throw err;
  } finally {
    shadow.close();
  }
  await verify(img, shadow.path, ctx());
  return ops;
}

// ------------------------------------------------------------------ the tests

/**
 * Runs one random sequence in a fresh folder: `body` creates img.qcow2 and applies the
 * operations to it and to the shadow; then the image must equal the shadow and check
 * clean. Failures carry the seed, configuration and operations.
 */
async function sequence(label: string, seed: number, cfg: Config, ops: Op[], body: (img: string, shadow: Shadow, dir: string) => Promise<void>): Promise<void> {
  const dir = scratch();
  const img = join(dir, 'img.qcow2');
  const shadow = new Shadow(join(dir, 'shadow.raw'), cfg.size);
  try {
    await body(img, shadow, dir);
  } catch (err) {
    (err as Error).message += `\n${context(label, seed, cfg, ops)}`;
    throw err;
  } finally {
    shadow.close();
  }
  await verify(img, shadow.path, context(label, seed, cfg, ops));
}

// All groups run side by side (each two cases at a time): the work is mostly waiting for
// fsync and for child processes, so overlapping them keeps the file's wall time down.
describe('differential writes', { skip: NO_QEMU, concurrency: true }, () => {
  describe('random sequences in-process', { concurrency: 2 }, () => {
    for (let i = 0; i < IN_PROCESS_SEQUENCES; i++) {
      const label = String(i);
      const seed = seedOf(label);
      const rng = new Rng(seed);
      const cfg = configFor(i, rng);
      const ops = genOps(rng, cfg, rng.int(3, 10));
      it(`#${label} ${describeConfig(cfg)}, ${ops.length} ops (seed 0x${seed.toString(16)})`, { skip: !only(label) }, async () => {
        await sequence(label, seed, cfg, ops, async (img, shadow) => {
          await createImage(img, createOptions(cfg));
          await engineSequence(img, ops, rng, shadow);
        });
      });
    }
  });

  describe('random sequences through bin/qdedup', { concurrency: 2 }, () => {
    for (let i = 0; i < CLI_SEQUENCES; i++) {
      const label = `cli-${i}`;
      const seed = seedOf(label);
      const rng = new Rng(seed);
      // Spread the cluster sizes differently from the in-process run (offset by 5).
      const cfg = configFor(i * 7 + 5, rng);
      const ops = genOps(rng, cfg, rng.int(2, 3), { cli: true });
      const creator = rng.chance(0.5) ? 'qemu-img' : 'qdedup';
      it(`#${label} ${describeConfig(cfg)} created by ${creator}, ${ops.length} ops (seed 0x${seed.toString(16)})`, { skip: !only(label) }, async () => {
        const o = `cluster_size=${2 ** cfg.clusterBits},compat=${cfg.version === 3 ? '1.1' : '0.10'},refcount_bits=${cfg.refcountBits}`;
        await sequence(label, seed, cfg, ops, async (img, shadow, dir) => {
          if (creator === 'qemu-img') await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', o, img, String(cfg.size)]);
          else await qdedupOk(['create', '-q', img, String(cfg.size), '-o', `${o},dedup=off`]);
          for (const op of ops) {
            await cliApply(dir, img, op, rng);
            shadowApply(shadow, op);
          }
        });
      });
    }
  });

  describe('refcount table growth', { concurrency: 2 }, () => {
    it(
      'grow-cli: 512 B clusters, 16-bit refcounts: 17 MiB written through bin/qdedup moves and grows the refcount table',
      { skip: !only('grow-cli') },
      async () => {
        const dir = scratch();
        const img = join(dir, 'grow.qcow2');
        const size = 24 << 20;
        await qdedupOk(['create', '-q', '-o', 'cluster_size=512,dedup=off', img, '24M']);
        const before = peekHeader(img);
        assert.equal(before.refcountTableClusters, 1);
        const rng = new Rng(seedOf('grow-cli'));
        const data = rng.bytes(17 << 20);
        const input = join(dir, 'data.bin');
        writeFileSync(input, data);
        const shadow = new Shadow(join(dir, 'shadow.raw'), size);
        try {
          await qdedupOk(['write', '-q', '-i', input, img, '4099']);
          shadow.write(4099, data);
          const after = peekHeader(img);
          assert.notEqual(after.refcountTableOffset, before.refcountTableOffset, 'the refcount table moved');
          assert.ok(after.refcountTableClusters > before.refcountTableClusters, `the refcount table grew (${after.refcountTableClusters} clusters)`);
          // The image reopens with the moved table: rewrite in place, then allocate more.
          await qdedupOk(['write', '-q', '-P', '0x3c', img, '1000000', '300000']);
          shadow.write(1000000, Buffer.alloc(300000, 0x3c));
          await qdedupOk(['write', '-q', '-z', img, '16M', '2M']);
          shadow.zero(16 << 20, 2 << 20);
          await qdedupOk(['write', '-q', '-P', '0xc3', img, '0x15ffff1', '70000']);
          shadow.write(0x15ffff1, Buffer.alloc(70000, 0xc3));
        } finally {
          shadow.close();
        }
        await verify(img, shadow.path, 'refcount table growth through bin/qdedup (512 B clusters, refcount_bits=16)');
        const chk = await checkImage(img);
        assert.ok(Number(chk.json?.['image-end-offset']) < 20 << 20, `no runaway allocation: ${JSON.stringify(chk.json)}`);
      },
    );

    for (const refcountBits of [64, 32]) {
      it(
        `grow-${refcountBits}: 512 B clusters, ${refcountBits}-bit refcounts: the table grows repeatedly in-process across reopenings`,
        { skip: !only(`grow-${refcountBits}`) },
        async () => {
          const dir = scratch();
          const img = join(dir, 'grow.qcow2');
          const cfg: Config = { clusterBits: 9, version: 3, refcountBits, size: 16 << 20 };
          await createImage(img, createOptions(cfg));
          const first = peekHeader(img);
          const rng = new Rng(seedOf(`grow-${refcountBits}`));
          const shadow = new Shadow(join(dir, 'shadow.raw'), cfg.size);
          const tables = new Set([first.refcountTableOffset]);
          try {
            for (let step = 0; step < 6; step++) {
              const image = await openForWrite(img);
              const op: Op = { kind: 'data', offset: rng.int(0, 15 << 20), length: rng.int(1 << 20, 2 << 20), seed: rng.u32() };
              op.length = Math.min(op.length, cfg.size - op.offset);
              await engineApply(image, op);
              shadowApply(shadow, op);
              await image.close();
              tables.add(peekHeader(img).refcountTableOffset);
            }
          } finally {
            shadow.close();
          }
          const last = peekHeader(img);
          assert.ok(last.refcountTableClusters > 1, `the refcount table grew (${last.refcountTableClusters} clusters)`);
          assert.ok(tables.size >= 2, `the refcount table moved (${[...tables].map((t) => t.toString(16)).join(', ')})`);
          await verify(img, shadow.path, `refcount table growth in-process (512 B clusters, refcount_bits=${refcountBits})`);
        },
      );
    }
  });

  describe('writes of the whole virtual size', { concurrency: 2 }, () => {
    const cases: { label: string; cs: number; compat: '0.10' | '1.1'; size: number; via: 'engine' | 'cli' }[] = [
      { label: 'whole-64k-cli', cs: 65536, compat: '1.1', size: (5 << 20) + 1536, via: 'cli' },
      { label: 'whole-512-v2', cs: 512, compat: '0.10', size: 1 << 20, via: 'engine' },
      { label: 'whole-2M', cs: 2 << 20, compat: '1.1', size: (6 << 20) - 512, via: 'engine' },
      { label: 'whole-4k-v2-cli', cs: 4096, compat: '0.10', size: 3 << 20, via: 'cli' },
    ];
    for (const c of cases) {
      it(
        `${c.label}: data, then a pattern, then zeroes over the whole ${c.size}-byte disk (${sizeName(c.cs)} clusters, compat ${c.compat}) through ${c.via === 'cli' ? 'bin/qdedup' : 'the engine'}`,
        { skip: !only(c.label) },
        async () => {
          const dir = scratch();
          const img = join(dir, 'whole.qcow2');
          const rng = new Rng(seedOf(c.label));
          const cfg: Config = { clusterBits: Math.log2(c.cs), version: c.compat === '1.1' ? 3 : 2, refcountBits: 16, size: c.size };
          await createImage(img, createOptions(cfg));
          const ops: Op[] = [
            { kind: 'data', offset: 0, length: c.size, seed: rng.u32(), via: 'stdin', omitLength: true },
            { kind: 'pattern', offset: 0, length: c.size, pattern: 0xee },
            { kind: 'data', offset: 1, length: c.size - 2, seed: rng.u32(), via: 'file' },
            { kind: 'zero', offset: 0, length: c.size },
            { kind: 'pattern', offset: c.size - 700, length: 700, pattern: 0x5d },
          ];
          const shadow = new Shadow(join(dir, 'shadow.raw'), c.size);
          try {
            if (c.via === 'engine') await engineSequence(img, ops, rng, shadow);
            else
              for (const op of ops) {
                await cliApply(dir, img, op, rng);
                shadowApply(shadow, op);
              }
          } finally {
            shadow.close();
          }
          await verify(img, shadow.path, context(c.label, rng.seed, cfg, ops));
          // Zeroing everything released every data cluster but the last one written.
          const chk = await checkImage(img);
          assert.ok(Number(chk.json?.['allocated-clusters'] ?? 0) <= 2, `clusters left allocated after zeroing the disk: ${JSON.stringify(chk.json)}`);
        },
      );
    }
  });

  describe('images with a backing file', { concurrency: 2 }, () => {
    interface BackingCase {
      label: string;
      baseFormat: 'qcow2' | 'raw';
      baseCs: number;
      overlayCs: number;
      version: 2 | 3;
      baseSize: number;
      size: number;
      creator: 'qdedup' | 'qemu-img';
      via: 'engine' | 'cli';
      chain?: boolean;
    }
    const cases: BackingCase[] = [
      {
        label: 'bk-q-64k-4k',
        baseFormat: 'qcow2',
        baseCs: 65536,
        overlayCs: 4096,
        version: 3,
        baseSize: 3 << 20,
        size: 3 << 20,
        creator: 'qdedup',
        via: 'engine',
      },
      {
        label: 'bk-q-4k-64k',
        baseFormat: 'qcow2',
        baseCs: 4096,
        overlayCs: 65536,
        version: 3,
        baseSize: 2 << 20,
        size: 3 << 20,
        creator: 'qemu-img',
        via: 'cli',
      },
      {
        label: 'bk-q-512-512-v2',
        baseFormat: 'qcow2',
        baseCs: 512,
        overlayCs: 512,
        version: 2,
        baseSize: 200 << 10,
        size: 256 << 10,
        creator: 'qdedup',
        via: 'engine',
      },
      {
        label: 'bk-q-64k-512-v2-cli',
        baseFormat: 'qcow2',
        baseCs: 65536,
        overlayCs: 512,
        version: 2,
        baseSize: 1 << 20,
        size: 1 << 20,
        creator: 'qdedup',
        via: 'cli',
      },
      {
        label: 'bk-q-1k-2M',
        baseFormat: 'qcow2',
        baseCs: 1024,
        overlayCs: 2 << 20,
        version: 3,
        baseSize: 5 << 20,
        size: 6 << 20,
        creator: 'qdedup',
        via: 'engine',
      },
      {
        label: 'bk-q-chain',
        baseFormat: 'qcow2',
        baseCs: 4096,
        overlayCs: 8192,
        version: 3,
        baseSize: 1 << 20,
        size: 2 << 20,
        creator: 'qdedup',
        via: 'cli',
        chain: true,
      },
      {
        label: 'bk-raw-8k',
        baseFormat: 'raw',
        baseCs: 0,
        overlayCs: 8192,
        version: 3,
        baseSize: (1 << 20) + 1000,
        size: 2 << 20,
        creator: 'qdedup',
        via: 'engine',
      },
      {
        label: 'bk-raw-2k-v2-cli',
        baseFormat: 'raw',
        baseCs: 0,
        overlayCs: 2048,
        version: 2,
        baseSize: 300000,
        size: 512 << 10,
        creator: 'qdedup',
        via: 'cli',
      },
      {
        label: 'bk-raw-64k-cli',
        baseFormat: 'raw',
        baseCs: 0,
        overlayCs: 65536,
        version: 3,
        baseSize: 1 << 20,
        size: 1 << 20,
        creator: 'qemu-img',
        via: 'cli',
      },
    ];
    for (const c of cases) {
      it(
        `${c.label}: ${c.via === 'cli' ? 'bin/qdedup' : 'engine'} writes into a ${c.version === 2 ? 'v2' : 'v3'} ${sizeName(c.overlayCs)}-cluster overlay on a ${c.baseFormat} base${c.chain ? ' (two-level chain)' : ''}, created by ${c.creator}`,
        { skip: !only(c.label) },
        async () => {
          const dir = scratch();
          const rng = new Rng(seedOf(c.label + '/base'));
          let base: string;
          if (c.baseFormat === 'raw') {
            base = join(dir, 'base.raw');
            const content = Buffer.concat([rng.bytes(c.baseSize >> 1), Buffer.alloc(c.baseSize - (c.baseSize >> 1), 0x77)]);
            writeFileSync(base, content);
          } else {
            base = join(dir, 'base.qcow2');
            await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${c.baseCs}`, base, String(c.baseSize)]);
            // Non-zero nearly everywhere, so that a copy on write that loses backing data shows.
            await qemuIo(base, [`write -q -P 0x9c 0 ${c.baseSize}`, ...seedCommands(rng, c.baseSize, c.baseCs, { zero: true })]);
          }
          let backingName = basename(base); // relative: resolved against the overlay's folder
          let backingFormat: string = c.baseFormat;
          if (c.chain) {
            const mid = join(dir, 'mid.qcow2');
            await runOk('qemu-img', [
              'create',
              '-q',
              '-f',
              'qcow2',
              '-o',
              'cluster_size=4096',
              '-b',
              backingName,
              '-F',
              backingFormat,
              mid,
              String(c.baseSize + (256 << 10)),
            ]);
            await qemuIo(mid, seedCommands(rng, c.baseSize, 4096));
            backingName = 'mid.qcow2';
            backingFormat = 'qcow2';
          }
          const img = join(dir, 'overlay.qcow2');
          const o = `cluster_size=${c.overlayCs},compat=${c.version === 3 ? '1.1' : '0.10'}`;
          if (c.creator === 'qemu-img')
            await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', o, '-b', backingName, '-F', backingFormat, img, String(c.size)]);
          else await qdedupOk(['create', '-q', '-o', `${o},dedup=off`, '-b', backingName, '-F', backingFormat, img, String(c.size)]);
          const before = await guestBytes(img);
          assert.equal(before.length, c.size);
          await differentialOnExisting(c.label, img, before, c.size, Math.log2(c.overlayCs), c.version, c.via, c.via === 'cli' ? 3 : 10, {
            zeroWeight: 0.3,
            focus: [0, c.baseSize],
          });
          // The base stayed untouched: its content is what it was before the overlay was written.
          if (c.baseFormat === 'qcow2' && !c.chain) assert.equal((await checkImage(base)).status, 0);
        },
      );
    }
  });

  describe('compressed, zero and discarded clusters', { concurrency: 2 }, () => {
    const compressed: { label: string; cs: number; compat: string; size: number; via: 'engine' | 'cli' }[] = [
      { label: 'cmp-512', cs: 512, compat: '1.1', size: 256 << 10, via: 'engine' },
      { label: 'cmp-4k-cli', cs: 4096, compat: '1.1', size: 1 << 20, via: 'cli' },
      { label: 'cmp-4k-v2', cs: 4096, compat: '0.10', size: 1 << 20, via: 'engine' },
      { label: 'cmp-64k', cs: 65536, compat: '1.1', size: 4 << 20, via: 'engine' },
      { label: 'cmp-64k-v2-cli', cs: 65536, compat: '0.10', size: 2 << 20, via: 'cli' },
      { label: 'cmp-2M', cs: 2 << 20, compat: '1.1', size: 8 << 20, via: 'engine' },
    ];
    for (const c of compressed) {
      it(
        `${c.label}: ${c.via === 'cli' ? 'bin/qdedup' : 'engine'} writes into compressed clusters (qemu-img convert -c, ${sizeName(c.cs)} clusters, compat ${c.compat})`,
        { skip: !only(c.label) },
        async () => {
          const dir = scratch();
          const rng = new Rng(seedOf(c.label + '/src'));
          // Source: compressible text-like runs, random clusters and zero runs.
          const src = Buffer.alloc(c.size);
          for (let pos = 0; pos < c.size; ) {
            const n = Math.min(c.size - pos, rng.int(1, 3 * c.cs));
            const r = rng.float();
            if (r < 0.45) src.fill(`cluster ${pos} `, pos, pos + n);
            else if (r < 0.75) rng.bytes(n).copy(src, pos);
            pos += n; // else zeros
          }
          const raw = join(dir, 'src.raw');
          writeFileSync(raw, src);
          const img = join(dir, 'compressed.qcow2');
          await runOk('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${c.cs},compat=${c.compat}`, raw, img]);
          const map = await runOk('qemu-img', ['map', '-f', 'qcow2', '--output=json', img]);
          assert.ok(/"data": true(?!, "offset")/.test(map.stdout), 'the image has compressed clusters (data without a host offset)');
          await differentialOnExisting(c.label, img, src, c.size, Math.log2(c.cs), c.compat === '1.1' ? 3 : 2, c.via, c.via === 'cli' ? 3 : 10, {
            zeroWeight: 0.3,
          });
        },
      );
    }

    const zeroes: { label: string; cs: number; size: number; via: 'engine' | 'cli'; refcountBits: number }[] = [
      { label: 'zero-512', cs: 512, size: 128 << 10, via: 'engine', refcountBits: 16 },
      { label: 'zero-4k-cli', cs: 4096, size: 1 << 20, via: 'cli', refcountBits: 8 },
      { label: 'zero-64k', cs: 65536, size: 4 << 20, via: 'engine', refcountBits: 2 },
      { label: 'zero-1M-cli', cs: 1 << 20, size: 12 << 20, via: 'cli', refcountBits: 64 },
    ];
    for (const c of zeroes) {
      it(
        `${c.label}: ${c.via === 'cli' ? 'bin/qdedup' : 'engine'} writes into zero (preallocated and not) and discarded clusters made by qemu-io (${sizeName(c.cs)} clusters, refcount_bits=${c.refcountBits})`,
        { skip: !only(c.label) },
        async () => {
          const dir = scratch();
          const rng = new Rng(seedOf(c.label + '/src'));
          const img = join(dir, 'zeroes.qcow2');
          await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${c.cs},refcount_bits=${c.refcountBits}`, img, String(c.size)]);
          const clusters = c.size / c.cs;
          await qemuIo(img, [
            `write -P 0x11 0 ${c.size}`,
            ...seedCommands(rng, c.size, c.cs, { zero: true }),
            `write -z ${c.cs} ${4 * c.cs}`, // preallocated zero clusters
            `write -z -u ${6 * c.cs} ${2 * c.cs}`, // zero clusters without a host cluster
            `discard ${9 * c.cs} ${2 * c.cs}`,
            `write -z ${(clusters - 2) * c.cs} ${c.cs}`,
          ]);
          const map = await runOk('qemu-img', ['map', '-f', 'qcow2', '--output=json', img]);
          assert.match(map.stdout, /"zero": true, "data": false, "offset"/, 'the image has preallocated zero clusters');
          const before = await guestBytes(img);
          // Aim the writes at the zeroed region as well as elsewhere.
          const ops = await differentialOnExisting(c.label, img, before, c.size, Math.log2(c.cs), 3, c.via, c.via === 'cli' ? 3 : 10, { zeroWeight: 0.2 });
          assert.ok(ops.length > 0);
          // Partial writes exactly into each kind of zero cluster, through the CLI.
          const shadowBefore = await guestBytes(img);
          const shadow = new Shadow(join(dir, 'shadow2.raw'), c.size, shadowBefore);
          try {
            for (const [off, pat] of [
              [c.cs + 7, 0x21],
              [6 * c.cs + c.cs - 3, 0x22],
              [9 * c.cs + 1, 0x23],
              [(clusters - 2) * c.cs, 0x24],
            ] as const) {
              await qdedupOk(['write', '-q', '-P', String(pat), img, String(off), '5']);
              shadow.write(off, Buffer.alloc(5, pat));
            }
          } finally {
            shadow.close();
          }
          await verify(img, shadow.path, `${c.label}: partial writes into zero and discarded clusters`);
        },
      );
    }
  });

  describe('images QEMU shaped in other ways', { concurrency: 2 }, () => {
    it(
      'hdr-backing-512: refcount table growth rewrites a 512 B header that carries a backing name and format (bin/qdedup)',
      { skip: !only('hdr-backing-512') },
      async () => {
        const dir = scratch();
        const base = join(dir, 'base.qcow2');
        await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', base, '20M']);
        await qemuIo(base, ['write -q -P 0x6b 0 20M']);
        const img = join(dir, 'overlay.qcow2');
        await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', 'base.qcow2', '-F', 'qcow2', img, '20M']);
        const before = peekHeader(img);
        const data = new Rng(seedOf('hdr-backing-512')).bytes(17 << 20);
        const input = join(dir, 'data.bin');
        writeFileSync(input, data);
        await qdedupOk(['write', '-q', '-i', input, img, '1000000']);
        const shadow = new Shadow(join(dir, 'shadow.raw'), 20 << 20, Buffer.alloc(20 << 20, 0x6b));
        shadow.write(1000000, data);
        shadow.close();
        const after = peekHeader(img);
        assert.ok(
          after.refcountTableClusters > before.refcountTableClusters && after.refcountTableOffset !== before.refcountTableOffset,
          'the refcount table moved and grew',
        );
        const info = JSON.parse((await runOk('qemu-img', ['info', '--output=json', img])).stdout);
        assert.equal(info['backing-filename'], 'base.qcow2');
        assert.equal(info['backing-filename-format'], 'qcow2');
        await verify(img, shadow.path, 'hdr-backing-512: header rewritten with its backing name');
      },
    );

    it('hdr-v2-raw-backing: the same in-process on a v2 (72-byte header) overlay of a raw file', { skip: !only('hdr-v2-raw-backing') }, async () => {
      const dir = scratch();
      const rng = new Rng(seedOf('hdr-v2-raw-backing'));
      const baseData = rng.bytes(3 << 20);
      writeFileSync(join(dir, 'base.raw'), baseData);
      const img = join(dir, 'overlay.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,compat=0.10', '-b', 'base.raw', '-F', 'raw', img, '12M']);
      const shadow = new Shadow(join(dir, 'shadow.raw'), 12 << 20, baseData);
      const before = peekHeader(img);
      const ops: Op[] = [
        { kind: 'data', offset: 777, length: 9 << 20, seed: rng.u32() },
        { kind: 'zero', offset: (3 << 20) - 1000, length: 5000 }, // v2 with backing: written zeros
        { kind: 'pattern', offset: 12345, length: 100, pattern: 0x99 },
      ];
      try {
        await engineSequence(img, ops, rng, shadow);
      } finally {
        shadow.close();
      }
      const after = peekHeader(img);
      assert.ok(after.refcountTableClusters > before.refcountTableClusters, 'the refcount table grew');
      const info = JSON.parse((await runOk('qemu-img', ['info', '--output=json', img])).stdout);
      assert.equal(info['backing-filename'], 'base.raw');
      await verify(img, shadow.path, context('hdr-v2-raw-backing', rng.seed, 'v2 512 B overlay on raw', ops));
    });

    it('qemu-grown: qdedup allocates in an image whose refcount table QEMU grew and moved', { skip: !only('qemu-grown') }, async () => {
      const dir = scratch();
      const img = join(dir, 'grown.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=32', img, '24M']);
      await qemuIo(img, ['write -q -P 0x10 0 9M', 'discard -q 1M 1M', 'write -q -P 0x11 20M 1M']);
      assert.ok(peekHeader(img).refcountTableClusters > 1, 'QEMU grew the refcount table');
      const before = await guestBytes(img);
      await differentialOnExisting('qemu-grown', img, before, 24 << 20, 9, 3, 'engine', 12);
    });

    for (const prealloc of ['metadata', 'falloc']) {
      it(`prealloc-${prealloc}: writes into an image made with preallocation=${prealloc}`, { skip: !only(`prealloc-${prealloc}`) }, async () => {
        const dir = scratch();
        const img = join(dir, 'prealloc.qcow2');
        await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=8192,preallocation=${prealloc}`, img, '3M']);
        await differentialOnExisting(
          `prealloc-${prealloc}`,
          img,
          Buffer.alloc(3 << 20),
          3 << 20,
          13,
          3,
          prealloc === 'metadata' ? 'engine' : 'cli',
          prealloc === 'metadata' ? 10 : 3,
        );
      });
    }

    it('resized: writes past the old end after qemu-img resize grows the disk (L1 relocated), and after a shrink', { skip: !only('resized') }, async () => {
      const dir = scratch();
      const img = join(dir, 'resized.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', img, '64k']);
      await qemuIo(img, ['write -q -P 0x21 0 64k']);
      await runOk('qemu-img', ['resize', '-q', '-f', 'qcow2', img, '3M']); // L1 grows from 2 to 96 entries
      const before = await guestBytes(img);
      await differentialOnExisting('resized/grow', img, before, 3 << 20, 9, 3, 'engine', 10);
      await runOk('qemu-img', ['resize', '-q', '-f', 'qcow2', '--shrink', img, '1000k']); // L1 larger than needed
      const shrunk = await guestBytes(img);
      assert.equal(shrunk.length, 1000 << 10);
      await differentialOnExisting('resized/shrink', img, shrunk, 1000 << 10, 9, 3, 'engine', 8);
    });

    it('lazy-refcounts: writes into a clean image with the lazy_refcounts compatible bit', { skip: !only('lazy-refcounts') }, async () => {
      const dir = scratch();
      const img = join(dir, 'lazy.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,lazy_refcounts=on', img, '2M']);
      await qemuIo(img, ['write -q -P 0x31 0 1M']);
      await differentialOnExisting('lazy-refcounts', img, await guestBytes(img), 2 << 20, 12, 3, 'cli', 3);
    });

    it(
      'bitmap: writing clears the bitmaps autoclear bit; qemu-img check then finds only the leaks QEMU itself announces',
      { skip: !only('bitmap') },
      async () => {
        const dir = scratch();
        const img = join(dir, 'bitmap.qcow2');
        await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '1M']);
        await qemuIo(img, ['write -q -P 0x41 0 100k']);
        await runOk('qemu-img', ['bitmap', '--add', img, 'bm0']);
        await qemuIo(img, ['write -q -P 0x42 0 10k']);
        const before = await guestBytes(img);
        const shadow = new Shadow(join(dir, 'shadow.raw'), 1 << 20, before);
        await qdedupOk(['write', '-q', '-P', '0x43', img, '5000', '20000']);
        shadow.write(5000, Buffer.alloc(20000, 0x43));
        shadow.close();
        const cmp = await compareRaw(img, shadow.path);
        assert.equal(cmp.status, 0, cmp.stdout + cmp.stderr);
        // The spec's autoclear rule: qdedup does not maintain bitmaps, so it cleared bit 0
        // before writing; QEMU then ignores the bitmap directory and counts its clusters as
        // leaked ("Some clusters may be leaked, run 'qemu-img check -r'"). No corruption.
        const chk = await checkImage(img);
        assert.ok(chk.status === 0 || chk.status === 3, `check exited ${chk.status}: ${chk.stderr}`);
        assert.equal(chk.json?.corruptions ?? 0, 0);
        assert.match(chk.stderr, /lacking bitmap support/);
        assert.equal((await runAsync('qemu-img', ['check', '-q', '-r', 'leaks', '-f', 'qcow2', img])).status, 0);
      },
    );
  });

  describe('clusters shared with internal snapshots', { concurrency: 2 }, () => {
    const cases: { label: string; cs: number; compat: string; refcountBits: number; size: number; via: 'engine' | 'cli'; compressed?: boolean }[] = [
      { label: 'snap-compressed-4k', cs: 4096, compat: '1.1', refcountBits: 16, size: 2 << 20, via: 'engine', compressed: true },
      { label: 'snap-64k-cli', cs: 65536, compat: '1.1', refcountBits: 16, size: 4 << 20, via: 'cli' },
      { label: 'snap-4k', cs: 4096, compat: '1.1', refcountBits: 2, size: 3 << 20, via: 'engine' },
      { label: 'snap-512-v2', cs: 512, compat: '0.10', refcountBits: 16, size: 96 << 10, via: 'engine' },
      { label: 'snap-16k-v2-cli', cs: 16384, compat: '0.10', refcountBits: 16, size: 1 << 20, via: 'cli' },
      { label: 'snap-2M', cs: 2 << 20, compat: '1.1', refcountBits: 8, size: 8 << 20, via: 'engine' },
    ];
    for (const c of cases) {
      it(
        `${c.label}: ${c.via === 'cli' ? 'bin/qdedup' : 'engine'} writes over clusters shared with snapshots; the snapshots still read their old data (${sizeName(c.cs)} clusters, compat ${c.compat}, refcount_bits=${c.refcountBits})`,
        { skip: !only(c.label) },
        async () => {
          const dir = scratch();
          const rng = new Rng(seedOf(c.label + '/src'));
          const img = join(dir, 'snap.qcow2');
          const o = `cluster_size=${c.cs},compat=${c.compat},refcount_bits=${c.refcountBits}`;
          if (c.compressed) {
            // Compressed clusters (several per host cluster) shared with the snapshots.
            const src = join(dir, 'src.raw');
            const text = Buffer.alloc(c.size);
            for (let pos = 0; pos < c.size; pos += 4096) text.fill(`${pos.toString(36)} ${rng.u32().toString(36)} `, pos, Math.min(c.size, pos + 4096));
            Buffer.alloc(Math.floor(c.size / 2), 0x5a).copy(text); // qemu-io -P 0x5a below reads it back
            writeFileSync(src, text);
            await runOk('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', o, src, img]);
          } else {
            await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', o, img, String(c.size)]);
            await qemuIo(img, [`write -P 0x5a 0 ${Math.floor(c.size / 2)}`, ...seedCommands(rng, c.size, c.cs, { zero: c.compat === '1.1' })]);
          }
          await runOk('qemu-img', ['snapshot', '-c', 's1', img]);
          const s1 = await guestBytes(img);
          // First round of writes: every cluster they touch is shared with s1.
          await differentialOnExisting(`${c.label}/1`, img, s1, c.size, Math.log2(c.cs), c.compat === '1.1' ? 3 : 2, c.via, c.via === 'cli' ? 3 : 8, {
            zeroWeight: 0.25,
            focus: [0, Math.floor(c.size / 2)],
          });
          // A second snapshot of what qdedup wrote, then a second round of writes.
          await runOk('qemu-img', ['snapshot', '-c', 's2', img]);
          const s2 = await guestBytes(img);
          const second = await differentialOnExisting(
            `${c.label}/2`,
            img,
            s2,
            c.size,
            Math.log2(c.cs),
            c.compat === '1.1' ? 3 : 2,
            c.via,
            c.via === 'cli' ? 3 : 8,
            { zeroWeight: 0.25 },
          );
          assert.ok(second.length > 0);
          // The snapshots read back their old data (qemu-img convert -l).
          assert.ok((await guestBytes(img, 'qcow2', 's1')).equals(s1), 'snapshot s1 reads back its old data');
          assert.ok((await guestBytes(img, 'qcow2', 's2')).equals(s2), 'snapshot s2 reads back its old data');
          // And after `qemu-img snapshot -a` on a copy, qemu-io reads s1's pattern and compare agrees.
          // (QEMU cannot revert when a refcount would pass the width's maximum on the way:
          // with 2-bit refcounts, clusters shared by s1, s2 and the active L1 are already at 3.)
          if (c.refcountBits < 4) return;
          const copy = join(dir, 'copy.qcow2');
          copyFileSync(img, copy);
          await runOk('qemu-img', ['snapshot', '-a', 's1', copy]);
          const s1raw = join(dir, 's1.raw');
          writeFileSync(s1raw, s1);
          await verify(copy, s1raw, `${c.label}: the image reverted to s1 equals s1`);
          const probe = s1.indexOf(0x5a);
          if (probe >= 0 && s1[probe + 1] === 0x5a) {
            const r = await runOk('qemu-io', ['-f', 'qcow2', '-r', '-c', `read -P 0x5a ${probe} 2`, copy]);
            assert.match(r.stdout, new RegExp(`^read 2/2 bytes at offset ${probe}$`, 'm'));
          }
        },
      );
    }
  });
});
