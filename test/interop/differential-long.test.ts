// Long differential sequences against qemu-io: for each geometry, one
// long seeded sequence of operations (write -P, write from a file or stdin, write -z,
// rewrites of earlier ranges, read-back verification) goes, batch by batch, to an image
// written by qdedup, to its twin written by qemu-io, and to a raw shadow file; after every
// batch `qemu-img compare` must find both images equal to the shadow and `qemu-img check`
// both clean. The qdedup side runs in-process (the Image engine) except for one write and
// one read per batch through bin/qdedup; qemu-io runs each batch as one process.
//
//   npm test -- differential-long                         ≥ 20,000 operations (6 geometries)
//   QDEDUP_SOAK_SCALE=10 npm test -- differential-long    10× as many (npm run soak -- 10)
//   QDEDUP_SEED=<base seed> QDEDUP_ONLY=<label>[,…] …      rerun one failing sequence
//   QDEDUP_LONG_BATCH=<n>, QDEDUP_LONG_TIMING=1            batch size; print each batch's phase times
//   QDEDUP_LONG_DIR=<folder>                               scratch folder (default /dev/shm)
//
// A failure prints the sequence's seed, the failing batch, the last operations that touched
// the first differing byte, and the command that reruns it.

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NO_QEMU } from '../helpers.ts';
import { deriveSeed } from './differential-lib.ts';
import { configText, runLongSequence, type LongConfig } from './differential-long-lib.ts';

const BASE_SEED = process.env.QDEDUP_SEED ? Number(process.env.QDEDUP_SEED) >>> 0 : 0x10c6_d1ff;
const SCALE = Math.max(0, Number(process.env.QDEDUP_SOAK_SCALE ?? 1));
/** Comma-separated labels of the sequences to run (default: all). */
const ONLY = process.env.QDEDUP_ONLY?.split(',');
/** Operations of the fast tier, over all geometries. */
const FAST_TIER_OPS = 20_480;
/** Operations per batch (qemu-io process, bin/qdedup write + read, qemu-img compare). */
const BATCH = Number(process.env.QDEDUP_LONG_BATCH ?? 512);

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** Geometries: 512 B, 4 KiB and 64 KiB clusters, each v3 and v2, every disk spanning several L2 tables. */
const CONFIGS: LongConfig[] = [
  { label: '512-v3', clusterBits: 9, compat: '1.1', refcountBits: 16, size: 3 * MiB + 7 * 512, wide: false },
  { label: '512-v2', clusterBits: 9, compat: '0.10', refcountBits: 16, size: 1 * MiB, wide: false },
  { label: '4k-v3', clusterBits: 12, compat: '1.1', refcountBits: 2, size: 8 * MiB + 3 * 512, wide: false },
  { label: '4k-v2', clusterBits: 12, compat: '0.10', refcountBits: 16, size: 6 * MiB, wide: false },
  { label: '64k-v3', clusterBits: 16, compat: '1.1', refcountBits: 64, size: GiB + 192 * KiB + 512, wide: true },
  { label: '64k-v2', clusterBits: 16, compat: '0.10', refcountBits: 16, size: 600 * MiB, wide: true },
];

const perConfig = Math.ceil((FAST_TIER_OPS * SCALE) / CONFIGS.length);
const seedOf = (label: string) => deriveSeed(BASE_SEED, label);
/**
 * Scratch folders in memory (/dev/shm) when there is one: the test is about contents, and
 * fsync on a busy disk would dominate its time. QDEDUP_LONG_DIR overrides. A failing run
 * keeps its folder (the report names it); a passing one removes it.
 */
const ROOT_DIR = mkdtempSync(join(process.env.QDEDUP_LONG_DIR ?? (existsSync('/dev/shm') ? '/dev/shm' : tmpdir()), 'qdedup-difflong-'));
let keep = false;
process.on('exit', () => {
  if (!keep) rmSync(ROOT_DIR, { recursive: true, force: true });
});
const totals = { ops: 0, cliOps: 0, batches: 0, mismatches: 0, sequences: 0 };
const started = Date.now();

describe('long differential sequences: qdedup vs qemu-io vs raw shadow', { skip: NO_QEMU, concurrency: 2 }, () => {
  after(() => {
    if (totals.sequences === 0) return;
    const secs = ((Date.now() - started) / 1000).toFixed(1);
    console.log(
      `differential: ${totals.ops} operations, ${totals.mismatches} mismatches (${totals.sequences} sequences, ${totals.batches} batches, ${totals.cliOps} through bin/qdedup; base seed 0x${BASE_SEED.toString(16)}, scale ${SCALE}, ${secs} s)`,
    );
  });

  for (const cfg of CONFIGS) {
    const seed = seedOf(cfg.label);
    it(
      `${cfg.label}: ${configText(cfg)}, ${perConfig} operations (seed 0x${seed.toString(16)})`,
      { skip: ONLY !== undefined && !ONLY.includes(cfg.label) },
      async () => {
        const dir = join(ROOT_DIR, cfg.label);
        mkdirSync(dir);
        const res = await runLongSequence({
          cfg,
          seed,
          ops: perConfig,
          batchSize: BATCH,
          dir,
          reproduce: `QDEDUP_SEED=0x${BASE_SEED.toString(16)} QDEDUP_ONLY=${cfg.label} QDEDUP_SOAK_SCALE=${SCALE} node --import tsx --test test/interop/differential-long.test.ts`,
        });
        totals.ops += res.ops;
        totals.cliOps += res.cliOps;
        totals.batches += res.batches;
        totals.mismatches += res.mismatches;
        totals.sequences++;
        if (res.failure) keep = true;
        else rmSync(dir, { recursive: true, force: true });
        assert.equal(res.failure, undefined, res.failure);
        assert.ok(res.ops >= perConfig, `${res.ops} operations`);
      },
    );
  }
});
