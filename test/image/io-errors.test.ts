// I/O errors at every operation index (I3, docs/DESIGN.md, I4): each write and sync of a workload
// fails once, then persistently, with EIO and with ENOSPC. The step fails with a one-line
// IoError naming the file; the image still opens, checks without corruption, and every
// acknowledged write reads back.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { createImage } from '../../src/image/create.ts';
import { checkOpenImage } from '../../src/image/check-image.ts';
import { FaultyFile } from '../doubles/faulty-file.ts';
import { MemFile } from '../doubles/mem-file.ts';
import { IoError } from '../../src/errors.ts';
import { tempDir } from '../helpers.ts';
import { openForWrite } from '../../src/dedup/open.ts';

const SIZE = 1024 * 1024;
/** QDEDUP_SOAK_SCALE=N (npm run soak): N workloads; round r > 0 shifts every offset by 1237·r bytes and cycles the cluster size (4k, 512, 64k). */
const ROUNDS = Math.max(1, Math.round(Number(process.env.QDEDUP_SOAK_SCALE ?? 1)));
const BASE_STEPS: [number, number, number][][] = [
  [
    [0, 5000, 0x11],
    [70000, 600, 0x12],
  ],
  [
    [3000, 9000, 0x21],
    [500000, 4096, 0x22],
  ],
  [[65536 * 3 + 17, 70000, 0x31]],
  [
    [100, 50, 0x41],
    [900000, 100000, 0x42],
  ],
];

const roundSteps = (r: number) => BASE_STEPS.map((step) => step.map(([o, l, b]): [number, number, number] => [Math.min(o + 1237 * r, SIZE - l), l, b]));

async function runSteps(path: string, file: FaultyFile, STEPS: [number, number, number][][]): Promise<{ acked: number; error: unknown }> {
  let acked = 0;
  for (const step of STEPS) {
    let image: Image | undefined;
    try {
      image = await openForWrite(path, { file });
      for (const [offset, length, byte] of step) await image.write(offset, Buffer.alloc(length, byte));
      await image.close();
      acked++;
    } catch (error) {
      await image?.abandon();
      return { acked, error };
    }
  }
  return { acked, error: null };
}

test('every operation failing with EIO or ENOSPC, once and persistently', async () => {
  let cases = 0;
  let ops = 0;
  for (let round = 0; round < ROUNDS; round++) {
    const STEPS = roundSteps(round);
    const path = join(tempDir('qdedup-ioerr-'), 'base.qcow2');
    await createImage(path, { size: SIZE, clusterBits: [12, 9, 16][round % 3], version: 3, refcountOrder: 4, lazyRefcounts: false, force: true });
    const base = readFileSync(path);
    const shadows = [Buffer.alloc(SIZE)];
    for (const step of STEPS) {
      const next = Buffer.from(shadows[shadows.length - 1]);
      for (const [offset, length, byte] of step) next.fill(byte, offset, offset + length);
      shadows.push(next);
    }
    const probe = new FaultyFile(path, base);
    assert.equal((await runSteps(path, probe, STEPS)).acked, STEPS.length);
    ops += probe.ops;
    for (let k = 0; k < probe.ops; k++) {
      for (const failCode of ['EIO', 'ENOSPC'] as const) {
        for (const persistent of [false, true]) {
          const label = `round ${round}, op ${k}/${probe.ops} ${failCode}${persistent ? ' persistent' : ''}`;
          const file = new FaultyFile(path, base, { failAt: k, failCode, persistent });
          const { acked, error } = await runSteps(path, file, STEPS);
          if (!persistent && error === null) {
            cases++;
            continue;
          } // a failed op retried later is fine only if the run still ended well
          assert.ok(error instanceof IoError, `${label}: expected an IoError, got ${error}`);
          assert.equal((error as IoError).code, failCode, label);
          assert.ok(!String((error as Error).message).includes('\n'), `${label}: one line`);
          const image = await Image.open(path, { file: new MemFile(path, file.liveBytes()) });
          const data = await image.read(0, SIZE);
          for (let s = 0; s < SIZE; s += 512) {
            const got = data.subarray(s, s + 512);
            assert.ok(got.equals(shadows[acked].subarray(s, s + 512)) || got.equals(shadows[acked + 1].subarray(s, s + 512)), `${label}: sector ${s}`);
          }
          const result = await checkOpenImage({ path, file: image.file, header: image.header, l1: image.l1, writable: false }, { onMessage: () => {} });
          assert.equal(result.corruptions, 0, `${label}: ${result.messages.join('; ')}`);
          await image.close();
          cases++;
        }
      }
    }
  }
  console.log(`# I/O error cases verified: ${cases} (${ops} operations x EIO/ENOSPC x once/persistent${ROUNDS > 1 ? `, ${ROUNDS} workloads` : ''})`);
});
