// Mixed turns: qemu-io and qdedup take turns on the same dedup image.
// Each sequence creates a dedup image and a raw shadow, then alternates turns: a qdedup
// turn (the Image API in-process for most operations, plus one `bin/qdedup write`), then a
// qemu-io turn (one process, many `-c` commands), and so on. Operations are random batches
// of write pattern, write from a file, zero, rewrite of an earlier range and read, drawn
// from a small pool of cluster contents so that qdedup links clusters (refcount > 1) that
// the next qemu-io turn overwrites: QEMU must copy them on write. After every turn
// `qemu-img compare` must find the image identical to the shadow and `qemu-img check` must
// exit 0: no corruption and no leak (the holder snapshot holds the store qdedup abandons
// after a qemu-io turn until the next qdedup open releases it). qemu-io clears autoclear bit 60; the first qdedup open
// after it (in-process or the CLI, whichever comes first) must say that it starts a fresh
// index, and later opens must not. After each qdedup turn `check --deep` (in-process, with
// the dedup hook) must find no corruption either.
//
//   npm test -- mixed-turns                          12 sequences × 6 turns
//   QDEDUP_SOAK_SCALE=10 npm test -- mixed-turns     120 sequences
//   QDEDUP_SEED=<base seed> QDEDUP_ONLY=<n>[,…]      rerun sequences (printed with a failure)

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { checkImage } from '../../src/image/check-image.ts';
import { createImage } from '../../src/dedup/open.ts';
import { storedRefcounts } from '../../src/dedup/clusters.ts';
import { dedupCheckExtension } from '../../src/dedup/inspect.ts';
import type { SupportedHashAlgorithm } from '../../src/dedup/hasher.ts';
import { NO_QEMU } from '../helpers.ts';
import { Rng, compareAndCheck, deriveSeed, qdedupAsync } from './differential-lib.ts';
import { RawShadow, firstDiff, qemuIoBatch } from './differential-long-lib.ts';
import { openForWrite, dedupOf } from '../../src/dedup/open.ts';

const BASE_SEED = process.env.QDEDUP_SEED ? Number(process.env.QDEDUP_SEED) >>> 0 : 0x3d1c_7a11;
const SCALE = Math.max(0, Number(process.env.QDEDUP_SOAK_SCALE ?? 1));
const SEQUENCES = Math.round(12 * SCALE);
const TURNS = 6;
const ONLY = process.env.QDEDUP_ONLY?.split(',').map(Number);

const KiB = 1024;
const MiB = 1024 * KiB;

interface Geometry {
  label: string;
  clusterBits: number;
  size: number;
  refcountOrder: number;
  algorithm: SupportedHashAlgorithm;
  verify: boolean;
  order: number;
  maxIncarnations: number;
  journalBlockSize: number;
}

/** Geometries, cycled over the sequences: tiny log stores (freezes), verify on and off, 4-bit refcounts (cap 7). */
const GEOMETRIES: Geometry[] = [
  {
    label: '4k-sha256-o2',
    clusterBits: 12,
    size: 4 * MiB,
    refcountOrder: 4,
    algorithm: 'sha256',
    verify: false,
    order: 2,
    maxIncarnations: 2,
    journalBlockSize: 512,
  },
  {
    label: '4k-blake3-verify',
    clusterBits: 12,
    size: 4 * MiB,
    refcountOrder: 4,
    algorithm: 'blake3',
    verify: true,
    order: 3,
    maxIncarnations: 0,
    journalBlockSize: 4096,
  },
  {
    label: '64k-sha256-o1',
    clusterBits: 16,
    size: 16 * MiB,
    refcountOrder: 4,
    algorithm: 'sha256',
    verify: false,
    order: 1,
    maxIncarnations: 0,
    journalBlockSize: 4096,
  },
  {
    label: '4k-sha3-rc4',
    clusterBits: 12,
    size: 4 * MiB,
    refcountOrder: 2,
    algorithm: 'sha3-256',
    verify: false,
    order: 4,
    maxIncarnations: 3,
    journalBlockSize: 512,
  },
  {
    label: '512-sha256-o2',
    clusterBits: 9,
    size: 1 * MiB,
    refcountOrder: 4,
    algorithm: 'sha256',
    verify: false,
    order: 2,
    maxIncarnations: 2,
    journalBlockSize: 512,
  },
  {
    label: '4k-sha256-rc64-verify',
    clusterBits: 12,
    size: 6 * MiB + 512,
    refcountOrder: 6,
    algorithm: 'sha256',
    verify: true,
    order: 2,
    maxIncarnations: 1,
    journalBlockSize: 1024,
  },
];

