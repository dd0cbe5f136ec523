// Differential reads: images written by qemu-io and `qemu-img convert`
// (compressed clusters, zero clusters, discard, compat 0.10, backing files, every cluster
// size 512 B … 2 MiB, refcount widths 1 … 64) are read through `bin/qdedup read` and must
// be byte-identical to what QEMU reads (`qemu-img convert -O raw`, or the raw source).
// `qdedup read -P` / `-v` must print the same lines as qemu-io's `read -P` / `read -v`
// (less qemu-io's timing line). The committed fixtures are read against their manifest.
//
// Images are generated from a seeded PRNG: QDEDUP_SEED=<seed> npm test -- differential-read
// reproduces a run; QDEDUP_ONLY=<case label> runs one case.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { HAVE_QEMU, NO_QEMU, ROOT } from '../helpers.ts';
import { Rng, testFolders, pool, qdedupAsync, runAsync, runOk, sizeName, toRaw } from './differential-lib.ts';

const BASE_SEED = process.env.QDEDUP_SEED ? Number(process.env.QDEDUP_SEED) >>> 0 : 0x2d5e_ed03;
const ONLY = process.env.QDEDUP_ONLY;
const only = (label: string) => ONLY === undefined || ONLY === label;
const FIXTURES = join(ROOT, 'fixtures');

const { scratch, seedOf } = testFolders('qdedup-diffr-', BASE_SEED);

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Index of the first differing byte, or -1. */
function firstDifference(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/** Asserts byte equality, naming the first differing offset instead of dumping buffers. */
function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  const at = firstDifference(actual, expected);
  if (at < 0) return;
  assert.fail(
    `${what}: ${actual.length} bytes read, ${expected.length} expected; first difference at offset ${at} (0x${at.toString(16)}): got ${actual.subarray(at, at + 8).toString('hex')}, expected ${expected.subarray(at, at + 8).toString('hex')}`,
  );
}

/** qemu-io output without its timing lines ("4 KiB, 1 ops; 00.00 sec (…)"). */
function qemuIoLines(out: string): string {
  return out
    .split('\n')
    .filter((l) => !/^[\d.]+ (bytes|[KMGTPE]iB), \d+ ops; /.test(l))
    .join('\n');
}

/** Reads a whole image (or a range) through bin/qdedup and returns the bytes. */
async function qdedupRead(image: string, range?: [number, number?]): Promise<Buffer> {
  const args = ['read', image, ...(range ?? []).filter((n) => n !== undefined).map(String)];
  const r = await qdedupAsync(args);
  assert.equal(r.status, 0, `qdedup ${args.join(' ')} exited ${r.status}: ${r.stderr.trim()}`);
  assert.equal(r.stderr, '', `qdedup ${args.join(' ')} wrote to stderr`);
  return r.stdoutBytes;
}

/** What QEMU reads from an image, as raw bytes. */
async function qemuRead(image: string, format = 'qcow2'): Promise<Buffer> {
  const out = join(scratch(), 'qemu.raw');
  await toRaw(image, out, { format });
  return readFileSync(out);
}

/**
 * Reads the whole image and, usually, one random unaligned range through qdedup and
 * compares them with `expected` (default: what qemu-img convert reads).
 */
async function readsLikeQemu(label: string, image: string, rng: Rng, expected?: Buffer): Promise<void> {
  const want = expected ?? (await qemuRead(image));
  const ctx = `${label} (seed 0x${seedOf(label).toString(16)}, QDEDUP_SEED=0x${BASE_SEED.toString(16)}): ${image}`;
  assertSameBytes(await qdedupRead(image), want, `qdedup read of the whole disk, ${ctx}`);
  if (rng.chance(0.4)) return; // a range read on most images (each read is a process: keep the count down)
  const off = rng.int(0, want.length - 1);
  if (rng.chance(0.25)) {
    // OFFSET alone: to the end of the disk
    assertSameBytes(await qdedupRead(image, [off]), want.subarray(off), `qdedup read ${off}, ${ctx}`);
    return;
  }
  const len = rng.int(1, Math.min(want.length - off, 3 << 20));
  assertSameBytes(await qdedupRead(image, [off, len]), want.subarray(off, off + len), `qdedup read ${off} ${len}, ${ctx}`);
}

