// Dedup images in the hands of other programs and of `kill -9`,
// through the real CLI and the real QEMU:
// - a foreign writer (qemu-io, or `qemu-img check -r leaks`) clears the dedup bit; qdedup's
//   next write says the index is not trusted, builds a fresh store without writing a byte
//   of the old store's clusters, and every byte reads back right;
// - `kill -9` at random moments of a long `qdedup write -i`: every write that exited 0
//   before reads back right, the index is dropped on the next write when the kill left it
//   dirty, and `qemu-img check` never reports corruption.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, openSync, readFileSync, readSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { dedupExtensionOf } from '../../src/dedup/judge-store.ts';
import { decodeDedupConfig } from '../../src/format/dedup-ext.ts';
import { incarnationLayout } from '../../src/format/incarnation.ts';
import { BIN, NO_QEMU, qdedup, qemuCheck, run, tempDir } from '../helpers.ts';
import { Rng } from '../interop/differential-lib.ts';

const CS = 4096;

/** Data in which about half of the 4 KiB blocks repeat earlier ones. */
function halfDuplicate(rng: Rng, clusters: number): Buffer {
  const out = Buffer.alloc(clusters * CS);
  for (let c = 0; c < clusters; c++) {
    if (c > 0 && rng.chance(0.5)) out.copy(out, c * CS, rng.int(0, c - 1) * CS, rng.int(0, c - 1) * CS + CS);
    else rng.bytes(CS).copy(out, c * CS);
  }
  return out;
}

/** Host byte ranges of the dedup store's own clusters (configuration area, journals, incarnations, limbo). */
async function storeRanges(path: string): Promise<[number, number][]> {
  const image = await Image.open(path, { backing: false });
  try {
    const ext = dedupExtensionOf(image)!;
    const config = decodeDedupConfig(await image.file.read(ext.configOffset, ext.configBytes), ext.configOffset, image.clusterSize);
    const ranges: [number, number][] = [[ext.configOffset, ext.configBytes]];
    for (const j of config.journals) ranges.push([j.offset, j.blocks * ext.journalBlockSize]);
    const incarnationBytes = incarnationLayout(ext.order, image.clusterSize).clusters * image.clusterSize;
    for (const i of config.incarnations) ranges.push([i.offset, incarnationBytes]);
    for (const l of config.limbo) ranges.push([l.offset, l.clusters * image.clusterSize]);
    return ranges;
  } finally {
    await image.close();
  }
}

function bytesOf(file: string, ranges: [number, number][]): Buffer {
  const all = readFileSync(file);
  return Buffer.concat(ranges.map(([o, n]) => all.subarray(o, o + n)));
}

/** The dedup extension's dirty flag, read straight from the header bytes. */
function dirtyOnDisk(img: string): boolean {
  const head = Buffer.alloc(4096);
  const fd = openSync(img, 'r');
  readSync(fd, head, 0, head.length, 0);
  closeSync(fd);
  const at = head.indexOf(Buffer.from('cd8e819b', 'hex'));
  return at >= 0 && (head[at + 8 + 2] & 1) === 1;
}

function compareWithShadow(img: string, shadow: Buffer, dir: string, label: string): void {
  const raw = join(dir, 'shadow.raw');
  writeFileSync(raw, shadow);
  const r = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, raw]);
  assert.equal(r.status, 0, `${label}: qemu-img compare: ${r.stdout}${r.stderr}`);
}