// ------------------------------------------------------------------ operations

type Op =
  | { kind: 'write'; offset: number; data: Buffer; how: 'pattern' | 'pool' | 'file' | 'rewrite'; pattern?: number }
  | { kind: 'zero'; offset: number; length: number; unmap: boolean }
  | { kind: 'read'; offset: number; length: number };

function opText(op: Op): string {
  const r = `${op.offset}+${op.kind === 'write' ? op.data.length : op.length}`;
  if (op.kind === 'write') return `write (${op.how}${op.pattern !== undefined ? ` 0x${op.pattern.toString(16)}` : ''}) ${r}`;
  if (op.kind === 'zero') return `write -z${op.unmap ? ' -u' : ''} ${r}`;
  return `read ${r}`;
}

/**
 * Draws operations: mostly whole clusters from a pool of 6 contents and 3 byte patterns
 * (duplicates), in a hot window of the disk, half of them on ranges written before (by
 * either side: qemu-io overwrites what qdedup linked, qdedup rewrites what qemu-io wrote).
 */
class Gen {
  readonly cs: number;
  readonly pool: Buffer[];
  readonly recent: { offset: number; length: number }[] = [];
  private readonly hot: number;

  constructor(
    private readonly rng: Rng,
    readonly g: Geometry,
  ) {
    this.cs = 2 ** g.clusterBits;
    this.pool = Array.from({ length: 6 }, () => rng.bytes(this.cs));
    this.hot = Math.min(g.size, 160 * this.cs);
  }

  private range(): { offset: number; length: number } {
    const { rng, cs } = this;
    if (this.recent.length && rng.chance(0.5)) {
      const r = rng.pick(this.recent);
      if (rng.chance(0.6)) return { ...r };
      const offset = r.offset + rng.int(-2, 2) * cs;
      return this.clamp(offset, rng.int(1, 6) * cs);
    }
    const p = rng.float();
    let offset: number;
    let length: number;
    if (p < 0.65) {
      offset = rng.int(0, this.hot / cs - 1) * cs;
      length = rng.int(1, 8) * cs;
    } else if (p < 0.85) {
      offset = rng.int(0, this.hot - 1);
      length = rng.int(1, 3 * cs);
    } else {
      offset = rng.chance(0.2) ? this.g.size - rng.int(1, 4) * 512 : rng.int(0, this.hot / 512 - 1) * 512;
      length = rng.int(1, 8) * 512;
    }
    return this.clamp(offset, length);
  }

  private clamp(offset: number, length: number): { offset: number; length: number } {
    offset = Math.max(0, Math.min(this.g.size - 1, offset));
    return { offset, length: Math.max(1, Math.min(length, this.g.size - offset)) };
  }

  /** Bytes of `length` from the pool, cluster-aligned to the guest (so aligned writes repeat whole pool clusters). */
  private poolData(offset: number, length: number): Buffer {
    const { cs, rng } = this;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    const parts = Array.from({ length: last - first + 1 }, () => rng.pick(this.pool));
    return Buffer.concat(parts).subarray(offset - first * cs, offset - first * cs + length);
  }

  next(): Op {
    const { rng } = this;
    const k = rng.float();
    if (k < 0.15) {
      // Read back a range written before, or any range.
      const r = this.recent.length && rng.chance(0.8) ? rng.pick(this.recent) : this.range();
      return { kind: 'read', offset: r.offset, length: r.length };
    }
    const rewrite = this.recent.length > 0 && k < 0.3;
    const { offset, length } = rewrite ? { ...rng.pick(this.recent) } : this.range();
    this.recent.push({ offset, length });
    if (this.recent.length > 48) this.recent.splice(rng.int(0, 47), 1);
    const w = rng.float();
    if (w < 0.18) return { kind: 'zero', offset, length, unmap: rng.chance(0.3) };
    if (w < 0.4) {
      const pattern = rng.pick([0x11, 0x22, 0x5a]);
      return { kind: 'write', offset, data: Buffer.alloc(length, pattern), how: rewrite ? 'rewrite' : 'pattern', pattern };
    }
    if (w < 0.85) return { kind: 'write', offset, data: this.poolData(offset, length), how: rewrite ? 'rewrite' : 'pool' };
    return { kind: 'write', offset, data: rng.bytes(length), how: rewrite ? 'rewrite' : 'file' };
  }
}