// ------------------------------------------------------------------ image makers

interface Layout {
  cs: number;
  compat: '0.10' | '1.1';
  refcountBits: number;
  size: number;
}

function opts(l: Layout): string {
  return `cluster_size=${l.cs},compat=${l.compat},refcount_bits=${l.refcountBits}`;
}

/**
 * qemu-io commands for a random mix of random data, patterns, zero writes (kept and
 * unmapped), discards and compressed whole clusters, with places around L2-table
 * boundaries. `dataFile` is a file of random bytes for `write -s`. Compressed writes
 * come first, and only on a `fresh` image: QEMU refuses (EIO) to compress into an
 * allocated cluster.
 */
function randomCommands(rng: Rng, l: Layout, dataFile: string, count: number, fresh = true): string[] {
  const { cs, size } = l;
  const span = cs * (cs / 8);
  const hot = [0, size];
  for (let k = 1; k * span < size && k <= 4; k++) hot.push(k * span);
  const clusters = Math.floor(size / cs); // whole clusters inside the disk
  const cmds: string[] = [];
  const compressed = new Set<number>();
  for (let i = fresh ? rng.int(0, 3) : 0; i > 0 && clusters > 0; i--) compressed.add(rng.int(0, clusters - 1));
  const sorted = [...compressed].sort((a, b) => a - b);
  for (let k = 0; k < sorted.length; ) {
    let n = 1;
    while (sorted[k + n] === sorted[k] + n) n++; // runs of neighbours: one write
    cmds.push(`write -q -c -P 0x${rng.int(1, 255).toString(16)} ${sorted[k] * cs} ${n * cs}`);
    k += n;
  }
  // Leave most compressed clusters alone: few of the random writes below land on them.
  for (let i = 0; i < count; i++) {
    let off = rng.chance(0.4) ? rng.pick(hot) + rng.int(-2 * cs, 2 * cs) : rng.int(0, size - 1);
    off = Math.max(0, Math.min(size - 1, off));
    const len = Math.max(1, Math.min(size - off, rng.float() < 0.6 ? rng.int(1, cs) : rng.int(cs, 3 * cs), 4 << 20));
    const r = rng.float();
    const c0 = Math.floor(off / cs);
    const wholeLen = Math.min(rng.int(1, 2), clusters - c0) * cs;
    if (r < 0.35) cmds.push(`write -q -s ${dataFile} ${off} ${len}`);
    else if (r < 0.65) cmds.push(`write -q -P 0x${rng.int(0, 255).toString(16)} ${off} ${len}`);
    else if (r < 0.77 && l.compat === '1.1') cmds.push(`write -q -z ${off} ${len}`);
    else if (r < 0.85 && l.compat === '1.1' && wholeLen > 0) cmds.push(`write -q -z -u ${c0 * cs} ${wholeLen}`);
    else if (wholeLen > 0) cmds.push(`discard -q ${c0 * cs} ${wholeLen}`);
    else cmds.push(`write -q -P 0x7e ${off} ${len}`);
  }
  return cmds;
}

async function qemuIo(image: string, commands: string[], format = 'qcow2'): Promise<void> {
  // Bounded batches keep the command line short.
  for (let i = 0; i < commands.length; i += 40) {
    await runOk('qemu-io', ['-f', format, ...commands.slice(i, i + 40).flatMap((c) => ['-c', c]), image]);
  }
}

/** A raw source of random, repeated-text and zero runs (compressible in parts). */
function mixedSource(rng: Rng, size: number, cs: number): Buffer {
  const src = Buffer.alloc(size);
  for (let pos = 0; pos < size; ) {
    const n = Math.min(size - pos, rng.int(1, 3 * cs));
    const r = rng.float();
    if (r < 0.4) src.fill(`block at ${pos}; `, pos, pos + n);
    else if (r < 0.75) rng.bytes(n).copy(src, pos);
    pos += n; // else zeros
  }
  return src;
}

