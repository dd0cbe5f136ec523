// Offline deduplication (src/dedup/offline.ts) under power loss at every operation: a plain
// image with duplicate, zero-filled and unique clusters (and a compressed-free v3 layout as
// QEMU makes it) is deduplicated in place on a FaultyFile that loses power at operation k,
// for every k, keeping none, all, a random subset or torn sectors of the unsynced writes
// (punched holes included). Every resulting disk must read back the same guest data (offline
// dedup never changes it), check with no corruption, and open for writing again. The run
// that completes must leave each distinct cluster stored once. The same again on an image
// written compressed (as `qemu-img convert -c` writes), which the pass keeps compressed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { createImage, openForWrite, dedupOf } from '../../src/dedup/open.ts';
import { checkOpenImage } from '../../src/image/check-image.ts';
import { CrashError, FaultyFile, type LossMode } from '../doubles/faulty-file.ts';
import { MemFile } from '../doubles/mem-file.ts';
import { dedupInPlace } from '../../src/dedup/offline.ts';
import { defaultDedupSettings } from '../../src/dedup/dedup.ts';
import { tempDir } from '../helpers.ts';

const CS = 4096;
const SIZE = 96 * CS;
const MODES: LossMode[] = ['drop-unsynced', 'keep-unsynced', 'random-subset', 'torn'];

/** Guest data: four patterns repeated, a zero-filled stretch written as data, unique clusters. */
function guestData(): Buffer {
  const b = Buffer.alloc(SIZE);
  for (let c = 0; c < 64; c++) b.fill(1 + (c % 4), c * CS, (c + 1) * CS);
  for (let c = 72; c < 96; c++) for (let i = 0; i < CS; i += 4) b.writeUInt32LE((c * 7919 + i) >>> 0, c * CS + i);
  return b; // clusters 64–71 stay zero but are written as data below
}

async function readAll(bytes: Buffer, path: string): Promise<{ data: Buffer; corruptions: number; messages: string[] }> {
  const image = await Image.open(path, { file: new MemFile(path, bytes) });
  try {
    const data = await image.read(0, image.size);
    const r = await checkOpenImage({ path, file: image.file, header: image.header, l1: image.l1, writable: false }, { onMessage: () => {} });
    return { data, corruptions: r.corruptions, messages: r.messages };
  } finally {
    await image.close();
  }
}

for (const compressed of [false, true]) {
  test(`offline dedup${compressed ? ' of a compressed image' : ''}: power lost at every operation leaves the same guest data and no corruption`, async () => {
    const dir = tempDir('qdedup-offline-crash-');
    const path = join(dir, 'plain.qcow2');
    await createImage(path, { size: SIZE, clusterBits: 12, version: 3, refcountOrder: 4, lazyRefcounts: false, force: true });
    const data = guestData();
    const plain = await openForWrite(path, { compress: compressed });
    // A plain image: every cluster written as data, zeros too; compressed, zeros are zero clusters (not held).
    await plain.write(0, data);
    await plain.close();
    const base = readFileSync(path);
    const settings = () => defaultDedupSettings(SIZE, CS);
    const chunkBytes = 8 * CS; // twelve chunks: several in flight at once

    // The full run: every distinct cluster stored once.
    const probe = new FaultyFile(path, base);
    const done = await dedupInPlace(path, { file: probe, settings, chunkBytes });
    assert.equal(done.enabled, true);
    assert.equal(done.compressed, compressed);
    assert.equal(done.clusters, compressed ? 88 : 96);
    assert.equal(done.zero, compressed ? 0 : 8);
    assert.equal(done.stored, 4 + 24);
    assert.equal(done.linked, 60);
    const after = await readAll(probe.liveBytes(), path);
    assert.ok(after.data.equals(data));
    assert.equal(after.corruptions, 0, after.messages.join('; '));
    const totalOps = probe.ops;

    let states = 0;
    for (let k = 0; k < totalOps; k++) {
      const modes = k % 2 === 0 ? MODES : [MODES[k % 4]];
      for (const mode of modes) {
        const file = new FaultyFile(path, base, { crashAt: k });
        try {
          await dedupInPlace(path, { file, settings, chunkBytes });
        } catch (err) {
          if (!(err instanceof CrashError)) throw err;
        }
        const bytes = await file.afterPowerLoss(mode, k * 13 + 5);
        const label = `crash at op ${k}/${totalOps}, ${mode}`;
        const state = await readAll(bytes, path);
        assert.ok(state.data.equals(data), `${label}: guest data changed`);
        assert.equal(state.corruptions, 0, `${label}: ${state.messages.join('; ')}`);
        // It opens for writing again, and a second offline pass completes on it.
        const again = new MemFile(path, Buffer.from(bytes));
        const rerun = await dedupInPlace(path, { file: again, settings });
        assert.equal(rerun.interrupted, false);
        const reopened = await openForWrite(path, { file: again });
        assert.equal(dedupOf(reopened)?.notice ?? null, null, `${label}: the index after a clean second pass is trusted`);
        assert.ok((await reopened.read(0, SIZE)).equals(data), `${label}: after the second pass`);
        await reopened.abandon();
        states++;
      }
    }
    console.log(`# offline dedup${compressed ? ' (compressed)' : ''} crash states verified: ${states} (${totalOps} operations)`);
    assert.ok(totalOps >= 25 && states >= 2 * totalOps, `${states} states over ${totalOps} operations`);
  });
}