function shadowApply(shadow: RawShadow, op: Op): void {
  if (op.kind === 'write') shadow.write(op.offset, op.data);
  else if (op.kind === 'zero') shadow.zero(op.offset, op.length);
}

/** The qemu-io command of an operation (data goes through a file). */
function qemuCommand(op: Op, file: () => string): string {
  if (op.kind === 'zero') return `write -q -z${op.unmap ? ' -u' : ''} ${op.offset} ${op.length}`;
  if (op.kind === 'read') return `read -q ${op.offset} ${op.length}`;
  if (op.pattern !== undefined) return `write -q -P ${op.pattern} ${op.offset} ${op.data.length}`;
  const f = file();
  writeFileSync(f, op.data);
  return `write -q -s ${f} ${op.offset} ${op.data.length}`;
}

/** A uniform range read back by qemu-io with `read -P` (verifies the bytes). */
function qemuVerify(op: Op & { kind: 'read' }, shadow: RawShadow): string | null {
  const want = shadow.read(op.offset, op.length);
  return want.every((x) => x === want[0]) ? `read -q -P ${want[0]} ${op.offset} ${op.length}` : null;
}

/** Autoclear bit 60 of the image's header. */
function dedupBit(path: string): boolean {
  const h = readFileSync(path).subarray(0, 96);
  return (h.readBigUInt64BE(88) & (1n << 60n)) !== 0n;
}

/** Guest clusters of [offset, +length) whose host cluster has refcount > 1 (shared: linked by dedup, or held). */
async function sharedClusters(path: string, ranges: { offset: number; length: number }[]): Promise<number> {
  const img = await Image.open(path, { backing: false });
  try {
    const refcounts = await storedRefcounts(img);
    const seen = new Set<number>();
    let shared = 0;
    for (const r of ranges) {
      for (let c = Math.floor(r.offset / img.clusterSize); c * img.clusterSize < r.offset + r.length; c++) {
        if (seen.has(c)) continue;
        seen.add(c);
        const e = await img.entry(c);
        if (e.kind === 'normal' && (await refcounts.get(e.hostOffset / img.clusterSize)) > 1) shared++;
      }
    }
    return shared;
  } finally {
    await img.close();
  }
}