/** Every (compat, refcount width) pair; v2 has 16-bit refcounts only. */
const WIDTHS: ['0.10' | '1.1', number][] = [
  ['0.10', 16],
  ['1.1', 1],
  ['1.1', 2],
  ['1.1', 4],
  ['1.1', 8],
  ['1.1', 16],
  ['1.1', 32],
  ['1.1', 64],
];

// ---------------------------------------------------------------- committed fixtures
// Needs no QEMU: the manifest holds what QEMU read when the fixtures were made.
describe('differential reads: committed fixtures read like their manifest', { concurrency: 2 }, () => {
  const manifest = JSON.parse(readFileSync(join(FIXTURES, 'manifest.json'), 'utf8')) as {
    images: { file: string; format: string; sha256: string; virtualSize: number; snapshots?: Record<string, string> }[];
  };
  it('the manifest lists every image in fixtures/ and the folder stays small', () => {
    assert.ok(manifest.images.length >= 10);
    const listed = new Set([...manifest.images.map((e) => e.file), 'manifest.json', 'README.md']);
    // Subfolders (fuzz-regressions/) have their own README and tests.
    const files = readdirSync(FIXTURES).filter((n) => statSync(join(FIXTURES, n)).isFile());
    assert.deepEqual(
      files.filter((n) => !listed.has(n)),
      [],
      'files in fixtures/ that the manifest does not list',
    );
    let total = 0;
    for (const n of readdirSync(FIXTURES)) total += statSync(join(FIXTURES, n)).size;
    assert.ok(total < 2 * 1024 * 1024, `fixtures take ${total} bytes`);
  });
  it("chain-top.qcow2 opened by a relative path from another folder: backing names resolve against the image's folder", async () => {
    const e = manifest.images.find((m) => m.file === 'chain-top.qcow2')!;
    const cwd = join(ROOT, 'test');
    const r = await qdedupAsync(['read', join('..', 'fixtures', 'chain-top.qcow2')], undefined, cwd);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(sha256(r.stdoutBytes), e.sha256);
  });

  for (const e of manifest.images.filter((m) => m.format === 'qcow2')) {
    it(`${e.file}: qdedup read gives the manifest's sha256 (and so does qemu-img, when installed)`, { skip: !only(e.file) }, async () => {
      const path = join(FIXTURES, e.file);
      const before = sha256(readFileSync(path));
      const data = await qdedupRead(path);
      assert.equal(data.length, e.virtualSize);
      assert.equal(sha256(data), e.sha256, `qdedup read ${e.file}`);
      assert.equal(sha256(readFileSync(path)), before, 'reading left the fixture unchanged');
      if (!HAVE_QEMU) return;
      assert.equal(sha256(await qemuRead(path)), e.sha256, `qemu-img convert ${e.file} (is the manifest stale? npm run fixtures)`);
      for (const [name, hash] of Object.entries(e.snapshots ?? {})) {
        const out = join(scratch(), `${name}.raw`);
        await toRaw(path, out, { snapshot: name });
        assert.equal(sha256(readFileSync(out)), hash, `snapshot ${name} of ${e.file}`);
      }
    });
  }
});