describe('foreign writers', { skip: NO_QEMU }, () => {
  for (const foreign of ['qemu-io write', 'qemu-img check -r leaks'] as const) {
    it(`after ${foreign}, qdedup drops the old store without touching it and builds a fresh one`, () => {
      const dir = tempDir('qdedup-foreign-');
      const img = join(dir, 'img.qcow2');
      const size = 8 << 20;
      assert.equal(qdedup(['create', '-q', '-o', 'dedup_order=3', img, String(size)]).status, 0);
      const rng = new Rng(foreign.length);
      const shadow = Buffer.alloc(size);
      const data = halfDuplicate(rng, 256);
      writeFileSync(join(dir, 'data.bin'), data);
      for (const at of [0, 2 << 20]) {
        const w = qdedup(['write', '-q', '-i', join(dir, 'data.bin'), img, String(at)]);
        assert.equal(w.status, 0, w.stderr);
        data.copy(shadow, at);
      }
      return (async () => {
        const old = await storeRanges(img);
        if (foreign === 'qemu-io write') {
          const r = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 1M 64k', '-c', 'write -P 0x44 6M 8k', img]);
          assert.equal(r.status, 0, r.stderr);
          shadow.fill(0x33, 1 << 20, (1 << 20) + 65536);
          shadow.fill(0x44, 6 << 20, (6 << 20) + 8192);
        } else {
          const r = run('qemu-img', ['check', '-q', '-r', 'leaks', '-f', 'qcow2', img]);
          assert.equal(r.status, 0, r.stderr);
        }
        const header = readFileSync(img).readBigUInt64BE(88);
        assert.equal(header & (1n << 60n), 0n, 'the foreign writer cleared the dedup bit');
        const oldBytes = bytesOf(img, old);
        // Duplicates of the data already there, and new data.
        const w = qdedup(['write', '-i', join(dir, 'data.bin'), img, String(4 << 20)]);
        assert.equal(w.status, 0, w.stderr);
        assert.match(w.stderr, /dedup index not trusted: dedup autoclear bit 60 is clear \(another program opened the image for writing/);
        data.copy(shadow, 4 << 20);
        if (foreign === 'qemu-io write') {
          // The old store's clusters still count as used (leaked): never written, and the fresh store is elsewhere.
          assert.ok(bytesOf(img, old).equals(oldBytes), "the old store's clusters were not written");
          const fresh = await storeRanges(img);
          assert.ok(
            fresh.every(([o]) => !old.some(([p, n]) => o >= p && o < p + n)),
            'the fresh store is elsewhere',
          );
        }
        compareWithShadow(img, shadow, dir, foreign);
        const chk = qemuCheck(img);
        assert.equal(chk.json?.corruptions ?? 0, 0, chk.stderr);
        assert.ok(chk.status === 0 || chk.status === 3, chk.stderr);
        // The next write trusts the fresh store and finds the copies it indexed.
        const again = qdedup(['write', '-i', join(dir, 'data.bin'), img, String(6 << 20)]);
        assert.equal(again.status, 0, again.stderr);
        assert.doesNotMatch(again.stderr, /not trusted/);
        data.copy(shadow, 6 << 20);
        compareWithShadow(img, shadow, dir, `${foreign}, then a trusted write`);
        assert.equal(qemuCheck(img).json?.corruptions ?? 0, 0);
      })();
    });
  }
});

describe('kill -9 during a long write', { skip: NO_QEMU }, () => {
  it('20 kills: earlier writes read back right, the index is dropped, qemu-img check finds no corruption', async () => {
    const dir = tempDir('qdedup-kill-');
    const rng = new Rng(0x9e11);
    const size = 128 << 20;
    const input = join(dir, 'long.bin');
    writeFileSync(input, halfDuplicate(rng, (48 << 20) / CS));
    let killedMidway = 0;
    let droppedIndex = 0;
    // How long the long write runs here, from its dirty flag to its exit: kills are timed
    // within that span (a fixed span made kills miss on a fast machine and pile up on a slow one).
    const span = await (async () => {
      const img = join(dir, 'calibrate.qcow2');
      assert.equal(qdedup(['create', '-q', img, String(size)]).status, 0);
      const child = spawn(process.execPath, [BIN, 'write', '-q', '-i', input, img, String(8 << 20)], { stdio: 'ignore' });
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      let running = true;
      void exited.then(() => {
        running = false;
      });
      while (running && !dirtyOnDisk(img)) await new Promise((r) => setTimeout(r, 5));
      const started = Date.now();
      assert.equal(await exited, 0, 'the calibration write');
      return Date.now() - started;
    })();
    for (let round = 0; round < 20; round++) {
      const img = join(dir, `k${round}.qcow2`);
      assert.equal(qdedup(['create', '-q', img, String(size)]).status, 0);
      // Acknowledged writes first: they must survive whatever the killed write does.
      const shadow = Buffer.alloc(size);
      const first = halfDuplicate(rng, 512);
      writeFileSync(join(dir, 'first.bin'), first);
      assert.equal(qdedup(['write', '-q', '-i', join(dir, 'first.bin'), img, '0']).status, 0);
      first.copy(shadow, 0);
      assert.equal(qdedup(['write', '-q', '-P', '0x5c', img, String(4 << 20), '1M']).status, 0);
      shadow.fill(0x5c, 4 << 20, 5 << 20);
      // The long write (8 MiB … 56 MiB only), killed a random time after it set the dirty
      // flag, that is after its first write to the image (Node's start-up is not the moment tested).
      const child = spawn(process.execPath, [BIN, 'write', '-q', '-i', input, img, String(8 << 20)], { stdio: 'ignore' });
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      let running = true;
      void exited.then(() => {
        running = false;
      });
      while (running && !dirtyOnDisk(img)) await new Promise((r) => setTimeout(r, 5));
      const delay = rng.int(0, Math.max(20, Math.floor(span * 0.8)));
      const timer = setTimeout(() => child.kill('SIGKILL'), delay);
      const status = await exited;
      clearTimeout(timer);
      if (status === null) killedMidway++;
      const label = `round ${round}, killed after ${delay} ms (${status === null ? 'killed' : `exited ${status}`})`;
      // Everything acknowledged reads back (the long write's range may hold old or new data).
      const image = await Image.open(img);
      assert.ok((await image.read(0, 8 << 20)).equals(shadow.subarray(0, 8 << 20)), `${label}: acknowledged data`);
      const dirty = dedupExtensionOf(image)!.dirty;
      await image.close();
      const chk = qemuCheck(img);
      assert.equal(chk.json?.corruptions ?? 0, 0, `${label}: ${chk.stderr}`);
      assert.ok(chk.status === 0 || chk.status === 3, `${label}: qemu-img check exit ${chk.status}`);
      // The next write drops an index the kill left dirty, and reads back right.
      const next = qdedup(['write', '-P', '0x6d', img, String(40 << 20), '64k']);
      assert.equal(next.status, 0, next.stderr);
      if (dirty) {
        assert.match(next.stderr, /dedup index not trusted: the image was not closed cleanly/, label);
        droppedIndex++;
      }
      const io = run('qemu-io', ['-f', 'qcow2', '-r', '-c', `read -P 0x6d ${40 << 20} 64k`, '-c', `read -P 0x5c ${4 << 20} 1M`, img]);
      assert.equal(io.status, 0, io.stderr);
      assert.doesNotMatch(io.stdout, /Pattern verification failed/, label);
      assert.equal(qemuCheck(img).json?.corruptions ?? 0, 0, label);
    }
    console.log(`# kill -9: 20 rounds within the write's ${span} ms, ${killedMidway} killed mid-write, ${droppedIndex} dirty indexes dropped`);
    assert.ok(killedMidway >= 15, `only ${killedMidway} kills landed during the write`);
    assert.ok(droppedIndex >= 15, `only ${droppedIndex} kills left the index dirty`);
  });
});
