// The streaming read path against QEMU as the oracle:
// Image.readRange on random, unaligned ranges that cross shared (dedup), compressed, zero,
// unallocated and backing clusters, into buffers that held other bytes, with and without
// the list of zero ranges; and `qdedup read` to a pipe, to a regular file (sparse: zero
// ranges past the file's end left as holes), at a nonzero file offset, with O_APPEND, and
// over an existing longer file (`1<>`). Nothing here is timed.
//
// QDEDUP_SEED=<seed> npm test -- read-stream reproduces a run.

import { describe, it, before } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { BIN, NO_QEMU } from '../helpers.ts';
import { Rng, qdedupOk, runOk, testFolders, toRaw } from './differential-lib.ts';
import { Image } from '../../src/image/image.ts';

const BASE_SEED = process.env.QDEDUP_SEED ? Number(process.env.QDEDUP_SEED) >>> 0 : 0x5ea4_2d01;
const { scratch, seedOf } = testFolders('qdedup-rstream-', BASE_SEED);

/** Index of the first differing byte of two equal-length buffers, or -1. */
function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

function assertSame(actual: Buffer, expected: Buffer, what: string): void {
  const at = firstDifference(actual, expected);
  if (at >= 0)
    assert.fail(
      `${what}: ${actual.length} bytes, ${expected.length} expected; first difference at ${at}: got ${actual.subarray(at, at + 8).toString('hex')}, expected ${expected.subarray(at, at + 8).toString('hex')}`,
    );
}

/** Runs a shell command line (paths quoted by the caller); fails on a non-zero exit. */
function sh(line: string): void {
  const r = spawnSync('sh', ['-c', line], { env: { ...process.env, NO_COLOR: '1' } });
  assert.equal(r.status, 0, `sh -c ${line}: ${r.stderr}`);
  assert.equal(r.stderr.toString(), '', `sh -c ${line} wrote to stderr`);
}

const q = (s: string) => `'${s.replace(/'/g, "'\\''")}'`;
const QDEDUP = `${q(process.execPath)} ${q(BIN)}`;