const NOTICE = /dedup index not trusted: dedup autoclear bit 60 is clear \(another program opened the image for writing/;

// ------------------------------------------------------------------ one sequence

interface Result {
  ops: number;
  qemuOps: number;
  engineOps: number;
  cliOps: number;
  hits: number;
  sharedOverwritten: number;
  notices: number;
  failure?: string;
}

async function runSequence(index: number, seed: number, dir: string): Promise<Result> {
  const g = GEOMETRIES[index % GEOMETRIES.length];
  const rng = new Rng(seed);
  const gen = new Gen(rng, g);
  const img = join(dir, 'img.qcow2');
  await createImage(img, {
    size: g.size,
    clusterBits: g.clusterBits,
    version: 3,
    refcountOrder: g.refcountOrder,
    lazyRefcounts: false,
    force: true,
    dedup: { algorithm: g.algorithm, verify: g.verify, maxIncarnations: g.maxIncarnations, order: g.order, journalBlockSize: g.journalBlockSize },
  });
  const shadow = new RawShadow(join(dir, 'shadow.raw'), g.size);
  const res: Result = { ops: 0, qemuOps: 0, engineOps: 0, cliOps: 0, hits: 0, sharedOverwritten: 0, notices: 0 };
  const log: { text: string; offset: number; length: number }[] = [];
  const note = (turn: number, who: string, op: Op) =>
    log.push({ text: `turn ${turn} ${who}: ${opText(op)}`, offset: op.offset, length: op.kind === 'write' ? op.data.length : op.length });
  let files = 0;
  const file = () => join(dir, `d${files++}.bin`);
  const fail = (turn: number, problems: string[]): Result => {
    // qemu-img compare names the first differing byte: list the operations that touched its sector.
    const at = problems.map((p) => /(?:Content mismatch at offset|first difference at guest offset) (\d+)/.exec(p)).find((x) => x);
    const near = at ? Number(at[1]) - (Number(at[1]) % 512) : null;
    const touching = near === null ? log : log.filter((l) => l.offset < near + 512 && near < l.offset + l.length);
    res.failure = [
      `sequence ${index} (${g.label}, seed 0x${seed.toString(16)}), turn ${turn}:`,
      ...problems.map((p) => `  ${p}`),
      near === null ? '  last operations:' : `  last operations touching guest bytes ${near}…${near + 511}:`,
      ...touching.slice(-15).map((l) => `    ${l.text}`),
      `  image and shadow kept in ${dir}`,
      `  reproduce: QDEDUP_SEED=0x${BASE_SEED.toString(16)} QDEDUP_ONLY=${index} node --import tsx --test test/interop/mixed-turns.test.ts`,
    ].join('\n');
    return res;
  };
  try {
    let afterQemu = false;
    for (let turn = 0; turn < TURNS; turn++) {
      const problems: string[] = [];
      const count = rng.int(12, 28);
      if (turn % 2 === 0) {
        // qdedup's turn: the CLI write first or last; the first open after qemu-io must announce a fresh index.
        const cliFirst = rng.chance(0.5);
        const cliTurn = async (expectNotice: boolean) => {
          const op = gen.next();
          if (op.kind === 'read') return cliTurn(expectNotice);
          let args: string[];
          const length = op.kind === 'write' ? op.data.length : op.length;
          if (op.kind === 'zero') args = ['write', '-z', img, String(op.offset), String(length)];
          else if (op.pattern !== undefined) args = ['write', '-P', `0x${op.pattern.toString(16)}`, img, String(op.offset), String(length)];
          else {
            const f = file();
            writeFileSync(f, op.data);
            args = ['write', '-i', f, img, String(op.offset)];
          }
          shadowApply(shadow, op);
          note(turn, 'bin/qdedup', op);
          res.ops++;
          res.cliOps++;
          const r = await qdedupAsync(args);
          if (r.status !== 0) problems.push(`qdedup ${args.join(' ')} exited ${r.status}: ${r.stderr.trim()}`);
          if (r.stdout !== `wrote ${length}/${length} bytes at offset ${op.offset}\n`)
            problems.push(`qdedup ${args.join(' ')}: stdout ${JSON.stringify(r.stdout)}`);
          if (expectNotice) {
            if (!NOTICE.test(r.stderr))
              problems.push(`the first qdedup open after qemu-io (bin/qdedup write) did not announce a fresh index: stderr ${JSON.stringify(r.stderr)}`);
            else res.notices++;
          } else if (/not trusted/.test(r.stderr)) problems.push(`bin/qdedup write dropped a trusted index: ${r.stderr.trim()}`);
        };
        if (cliFirst) await cliTurn(afterQemu);
        let image = await openForWrite(img);
        try {
          const notice = dedupOf(image)?.notice ?? null;
          if (!cliFirst && afterQemu) {
            if (notice === null || !NOTICE.test(notice))
              problems.push(`the first qdedup open after qemu-io (in-process) did not announce a fresh index: ${notice}`);
            else res.notices++;
          } else if (notice !== null) problems.push(`an in-process open dropped a trusted index: ${notice}`);
          for (let i = 0; i < count; i++) {
            const op = gen.next();
            note(turn, 'engine', op);
            res.ops++;
            res.engineOps++;
            if (op.kind === 'read') {
              const got = await image.read(op.offset, op.length);
              const want = shadow.read(op.offset, op.length);
              if (!got.equals(want)) problems.push(`engine ${opText(op)}: first difference at guest offset ${op.offset + firstDiff(got, want)}`);
              continue;
            }
            shadowApply(shadow, op);
            if (op.kind === 'zero') await image.writeZeroes(op.offset, op.length);
            else await image.write(op.offset, op.data);
            const r = rng.float();
            if (r < 0.05) {
              res.hits += dedupOf(image)?.counters.hits ?? 0;
              await image.close();
              image = await openForWrite(img);
              if (dedupOf(image)?.notice) problems.push(`a reopen in the same turn dropped the index: ${dedupOf(image)!.notice}`);
            } else if (r < 0.1) await image.flush();
          }
          res.hits += dedupOf(image)?.counters.hits ?? 0;
          await image.close();
        } catch (err) {
          await image.abandon();
          problems.push(`engine threw: ${(err as Error).stack ?? err}`);
        }
        if (!cliFirst) await cliTurn(false);
        if (!dedupBit(img)) problems.push('after a qdedup turn, autoclear bit 60 is clear');
        // qdedup's own check, deep, with the dedup hook: the fresh index must be sound too.
        const c = await checkImage(img, { extension: (i) => dedupCheckExtension(i, true) });
        if (c.corruptions || c.failure !== undefined)
          problems.push(
            `check --deep after the qdedup turn: ${
              c.failure ??
              c.messages
                .filter((m) => /ERROR/.test(m))
                .slice(0, 3)
                .join(' / ')
            }`,
          );
        afterQemu = false;
      } else {
        // qemu-io's turn: one process, every operation a -c command.
        const commands: string[] = [];
        const writes: { offset: number; length: number }[] = [];
        for (let i = 0; i < count; i++) {
          const op = gen.next();
          note(turn, 'qemu-io', op);
          res.ops++;
          res.qemuOps++;
          if (op.kind === 'read') {
            commands.push(qemuVerify(op, shadow) ?? qemuCommand(op, file));
            continue;
          }
          shadowApply(shadow, op);
          writes.push({ offset: op.offset, length: op.kind === 'write' ? op.data.length : op.length });
          commands.push(qemuCommand(op, file));
        }
        res.sharedOverwritten += await sharedClusters(img, writes);
        const p = await qemuIoBatch(img, commands);
        if (p) problems.push(p);
        if (dedupBit(img)) problems.push('qemu-io left autoclear bit 60 set');
        afterQemu = true;
      }
      const cc = await compareAndCheck(img, shadow.path);
      if (cc.compare !== 0) problems.push(`qemu-img compare: ${cc.compareOutput.split('\n').slice(0, 3).join(' | ')}`);
      if (cc.check !== 0)
        problems.push(
          `qemu-img check exited ${cc.check}: ${
            cc.checkOutput
              .split('\n')
              .filter((l) => /ERROR|error/.test(l))
              .slice(0, 4)
              .join(' | ') || cc.checkOutput.slice(0, 300)
          }`,
        );
      if (problems.length) return fail(turn, problems);
    }
  } finally {
    shadow.close();
  }
  return res;
}

// ------------------------------------------------------------------ the test

const ROOT_DIR = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'qdedup-mixed-'));
let keep = false;
process.on('exit', () => {
  if (!keep) rmSync(ROOT_DIR, { recursive: true, force: true });
});
const totals = { sequences: 0, turns: 0, ops: 0, qemuOps: 0, engineOps: 0, cliOps: 0, hits: 0, shared: 0, notices: 0, mismatches: 0 };
const started = Date.now();

