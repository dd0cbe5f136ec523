// Malformed-image fuzzing in process (issue 4 item 5; BRIEF I4). See fuzz-lib.ts for
// what each mutant goes through and what is asserted.
//
//   npm test -- fuzz                          2,000 mutants (seeds 1…2000)
//   QDEDUP_FUZZ=50000 npm test -- fuzz        soak: seeds 1…50000
//   QDEDUP_FUZZ_FROM=1000000 QDEDUP_FUZZ=…    soak on other seeds
//   QDEDUP_FUZZ_SEED=1234 npm test -- fuzz    reproduce one mutant, printing its mutations
//
// Seeds that once failed are kept in REGRESSIONS below (and run on every test run).

import { before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QdedupError } from '../../src/errors.ts';
import { Image } from '../../src/image/image.ts';
import { createImage } from '../../src/image/create.ts';
import { type Base, describe as describeMutant, loadBases, makeMutant, mapImage, runMutant } from './fuzz-lib.ts';

const COUNT = Number(process.env.QDEDUP_FUZZ ?? 2000);
const FROM = Number(process.env.QDEDUP_FUZZ_FROM ?? 1);
const ONE = process.env.QDEDUP_FUZZ_SEED !== undefined ? Number(process.env.QDEDUP_FUZZ_SEED) : undefined;

/** Seeds that found a bug, with what it was (kept as regression cases). */
const REGRESSIONS: { seed: number; bug: string }[] = [
  { seed: 129, bug: 'L2 entry with host offset 2^55: I/O at a position past 2^53' },
  { seed: 195, bug: 'L1 entry 0xffff…: L2 table read at a position past 2^53' },
];

let bases: Base[];
const layouts = new Map<Base, ReturnType<typeof mapImage>>();

describe('malformed-image fuzzing (in process)', () => {
  before(async () => {
    bases = await loadBases();
  });

  it('every base image is valid and checks clean', async () => {
    for (const b of bases) {
      const out = await runMutant({ seed: 0, base: b, bytes: Buffer.from(b.bytes), steps: [], writeAt: 0, zeroAt: 4096 });
      assert.deepEqual(out.failures, [], b.name);
      assert.ok(out.verdict === 'clean' || out.verdict === 'leaks', `${b.name}: ${out.verdict}`);
    }
  });

  // Seed 129 (an L2 entry set to 2^55) showed the engine doing I/O at positions past 2^53.
  // On a real file Node takes such a position for "the current position" (0 for us), so a
  // guest write through an L2 entry with COPIED set and host offset 2^55 overwrote the
  // header, and reads returned the header as guest data. NodeFile now reads zeros there
  // and refuses the write with EFBIG. Checked on a real file: MemFile never had the bug.
  it('regression: seed 129: offsets of 2^55 on a real file neither read nor overwrite the header', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qdedup-fuzz-'));
    try {
      const p = join(dir, 'a.qcow2');
      await createImage(p, { size: 1 << 20, clusterBits: 16, version: 3, refcountOrder: 4, lazyRefcounts: false, force: true });
      const img = await Image.open(p, { writable: true });
      await img.write(0, Buffer.alloc(65536, 0xab));
      await img.close();
      const valid = readFileSync(p);
      const l2 = Number(valid.readBigUInt64BE(0x30000) & 0x00ff_ffff_ffff_fe00n);
      const patches: [string, number][] = [['L2 entry 0', l2], ['refcount table entry 0', 0x10000]];
      for (const [what, at] of patches) {
        const bytes = Buffer.from(valid);
        bytes.writeBigUInt64BE((1n << 63n) | (1n << 55n), at); // (COPIED,) offset 2^55
        writeFileSync(p, bytes);
        const ro = await Image.open(p);
        const got = await ro.read(0, 65536);
        await ro.close();
        if (what.startsWith('L2')) assert.ok(got.equals(Buffer.alloc(65536)), `${what}: past EOF reads as zeros, not the header`);
        try {
          const rw = await Image.open(p, { writable: true });
          await rw.write(65536, Buffer.alloc(65536, 0xcd)).then(() => rw.close(), async (err) => {
            await rw.abandon();
            throw err;
          });
        } catch (err) {
          assert.ok(err instanceof QdedupError, `${what}: ${err}`);
        }
        assert.ok(readFileSync(p).subarray(0, 4096).equals(bytes.subarray(0, 4096)), `${what}: header unchanged`);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  for (const r of REGRESSIONS) {
    it(`regression: seed ${r.seed}: ${r.bug}`, async () => {
      const m = makeMutant(r.seed, bases, layouts);
      const out = await runMutant(m);
      assert.deepEqual(out.failures, [], describeMutant(m, out));
    });
  }

  it(ONE !== undefined ? `mutant seed ${ONE}` : `${COUNT} mutants from seed ${FROM}`, async () => {
    const seeds = ONE !== undefined ? [ONE] : Array.from({ length: COUNT }, (_, i) => FROM + i);
    const failed: string[] = [];
    const verdicts = new Map<string, number>();
    const started = Date.now();
    let slowest = { seed: 0, ms: 0 };
    for (const seed of seeds) {
      const m = makeMutant(seed, bases, layouts);
      const t = Date.now();
      const out = await runMutant(m);
      const ms = Date.now() - t;
      if (ms > slowest.ms) slowest = { seed, ms };
      verdicts.set(out.verdict, (verdicts.get(out.verdict) ?? 0) + 1);
      if (ONE !== undefined) console.log(describeMutant(m, out) + `\n  verdict: ${out.verdict}, ${ms} ms`);
      if (out.failures.length) {
        failed.push(describeMutant(m, out));
        if (failed.length >= 20) break;
      }
    }
    const secs = ((Date.now() - started) / 1000).toFixed(1);
    console.log(`fuzzed images: ${seeds.length} in ${secs} s (${[...verdicts].map(([k, v]) => `${k} ${v}`).join(', ')}; slowest seed ${slowest.seed}: ${slowest.ms} ms)`);
    assert.equal(failed.length, 0, `${failed.length} failing mutants:\n${failed.join('\n')}`);
  });
});
