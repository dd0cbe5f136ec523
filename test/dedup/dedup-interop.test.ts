// Random dedup workloads checked against the real QEMU: heavy repetition,
// unaligned writes, rewrites, zero writes, over several open/close sessions, with small
// stores that freeze and evict. After each workload: `qemu-img compare` against a raw
// shadow says identical, `qemu-io read -P` spot checks pass, `qemu-img check` exits 0 with
// "No errors were found" (the holder snapshot holds the dedup store's clusters too).
// QDEDUP_SOAK_SCALE=N runs N times as many workloads.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { createImage } from '../../src/dedup/open.ts';
import type { SupportedHashAlgorithm } from '../../src/dedup/hasher.ts';
import { NO_QEMU } from '../helpers.ts';
import { Rng, Shadow, checkImage, compareRaw, runAsync, testFolders } from '../interop/differential-lib.ts';
import { judgeStore } from '../../src/dedup/judge-store.ts';
import { openForWrite, dedupOf } from '../../src/dedup/open.ts';

const SCALE = Number(process.env.QDEDUP_SOAK_SCALE ?? 1);
const WORKLOADS = 100 * SCALE;
const { scratch, seedOf } = testFolders('qdedup-dedup-interop-', 0xd3d0);
const HASHES: SupportedHashAlgorithm[] = ['sha256', 'sha3-256', 'blake3'];

interface Workload {
  clusterBits: number;
  size: number;
  hash: SupportedHashAlgorithm;
  verify: boolean;
  order: number;
  maxIncarnations: number;
  sessions: number;
  opsPerSession: number;
}

function workloadFor(i: number, rng: Rng): Workload {
  const clusterBits = [12, 12, 12, 9, 16][i % 5];
  return {
    clusterBits,
    size: rng.int(2, 12) * (1 << 20) + (rng.chance(0.3) ? rng.int(1, 1000) * 512 : 0),
    hash: HASHES[i % 3],
    verify: rng.chance(0.3),
    order: rng.chance(0.5) ? rng.int(1, 4) : rng.int(5, 9),
    maxIncarnations: rng.chance(0.5) ? rng.int(1, 3) : 0,
    sessions: rng.int(1, 4),
    opsPerSession: rng.int(4, 14),
  };
}

/** Content made of a few repeating cluster patterns, some unique clusters and some zero ones. */
function repetitive(rng: Rng, length: number, clusterSize: number, palette: Buffer[]): Buffer {
  const out = Buffer.alloc(length);
  for (let p = 0; p < length; p += clusterSize) {
    const r = rng.float();
    const src = r < 0.65 ? palette[rng.int(0, palette.length - 1)] : r < 0.8 ? Buffer.alloc(clusterSize) : rng.bytes(clusterSize);
    src.copy(out, p, 0, Math.min(clusterSize, length - p));
  }
  return out;
}

describe('dedup workloads against qemu-img', { skip: NO_QEMU, concurrency: 2 }, () => {
  for (let i = 0; i < WORKLOADS; i++) {
    const seed = seedOf(`w${i}`);
    it(`workload ${i} (seed 0x${seed.toString(16)})`, async () => {
      const rng = new Rng(seed);
      const w = workloadFor(i, rng);
      const cs = 2 ** w.clusterBits;
      const dir = scratch();
      const img = join(dir, 'img.qcow2');
      const shadowBuf = Buffer.alloc(w.size);
      await createImage(img, {
        size: w.size,
        clusterBits: w.clusterBits,
        version: 3,
        refcountOrder: 4,
        lazyRefcounts: false,
        force: false,
        dedup: { algorithm: w.hash, verify: w.verify, maxIncarnations: w.maxIncarnations, order: w.order, journalBlockSize: rng.chance(0.5) ? 512 : 4096 },
      });
      const palette = Array.from({ length: rng.int(2, 8) }, () => rng.bytes(cs));
      const context = `seed 0x${seed.toString(16)} ${JSON.stringify(w)}`;
      for (let s = 0; s < w.sessions; s++) {
        const image = await openForWrite(img);
        assert.equal(dedupOf(image)?.notice, null, `${context}: a cleanly closed store is trusted`);
        for (let k = 0; k < w.opsPerSession; k++) {
          const aligned = rng.chance(0.5);
          const len = aligned ? rng.int(1, 64) * cs : rng.int(1, 48 * cs);
          const off = Math.min(w.size - len, aligned ? rng.int(0, w.size / cs - 1) * cs : rng.int(0, w.size - 1));
          if (off < 0) continue;
          if (rng.chance(0.15)) {
            await image.writeZeroes(off, len);
            shadowBuf.fill(0, off, off + len);
          } else {
            const data = repetitive(rng, len, cs, palette);
            await image.write(off, data);
            data.copy(shadowBuf, off);
          }
          if (rng.chance(0.1)) await image.flush();
        }
        // qdedup reads back what it wrote, before and after the close.
        assert.ok((await image.read(0, w.size)).equals(shadowBuf), `${context}: read back in session ${s}`);
        await image.close();
      }
      const shadow = new Shadow(join(dir, 'shadow.raw'), w.size, shadowBuf);
      shadow.close();
      const cmp = await compareRaw(img, shadow.path);
      assert.equal(cmp.status, 0, `${context}: qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
      // Spot checks through qemu-io: a few clusters, read with the pattern they hold.
      const cmds: string[] = [];
      for (let k = 0; k < 4; k++) {
        const at = rng.int(0, w.size / cs - 1) * cs;
        const byte = shadowBuf[at];
        if (shadowBuf.subarray(at, at + 512).every((b) => b === byte)) cmds.push('-c', `read -P ${byte} ${at} 512`);
      }
      if (cmds.length) {
        const io = await runAsync('qemu-io', ['-f', 'qcow2', '-r', ...cmds, img]);
        assert.equal(io.status, 0, `${context}: qemu-io ${cmds.join(' ')}: ${io.stdout}${io.stderr}`);
        assert.doesNotMatch(io.stdout, /Pattern verification failed/, context);
      }
      const chk = await checkImage(img);
      assert.equal(chk.json?.corruptions ?? 0, 0, `${context}: ${chk.stderr}`);
      const ro = await Image.open(img);
      const seen = await judgeStore(ro, { store: false });
      await ro.close();
      assert.equal(seen.trusted, true, `${context}: ${seen.reason}`);
      assert.ok(seen.metadataClusters > 0, context);
      assert.equal(chk.json?.leaks ?? 0, 0, `${context}: no leak, the store's clusters are held\n${chk.stderr}`);
      assert.equal(chk.status, 0, `${context}: qemu-img check exit ${chk.status}\n${chk.stderr}`);
    });
  }
});