describe('mixed turns: qemu-io and qdedup on the same dedup image', { skip: NO_QEMU, concurrency: 2 }, () => {
  after(() => {
    if (totals.sequences === 0) return;
    const secs = ((Date.now() - started) / 1000).toFixed(1);
    console.log(
      `mixed turns: ${totals.sequences} sequences × ${TURNS} turns (${totals.turns} turns), ${totals.ops} operations (${totals.qemuOps} qemu-io, ${totals.engineOps} in-process, ${totals.cliOps} bin/qdedup), ${totals.hits} dedup links, ${totals.shared} shared clusters overwritten by qemu-io, ${totals.notices} fresh-index notices, ${totals.mismatches} failures (base seed 0x${BASE_SEED.toString(16)}, ${secs} s)`,
    );
  });

  for (let index = 0; index < SEQUENCES; index++) {
    const g = GEOMETRIES[index % GEOMETRIES.length];
    const seed = deriveSeed(BASE_SEED, `mixed-${index}`);
    it(`sequence ${index}: ${g.label}, ${TURNS} turns (seed 0x${seed.toString(16)})`, { skip: ONLY !== undefined && !ONLY.includes(index) }, async () => {
      const dir = join(ROOT_DIR, `s${index}`);
      mkdirSync(dir);
      const res = await runSequence(index, seed, dir);
      totals.sequences++;
      totals.turns += res.failure ? 0 : TURNS;
      totals.ops += res.ops;
      totals.qemuOps += res.qemuOps;
      totals.engineOps += res.engineOps;
      totals.cliOps += res.cliOps;
      totals.hits += res.hits;
      totals.shared += res.sharedOverwritten;
      totals.notices += res.notices;
      if (res.failure) {
        totals.mismatches++;
        keep = true;
      } else {
        rmSync(dir, { recursive: true, force: true });
      }
      if (res.failure) assert.fail(res.failure);
      // Each sequence links duplicates, and qemu-io overwrites clusters that are shared.
      assert.ok(res.hits > 0, 'qdedup linked no duplicate');
      assert.ok(res.sharedOverwritten > 0, 'qemu-io overwrote no shared cluster');
      assert.equal(res.notices, Math.floor(TURNS / 2) - (TURNS % 2 === 0 ? 1 : 0), 'one fresh-index notice per qdedup turn after a qemu-io turn');
    });
  }
});