describe('streaming reads', { skip: NO_QEMU, concurrency: 1 }, () => {
  // A 4 KiB-cluster dedup image over a 64 KiB-cluster qcow2 base: shared clusters (written
  // by qdedup from repeated blocks), compressed and zero clusters and a discard (qemu-io),
  // unallocated clusters reading the base, and the base's own unallocated tail.
  let dir: string;
  let top: string;
  let expected: Buffer;
  const SIZE = 6 << 20;
  before(async () => {
    dir = scratch();
    const rng = new Rng(seedOf('mix'));
    const base = join(dir, 'base.qcow2');
    const data = join(dir, 'data.bin');
    writeFileSync(data, rng.bytes(1 << 20));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', base, String(SIZE)]);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', `write -q -s ${data} 0 1M`, '-c', 'write -q -P 0x5a 3M 512k', base]);
    top = join(dir, 'top.qcow2');
    await qdedupOk(['create', '-q', '-o', 'cluster_size=4096,backing_file=base.qcow2,backing_fmt=qcow2', top, String(SIZE)]);
    // 1.5 MiB of 4 KiB blocks drawn from 40 distinct ones: most clusters shared.
    const blocks = Array.from({ length: 40 }, () => rng.bytes(4096));
    const input = Buffer.concat(Array.from({ length: 384 }, () => rng.pick(blocks)));
    const inputFile = join(dir, 'dups.bin');
    writeFileSync(inputFile, input);
    await qdedupOk(['write', '-q', '-i', inputFile, top, String(512 << 10)]);
    await qdedupOk(['write', '-q', '-i', inputFile, top, String((2 << 20) + 1000)]); // unaligned: partial clusters
    await runOk('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -q -c -P 0x33 4352k 64k', // compressed, in clusters the overlay never had
      '-c',
      'write -q -z 600k 16k', // zero clusters over shared ones
      '-c',
      'write -q -z -u 1M 8k',
      '-c',
      'discard -q 1040k 8k',
      '-c',
      'write -q -P 0x77 5000000 10000',
      '-c',
      'write -q -z 5500k 8k', // zero clusters after a run that reads the base's unallocated zeros
      top,
    ]);
    const raw = join(dir, 'top.raw');
    await toRaw(top, raw);
    expected = readFileSync(raw);
    assert.equal(expected.length, SIZE);
  });

  it('Image.read and readRange: 400 random unaligned ranges read like qemu-img convert, into dirty buffers, with and without the zero list', async () => {
    const rng = new Rng(seedOf('ranges'));
    const image = await Image.open(top);
    try {
      let listed = 0;
      for (let i = 0; i < 400; i++) {
        const off = rng.chance(0.2) ? rng.int(3 << 20, SIZE - 1) : rng.chance(0.3) ? rng.int(0, SIZE / 4096 - 1) * 4096 : rng.int(0, SIZE - 1);
        const len = rng.int(0, Math.min(SIZE - off, rng.chance(0.5) ? 3 << 20 : 20000));
        const want = expected.subarray(off, off + len);
        const ctx = `range ${off} +${len} (QDEDUP_SEED=0x${BASE_SEED.toString(16)})`;
        assertSame(await image.read(off, len), want, `read ${ctx}`);
        const dst = Buffer.alloc(len + 10, 0xee);
        await image.readRange(dst, 5, off, len);
        assertSame(dst.subarray(5, 5 + len), want, `readRange ${ctx}`);
        assert.ok(dst.subarray(0, 5).every((b) => b === 0xee) && dst.subarray(5 + len).every((b) => b === 0xee), `readRange wrote outside its range, ${ctx}`);
        const zeros: number[] = [];
        dst.fill(0xee);
        await image.readRange(dst, 5, off, len, zeros);
        let prevEnd = -1;
        for (let k = 0; k < zeros.length; k += 2) {
          const [start, end] = [zeros[k], zeros[k + 1]];
          assert.ok(
            start > prevEnd && start < end && start >= 5 && end <= 5 + len,
            `zero ranges sorted, merged and inside the range: ${zeros.join(',')}, ${ctx}`,
          );
          assert.ok(
            want.subarray(start - 5, end - 5).every((b) => b === 0),
            `a listed zero range holds data, ${ctx}`,
          );
          assert.ok(
            dst.subarray(start, end).every((b) => b === 0xee),
            `a listed zero range was written, ${ctx}`,
          );
          dst.fill(0, start, end);
          prevEnd = end;
          listed++;
        }
        assertSame(dst.subarray(5, 5 + len), want, `readRange with zero list ${ctx}`);
      }
      assert.ok(listed > 20, `zero ranges were listed (${listed})`);
    } finally {
      await image.close();
    }
  });

  it('qdedup read to a pipe and to a file give the same bytes as qemu-img convert', () => {
    const viaPipe = join(dir, 'pipe.raw');
    const toFile = join(dir, 'file.raw');
    sh(`${QDEDUP} read ${q(top)} | cat > ${q(viaPipe)}`);
    sh(`${QDEDUP} read ${q(top)} > ${q(toFile)}`);
    assertSame(readFileSync(viaPipe), expected, 'read | cat');
    assertSame(readFileSync(toFile), expected, 'read > file');
    const part = join(dir, 'part.raw');
    sh(`${QDEDUP} read ${q(top)} 999 4000000 > ${q(part)}`);
    assertSame(readFileSync(part), expected.subarray(999, 999 + 4000000), 'read 999 4000000 > file');
  });

  it('read into a file at a nonzero offset, with O_APPEND, and over a longer existing file', () => {
    const out = join(dir, 'offset.raw');
    // Starts after "head", leaves the offset after the image's bytes for "tail".
    sh(`{ printf head; ${QDEDUP} read ${q(top)}; printf tail; } > ${q(out)}`);
    assertSame(readFileSync(out), Buffer.concat([Buffer.from('head'), expected, Buffer.from('tail')]), 'head, read, tail');
    const appended = join(dir, 'append.raw');
    sh(`printf head > ${q(appended)}; ${QDEDUP} read ${q(top)} >> ${q(appended)}; printf tail >> ${q(appended)}`);
    assertSame(readFileSync(appended), Buffer.concat([Buffer.from('head'), expected, Buffer.from('tail')]), '>> (O_APPEND)');
    // `1<>` opens without truncating: the zero ranges inside the old file must be written.
    const over = join(dir, 'over.raw');
    writeFileSync(over, Buffer.alloc(SIZE + 4096, 0xff));
    sh(`${QDEDUP} read ${q(top)} 1<> ${q(over)}`);
    assertSame(readFileSync(over), Buffer.concat([expected, Buffer.alloc(4096, 0xff)]), '1<> over a longer file');
    writeFileSync(over, Buffer.alloc(SIZE >> 1, 0xff)); // shorter: the rest is extended as holes
    sh(`${QDEDUP} read ${q(top)} 1<> ${q(over)}`);
    assertSame(readFileSync(over), expected, '1<> over a shorter file');
  });

  it('read of a mostly empty 1 GiB image to a file is sparse, of the right length and identical to qemu-img convert -O raw', async () => {
    const d = scratch();
    const img = join(d, 'sparse.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1G']);
    await runOk('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -q -P 0x11 0 1M',
      '-c',
      'write -q -P 0x22 300M 64k',
      '-c',
      'write -q -z 400M 1M',
      '-c',
      'write -q -P 0x33 1048575k 1k',
      img,
    ]);
    const ours = join(d, 'ours.raw');
    const theirs = join(d, 'theirs.raw');
    sh(`${QDEDUP} read ${q(img)} > ${q(ours)}`);
    await toRaw(img, theirs);
    assert.equal(statSync(ours).size, 1 << 30);
    const cmp = spawnSync('cmp', [ours, theirs]);
    assert.equal(cmp.status, 0, `cmp: ${cmp.stdout}${cmp.stderr}`);
    const allocated = statSync(ours).blocks * 512;
    assert.ok(allocated < 16 << 20, `output allocates ${allocated} bytes (sparse: about 1.1 MiB of data)`);
    // The same image through a pipe: every byte written.
    const piped = join(d, 'piped.raw');
    sh(`${QDEDUP} read ${q(img)} 0 400M | cat > ${q(piped)}`);
    assert.equal(statSync(piped).size, 400 << 20);
    assert.equal(spawnSync('cmp', ['-n', String(400 << 20), piped, theirs]).status, 0);
  });
});