describe('differential reads', { skip: NO_QEMU, concurrency: true }, () => {
  // ---------------------------------------------------------------- qemu-io written images
  describe('images written by qemu-io, every cluster size', { concurrency: 2 }, () => {
    for (let i = 0; i < 13 * 2; i++) {
      const cb = 9 + (i % 13);
      const cs = 2 ** cb;
      const label = `io-${i}`;
      const rng = new Rng(seedOf(label));
      const [compat, refcountBits] = WIDTHS[(cb + Math.floor(i / 13) * 3) % WIDTHS.length];
      const span = cs * (cs / 8);
      // Small clusters: a few L2 tables' worth. Large ones: a few clusters (the L2
      // boundary would need terabytes), the second round with a partial last cluster.
      let size = span * 3 <= 8 << 20 ? span * rng.int(2, 3) + rng.int(0, cs) : cs * rng.int(3, 6) + (i >= 13 ? rng.int(1, cs - 1) : 0);
      size = Math.ceil(size / 512) * 512;
      const l: Layout = { cs, compat, refcountBits, size };
      it(`${label}: ${sizeName(cs)} clusters, compat ${compat}, refcount_bits=${refcountBits}, size ${size}`, { skip: !only(label) }, async () => {
        const dir = scratch();
        const img = join(dir, 'io.qcow2');
        const dataFile = join(dir, 'data.bin');
        writeFileSync(dataFile, rng.bytes(Math.min(4 << 20, 4 * cs)));
        await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts(l), img, String(size)]);
        await qemuIo(img, randomCommands(rng, l, dataFile, rng.int(8, 20)));
        await readsLikeQemu(label, img, rng);
      });
    }
  });

  // ---------------------------------------------------------------- qemu-img convert
  describe('images made by qemu-img convert (plain and -c)', { concurrency: 2 }, () => {
    const cases: { label: string; cs: number; compat: '0.10' | '1.1'; refcountBits: number; size: number; compress: boolean; then?: boolean }[] = [
      { label: 'cv-512-c', cs: 512, compat: '1.1', refcountBits: 16, size: 200 << 10, compress: true },
      { label: 'cv-1k-c-v2', cs: 1024, compat: '0.10', refcountBits: 16, size: 300 << 10, compress: true },
      { label: 'cv-4k-c', cs: 4096, compat: '1.1', refcountBits: 1, size: 1 << 20, compress: true, then: true },
      { label: 'cv-8k-c-v2', cs: 8192, compat: '0.10', refcountBits: 16, size: 1 << 20, compress: true },
      { label: 'cv-64k-c', cs: 65536, compat: '1.1', refcountBits: 64, size: (3 << 20) + 4096, compress: true, then: true },
      { label: 'cv-64k-c-v2', cs: 65536, compat: '0.10', refcountBits: 16, size: 2 << 20, compress: true },
      { label: 'cv-256k-c', cs: 256 << 10, compat: '1.1', refcountBits: 8, size: 3 << 20, compress: true },
      { label: 'cv-2M-c', cs: 2 << 20, compat: '1.1', refcountBits: 16, size: 9 << 20, compress: true },
      { label: 'cv-2M', cs: 2 << 20, compat: '1.1', refcountBits: 2, size: 7 << 20, compress: false },
      { label: 'cv-16k-v2', cs: 16384, compat: '0.10', refcountBits: 16, size: 1 << 20, compress: false, then: true },
      { label: 'cv-2k', cs: 2048, compat: '1.1', refcountBits: 32, size: 700 << 10, compress: false },
    ];
    for (const c of cases) {
      it(
        `${c.label}: convert${c.compress ? ' -c' : ''} to ${sizeName(c.cs)} clusters, compat ${c.compat}, refcount_bits=${c.refcountBits}${c.then ? ', then qemu-io writes over it' : ''}`,
        { skip: !only(c.label) },
        async () => {
          const dir = scratch();
          const rng = new Rng(seedOf(c.label));
          const src = mixedSource(rng, c.size, c.cs);
          const raw = join(dir, 'src.raw');
          writeFileSync(raw, src);
          const img = join(dir, 'cv.qcow2');
          await runOk('qemu-img', ['convert', ...(c.compress ? ['-c'] : []), '-f', 'raw', '-O', 'qcow2', '-o', opts(c), raw, img]);
          if (c.compress) {
            const map = await runOk('qemu-img', ['map', '-f', 'qcow2', '--output=json', img]);
            assert.ok(/"data": true(?!, "offset")/.test(map.stdout), 'the image has compressed clusters');
          }
          if (!c.then) {
            await readsLikeQemu(c.label, img, rng, src); // against the raw source itself
            return;
          }
          const dataFile = join(dir, 'data.bin');
          writeFileSync(dataFile, rng.bytes(4 * c.cs));
          await qemuIo(img, randomCommands(rng, c, dataFile, 12, false));
          await readsLikeQemu(c.label, img, rng);
        },
      );
    }
  });

  // ---------------------------------------------------------------- backing files
  describe('images with backing files', { concurrency: 2 }, () => {
    const cases: {
      label: string;
      base: 'qcow2' | 'raw';
      baseCs: number;
      cs: number;
      compat: '0.10' | '1.1';
      baseSize: number;
      size: number;
      chain?: boolean;
      absolute?: boolean;
    }[] = [
      { label: 'bk-q-64k-4k', base: 'qcow2', baseCs: 65536, cs: 4096, compat: '1.1', baseSize: 2 << 20, size: 3 << 20 },
      { label: 'bk-q-512-64k-v2', base: 'qcow2', baseCs: 512, cs: 65536, compat: '0.10', baseSize: 1 << 20, size: 1 << 20 },
      { label: 'bk-q-2M-1k', base: 'qcow2', baseCs: 2 << 20, cs: 1024, compat: '1.1', baseSize: 5 << 20, size: 5 << 20, absolute: true },
      { label: 'bk-raw-8k', base: 'raw', baseCs: 0, cs: 8192, compat: '1.1', baseSize: 777777 - (777777 % 512), size: 1 << 20 },
      { label: 'bk-raw-512-v2', base: 'raw', baseCs: 0, cs: 512, compat: '0.10', baseSize: 100 << 10, size: 128 << 10 },
      { label: 'bk-chain', base: 'qcow2', baseCs: 4096, cs: 2048, compat: '1.1', baseSize: 1 << 20, size: 2 << 20, chain: true },
    ];
    for (const c of cases) {
      it(
        `${c.label}: ${sizeName(c.cs)}-cluster compat ${c.compat} overlay on a ${c.base} base${c.chain ? ' via a middle image' : ''} (${c.absolute ? 'absolute' : 'relative'} backing name)`,
        { skip: !only(c.label) },
        async () => {
          const dir = scratch();
          const rng = new Rng(seedOf(c.label));
          const dataFile = join(dir, 'data.bin');
          writeFileSync(dataFile, rng.bytes(64 << 10));
          let base: string;
          if (c.base === 'raw') {
            base = 'base.raw';
            writeFileSync(join(dir, base), mixedSource(rng, c.baseSize, 4096));
          } else {
            base = 'base.qcow2';
            const bl: Layout = { cs: c.baseCs, compat: '1.1', refcountBits: 16, size: c.baseSize };
            await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts(bl), join(dir, base), String(c.baseSize)]);
            await qemuIo(join(dir, base), [...randomCommands(rng, bl, dataFile, 8), `write -q -s ${dataFile} 0 ${c.baseSize >> 1}`]);
          }
          let backing = c.absolute ? join(dir, base) : base;
          let backingFmt: string = c.base;
          if (c.chain) {
            const ml: Layout = { cs: 512, compat: '1.1', refcountBits: 16, size: c.baseSize + (64 << 10) };
            await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts(ml), '-b', backing, '-F', backingFmt, join(dir, 'mid.qcow2'), String(ml.size)]);
            await qemuIo(join(dir, 'mid.qcow2'), randomCommands(rng, ml, dataFile, 10));
            backing = 'mid.qcow2';
            backingFmt = 'qcow2';
          }
          const img = join(dir, 'overlay.qcow2');
          const l: Layout = { cs: c.cs, compat: c.compat, refcountBits: 16, size: c.size };
          await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts(l), '-b', backing, '-F', backingFmt, img, String(c.size)]);
          await qemuIo(img, randomCommands(rng, l, dataFile, 14));
          await readsLikeQemu(c.label, img, rng);
        },
      );
    }
  });

  // ---------------------------------------------------------------- read -P / -v output
  describe('qdedup read -P / -v print what qemu-io read prints', { concurrency: 2 }, () => {
    /** Runs the same read through qemu-io (read-only) and qdedup; compares exit codes and lines. */
    async function sameOutput(image: string, args: string[]): Promise<void> {
      const [q, d] = await Promise.all([
        runAsync('qemu-io', ['-f', 'qcow2', '-r', '-c', `read ${args.join(' ')}`, image]),
        qdedupAsync(['read', ...args.slice(0, -2), image, ...args.slice(-2)]),
      ]);
      const cmd = `read ${args.join(' ')} on ${image}`;
      assert.equal(d.stdout, qemuIoLines(q.stdout), `stdout of ${cmd} (qemu-io stderr: ${q.stderr.trim()}; qdedup stderr: ${d.stderr.trim()})`);
      assert.equal(d.status, q.status, `exit status of ${cmd}`);
    }

    function readCases(pattern: number, at: number, length: number, size: number, rng: Rng): string[][] {
      const p = `0x${pattern.toString(16)}`;
      const cases: string[][] = [
        ['-P', p, String(at), String(length)], // matches
        ['-P', p, String(at + 1), String(Math.max(1, length - 2))],
        ['-P', `0x${((pattern + 1) & 0xff).toString(16)}`, String(at), String(length)], // fails: qemu-io's message and exit 1
        ['-P', p, String(Math.max(0, at - 3)), String(length + 6)], // fails at the edges
        ['-v', String(at - (at % 16) + 5), '37'], // unaligned start, partial rows
        ['-v', String(Math.max(0, at - 20)), String(Math.min(200, size - Math.max(0, at - 20)))],
      ];
      const off = rng.int(0, size - 64);
      cases.push(['-v', String(off), String(rng.int(1, 64))]);
      return cases;
    }

    it('on a 4 KiB-cluster image with patterns, compressed and zero clusters', { skip: !only('pv-4k') }, async () => {
      const dir = scratch();
      const rng = new Rng(seedOf('pv-4k'));
      const img = join(dir, 'pv.qcow2');
      const size = 256 << 10;
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, String(size)]);
      await qemuIo(img, [
        'write -q -P 0xab 3000 20000',
        'write -q -c -P 0xcd 64k 8k',
        'write -q -z 100k 4k',
        'write -q -P 0x41 120000 70',
        'write -q -P 0x30 200000 300',
      ]);
      await pool(
        3,
        [
          ...readCases(0xab, 3000, 20000, size, rng),
          ...readCases(0xcd, 65536, 8192, size, rng),
          ['-P', '0', '102400', '4096'],
          ['-P', '0', '102300', '200'],
          ['-P', '0', String(size - 7), '7'],
          ['-v', '119990', '96'],
          ['-v', '199990', '64'],
          ['-v', '0', '16'],
          ['-v', String(size - 9), '9'],
        ].map((args) => () => sameOutput(img, args)),
      );
    });

    it('on fixtures: v2 512 B clusters, a backing chain and 64 KiB compressed clusters', { skip: !only('pv-fixtures') }, async () => {
      const rng = new Rng(seedOf('pv-fixtures'));
      const sizes = new Map(
        (JSON.parse(readFileSync(join(FIXTURES, 'manifest.json'), 'utf8')).images as { file: string; virtualSize: number }[]).map((e) => [
          e.file,
          e.virtualSize,
        ]),
      );
      const v2 = join(FIXTURES, 'v2-512.qcow2');
      const top = join(FIXTURES, 'chain-top.qcow2');
      const mixed = join(FIXTURES, 'v3-64k-mixed.qcow2');
      const reads: [string, string[]][] = [
        ...readCases(0x22, 1000, 1000, sizes.get('v2-512.qcow2')!, rng).map((a) => [v2, a] as [string, string[]]),
        [v2, ['-P', '0x55', '81910', '10']],
        ...readCases(0xb1, 28192, 2000, sizes.get('chain-top.qcow2')!, rng).map((a) => [top, a] as [string, string[]]),
        [top, ['-P', '0', '16384', '8192']],
        [top, ['-P', '0xc1', '1000', '10']],
        [top, ['-v', String(sizes.get('chain-top.qcow2')! - 9), '9']],
        ...readCases(0x02, 131072, 65536, sizes.get('v3-64k-mixed.qcow2')!, rng).map((a) => [mixed, a] as [string, string[]]),
      ];
      await pool(
        3,
        reads.map(
          ([image, args]) =>
            () =>
              sameOutput(image, args),
        ),
      );
    });
  });
});
