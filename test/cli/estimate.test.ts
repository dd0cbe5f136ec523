// `qdedup estimate` through the real bin/qdedup on generated files: exact ratios and
// histograms (duplicate counts known by construction and from a naive oracle: a Map of
// sha256 strings), zero runs, partial last clusters, several files and cluster sizes, inputs
// crossing the 8 MiB chunk; qcow2 inputs made by qemu-img/qemu-io give their raw
// equivalent's figures; the estimate equals what `create` + `write -i` then stores (the
// refcount cap included); sampling; bad input; the JSON shape. Compression: the ratio of the
// distinct clusters deflated as QEMU stores compressed clusters, checked against node:zlib
// over the same clusters, whole and sampled by hash, and against what `convert -c` then
// stores.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { deflateRawSync } from 'node:zlib';
import { join } from 'node:path';
import { NO_QEMU, qdedup, run, tempDir, type RunResult } from '../helpers.ts';

const dir = tempDir('qdedup-estimate-');
const path = (name: string) => join(dir, name);

/** `size` pseudo-random bytes, the same for the same seed (xorshift32). */
function noise(seed: number, size: number): Buffer {
  let x = (seed * 2654435761) >>> 0 || 1;
  const b = Buffer.alloc(size);
  for (let i = 0; i + 4 <= size; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  for (let i = size & ~3; i < size; i++) b[i] = (x >>> (8 * (i & 3))) & 0xff || 1;
  return b;
}

const BLOCK = 4096;
/** Contents and how often they occur in `main.raw` (4 KiB blocks, shuffled), by 4 KiB bucket. */
const REPEATS: Record<string, number> = { a: 2, b: 3, c: 4, d: 7, e: 8, f: 20 };
const UNIQUE = 100;
const ZERO_RUNS = [30, 20];
const TAIL = 1000; // a partial last cluster of distinct bytes

/** main.raw: 100 distinct blocks, the repeated ones, two zero runs, then a 1000-byte tail. */
function makeMain(): Buffer {
  const blocks: Buffer[] = [];
  for (let i = 0; i < UNIQUE; i++) blocks.push(noise(1000 + i, BLOCK));
  Object.entries(REPEATS).forEach(([name, n]) => {
    for (let i = 0; i < n; i++) blocks.push(noise(name.charCodeAt(0), BLOCK));
  });
  let x = 7;
  for (let i = blocks.length - 1; i > 0; i--) {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    const j = x % (i + 1);
    [blocks[i], blocks[j]] = [blocks[j], blocks[i]];
  }
  blocks.splice(40, 0, Buffer.alloc(ZERO_RUNS[0] * BLOCK));
  blocks.splice(120, 0, Buffer.alloc(ZERO_RUNS[1] * BLOCK));
  return Buffer.concat([...blocks, noise(99, TAIL)]);
}

/** What the estimate must say: every input split into clusters (its last one zero-padded), counted in a Map. */
function oracle(files: Buffer[], cs: number, perCopy = 32766) {
  const counts = new Map<string, number>();
  let guest = 0;
  let zero = 0;
  for (const f of files) {
    for (let at = 0; at < f.length; at += cs, guest++) {
      const c = Buffer.alloc(cs);
      f.copy(c, 0, at, Math.min(f.length, at + cs));
      if (!c.some((b) => b !== 0)) {
        zero++;
        continue;
      }
      const k = createHash('sha256').update(c).digest('hex');
      counts.set(k, (counts.get(k) ?? 0) + 1);
    }
  }
  const rows = new Map<number, { refcnt: number; alloc: number; ref: number }>();
  for (const n of counts.values()) {
    const refcnt = 2 ** Math.floor(Math.log2(n));
    const r = rows.get(refcnt) ?? { refcnt, alloc: 0, ref: 0 };
    r.alloc += Math.ceil(n / perCopy);
    r.ref += n;
    rows.set(refcnt, r);
  }
  const histogram = [...rows.values()]
    .sort((a, b) => a.refcnt - b.refcnt)
    .map((r) => ({
      refcnt: r.refcnt,
      'allocated-blocks': r.alloc,
      'allocated-bytes': r.alloc * cs,
      'referenced-blocks': r.ref,
      'referenced-bytes': r.ref * cs,
    }));
  const allocated = histogram.reduce((a, r) => a + r['allocated-blocks'], 0);
  const referenced = guest - zero;
  return { guest, zero, referenced, allocated, histogram };
}

/** What storing a cluster compressed takes, as QEMU's qcow2 (window 2^12, memLevel 9, level 6): the deflate stream, or the cluster when that is not smaller. */
function storedSize(c: Buffer): number {
  const z = deflateRawSync(c, { level: 6, windowBits: 12, memLevel: 9 });
  return z.length < c.length ? z.length : c.length;
}

/** The distinct non-zero clusters of `files` (each zero-padded at its end), by SHA-256, first occurrence. */
function distinctClusters(files: Buffer[], cs: number): Map<string, Buffer> {
  const seen = new Map<string, Buffer>();
  for (const f of files) {
    for (let at = 0; at < f.length; at += cs) {
      const c = Buffer.alloc(cs);
      f.copy(c, 0, at, Math.min(f.length, at + cs));
      if (!c.some((b) => b !== 0)) continue;
      const h = createHash('sha256').update(c).digest();
      const k = h.toString('hex');
      if (!seen.has(k)) seen.set(k, c);
    }
  }
  return seen;
}

/** The compression figures over the distinct clusters `keep` accepts (by SHA-256): their count, bytes, stored bytes, and those stored plain. */
function compressionOracle(files: Buffer[], cs: number, keep: (hash: Buffer) => boolean = () => true) {
  let clusters = 0;
  let stored = 0;
  let plain = 0;
  for (const [k, c] of distinctClusters(files, cs)) {
    if (!keep(Buffer.from(k, 'hex'))) continue;
    const n = storedSize(c);
    clusters++;
    stored += n;
    if (n === cs) plain++;
  }
  return { clusters, input: clusters * cs, stored, plain };
}

type SizeJson = Record<string, any>;
function estimateJson(...args: string[]): { json: Record<string, any>; sizes: SizeJson[]; r: RunResult } {
  const r = qdedup(['estimate', '--output', 'json', ...args]);
  assert.equal(r.status, 0, r.stderr);
  const json = JSON.parse(r.stdout);
  return { json, sizes: json['cluster-sizes'], r };
}

/** Asserts one cluster size's figures against the oracle's. */
function assertMatches(s: SizeJson, o: ReturnType<typeof oracle>): void {
  assert.equal(s['guest-clusters'], o.guest, 'guest clusters');
  assert.equal(s['zero-clusters'], o.zero, 'zero clusters');
  assert.equal(s['referenced-clusters'], o.referenced, 'referenced clusters');
  assert.equal(s['allocated-clusters'], o.allocated, 'allocated clusters');
  assert.equal(s['bytes-saved'], (o.referenced - o.allocated) * s['cluster-size']);
  assert.equal(s['dedup-ratio'], Math.round((o.referenced / o.allocated) * 10000) / 10000);
  assert.equal(s.sample, 1);
  assert.deepEqual(s.histogram, o.histogram);
}

const main = makeMain();
writeFileSync(path('main.raw'), main);
// A sparse 9 MiB file crossing the 8 MiB chunk: copies of main's first block at 0 and past 8 MiB, a new block at the end.
const big = path('big.raw');
{
  const fd = openSync(big, 'w');
  writeSync(fd, main.subarray(0, BLOCK), 0, BLOCK, 0);
  writeSync(fd, main.subarray(0, BLOCK), 0, BLOCK, 8.5 * 1024 * 1024);
  writeSync(fd, noise(5, BLOCK), 0, BLOCK, 9 * 1024 * 1024 - BLOCK);
  closeSync(fd);
}

describe('estimate: exact figures on generated data', () => {
  it('main.raw at 4 KiB: the histogram known by construction', () => {
    const { sizes, json } = estimateJson(path('main.raw'));
    assert.equal(sizes.length, 1);
    const s = sizes[0];
    const dup = Object.values(REPEATS).reduce((a, n) => a + n, 0);
    const zero = ZERO_RUNS[0] + ZERO_RUNS[1];
    assert.equal(s['cluster-size'], 4096);
    assert.equal(s['guest-clusters'], UNIQUE + dup + zero + 1);
    assert.equal(s['zero-clusters'], zero);
    assert.equal(s['referenced-clusters'], UNIQUE + dup + 1);
    assert.equal(s['allocated-clusters'], UNIQUE + 1 + Object.keys(REPEATS).length);
    // Buckets: 1 (100 distinct + the tail), 2 (a×2, b×3), 4 (c×4, d×7), 8 (e×8), 16 (f×20).
    assert.deepEqual(
      s.histogram.map((r: SizeJson) => [r.refcnt, r['allocated-blocks'], r['referenced-blocks']]),
      [
        [1, 101, 101],
        [2, 2, 5],
        [4, 2, 11],
        [8, 1, 8],
        [16, 1, 20],
      ],
    );
    assert.equal(json['input-bytes'], main.length);
    assertMatches(s, oracle([main], 4096));
  });

  it('several files and cluster sizes in one pass, crossing the 8 MiB chunk', () => {
    const extra = Buffer.concat([main.subarray(0, 64 * 1024), noise(3, 5000)]);
    writeFileSync(path('extra.raw'), extra);
    const { sizes, json } = estimateJson('--cluster-size', '64k,512,4k,2M', path('main.raw'), big, path('extra.raw'));
    assert.deepEqual(
      sizes.map((s) => s['cluster-size']),
      [512, 4096, 65536, 2097152],
    );
    assert.deepEqual(
      json.inputs.map((i: SizeJson) => [i.format, i['virtual-size']]),
      [
        ['raw', main.length],
        ['raw', 9 * 1024 * 1024],
        ['raw', extra.length],
      ],
    );
    const files = [main, readFileSync(big), extra];
    for (const s of sizes) assertMatches(s, oracle(files, s['cluster-size']));
  });

  it('human output: the zdb -S table', () => {
    const r = qdedup(['estimate', path('main.raw')]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stderr, '');
    const lines = r.stdout.split('\n');
    assert.match(lines[0], /main\.raw: raw, /);
    assert.ok(lines.includes('Simulated dedup table, cluster size 4096:'));
    assert.ok(
      lines.some((l) => /^refcnt\s+blocks\s+size\s+blocks\s+size$/.test(l)),
      r.stdout,
    );
    assert.ok(
      lines.some((l) => /^\s+16\s+1\s+4 KiB\s+20\s+80 KiB$/.test(l)),
      r.stdout,
    );
    assert.ok(
      lines.some((l) => /^ Total\s+107\s+428 KiB\s+145\s+580 KiB$/.test(l)),
      r.stdout,
    );
    assert.ok(lines.includes('dedup = 1.36, saved = 152 KiB (155648 bytes), zero clusters = 50 of 195'), r.stdout);
    // Noise does not compress: only the tail (1000 bytes and zero padding) shrinks.
    const c = compressionOracle([main], 4096);
    assert.equal(c.plain, 106);
    const ratio = (107 * 4096) / c.stored;
    const combined = (145 * 4096) / c.stored;
    const line = `compress = ${ratio.toFixed(2)}, dedup * compress = ${combined.toFixed(2)}, stored compressed = 425 KiB (${c.stored} bytes)`;
    assert.ok(lines.includes(line), `${line}\n${r.stdout}`);
    assert.ok(lines.includes('compressed all distinct clusters: 107 (428 KiB into 425 KiB), 106 stored plain'), r.stdout);
  });

  it('JSON shape: documented keys, in order', () => {
    const { json, sizes } = estimateJson(path('main.raw'));
    assert.deepEqual(Object.keys(json), ['inputs', 'input-bytes', 'refcount-bits', 'references-per-copy', 'cluster-sizes']);
    assert.deepEqual(Object.keys(json.inputs[0]), ['filename', 'format', 'virtual-size']);
    assert.equal(json['refcount-bits'], 16);
    assert.equal(json['references-per-copy'], 32766);
    assert.deepEqual(Object.keys(sizes[0]), [
      'cluster-size',
      'guest-clusters',
      'zero-clusters',
      'referenced-clusters',
      'allocated-clusters',
      'dedup-ratio',
      'bytes-saved',
      'cap-copies',
      'compression-ratio',
      'compressed-allocated-bytes',
      'combined-ratio',
      'compression-sample',
      'sample',
      'table-bytes',
      'histogram',
    ]);
    assert.deepEqual(Object.keys(sizes[0]['compression-sample']), ['sample', 'clusters', 'input-bytes', 'stored-bytes', 'plain-clusters']);
    assert.deepEqual(Object.keys(sizes[0].histogram[0]), ['refcnt', 'allocated-blocks', 'allocated-bytes', 'referenced-blocks', 'referenced-bytes']);
  });

  it('an empty file and an all-zero file: nothing allocated, ratio 1', () => {
    writeFileSync(path('empty.raw'), '');
    writeFileSync(path('zero.raw'), Buffer.alloc(100_000));
    const { sizes } = estimateJson(path('empty.raw'), path('zero.raw'));
    assert.deepEqual(
      [sizes[0]['guest-clusters'], sizes[0]['zero-clusters'], sizes[0]['allocated-clusters'], sizes[0]['dedup-ratio'], sizes[0].histogram],
      [25, 25, 0, 1, []],
    );
    assert.deepEqual(
      [sizes[0]['compression-ratio'], sizes[0]['compressed-allocated-bytes'], sizes[0]['combined-ratio'], sizes[0]['compression-sample']],
      [1, 0, 1, { sample: 1, clusters: 0, 'input-bytes': 0, 'stored-bytes': 0, 'plain-clusters': 0 }],
    );
  });
});

describe('estimate: memory bound and sampling', () => {
  // 4 MiB of distinct 512-byte clusters, each twice: 8192 contents, more than a 64 KiB table holds.
  const half = noise(11, 4 * 1024 * 1024);
  writeFileSync(path('twice.raw'), Buffer.concat([half, half]));

  it('past --max-memory the table samples, says so, and scales up', () => {
    const { sizes, r } = estimateJson('--cluster-size', '512', '--max-memory', '64k', path('twice.raw'));
    const s = sizes[0];
    assert.ok(s.sample > 1, `sampled: ${s.sample}`);
    assert.match(r.stderr, /^qdedup: note: the table for cluster size 512 would exceed --max-memory 64 KiB: sampled 1 in \d+ contents\n$/);
    assert.ok(s['table-bytes'] <= 64 * 1024, `table ${s['table-bytes']} bytes`);
    assert.equal(s['referenced-clusters'], 16384, 'references are counted exactly');
    assert.ok(Math.abs(s['allocated-clusters'] - 8192) <= 8192 * 5 * s['sample-error'], `allocated ${s['allocated-clusters']} ± ${s['sample-error']}`);
    assert.deepEqual(
      s.histogram.map((h: SizeJson) => h.refcnt),
      [2],
    );
    // -q: no note.
    assert.equal(qdedup(['estimate', '-q', '--cluster-size', '512', '--max-memory', '64k', path('twice.raw')]).stderr, '');
  });

  it('--sample N counts 1 in N from the start; the default budget keeps it exact', () => {
    const { sizes, r } = estimateJson('--cluster-size', '512', '--sample', '4', path('twice.raw'));
    assert.equal(sizes[0].sample, 4);
    assert.equal(r.stderr, '');
    assert.ok(Math.abs(sizes[0]['allocated-clusters'] - 8192) <= 8192 * 5 * sizes[0]['sample-error']);
    const exact = estimateJson('--cluster-size', '512', path('twice.raw')).sizes[0];
    assert.deepEqual([exact.sample, exact['allocated-clusters'], exact['dedup-ratio']], [1, 8192, 2]);
  });
});

describe('estimate equals what write -i stores', () => {
  /** create + write -i FILE IMG 0, then dedup-stats' figures. */
  function imported(file: string, size: number, ...createOpts: string[]) {
    const img = path(`imp-${Math.random().toString(36).slice(2)}.qcow2`);
    let r = qdedup(['create', '-q', ...createOpts, img, String(size)]);
    assert.equal(r.status, 0, r.stderr);
    r = qdedup(['write', '-q', '-i', file, img, '0']);
    assert.equal(r.status, 0, r.stderr);
    r = qdedup(['dedup-stats', '--output', 'json', img]);
    assert.equal(r.status, 0, r.stderr);
    return { img, stats: JSON.parse(r.stdout) };
  }

  it('allocated = data clusters, referenced = guest clusters (duplicates, zero runs, a partial cluster)', () => {
    const { stats } = imported(path('main.raw'), 2 * 1024 * 1024);
    const s = estimateJson(path('main.raw')).sizes[0];
    assert.equal(s['allocated-clusters'], stats['data-clusters']);
    assert.equal(s['referenced-clusters'], stats['guest-clusters']);
    assert.equal(s['bytes-saved'], stats['bytes-saved']);
  });

  it('at 512-byte clusters and across the chunk boundary', () => {
    const { stats } = imported(big, 9 * 1024 * 1024, '-o', 'cluster_size=512');
    const s = estimateJson('--cluster-size', '512', big).sizes[0];
    assert.deepEqual([s['allocated-clusters'], s['referenced-clusters']], [stats['data-clusters'], stats['guest-clusters']]);
  });

  it('the refcount cap: with 4-bit refcounts a copy takes 6 references, the 7th starts a new one', () => {
    const { stats } = imported(path('main.raw'), 2 * 1024 * 1024, '-o', 'refcount_bits=4');
    const { json, sizes } = estimateJson('--refcount-bits', '4', path('main.raw'));
    assert.equal(json['references-per-copy'], 6);
    // d×7 and e×8 need 2 copies, f×20 needs 4: 1 + 1 + 3 extra.
    assert.equal(sizes[0]['cap-copies'], 5);
    assertMatches(sizes[0], oracle([main], 4096, 6));
    assert.equal(sizes[0]['allocated-clusters'], stats['data-clusters']);
  });
});

describe('estimate of qcow2 inputs', { skip: NO_QEMU }, () => {
  it('a qcow2 image made by qemu-img/qemu-io (backing file, zero, compressed and unallocated clusters) = its raw equivalent', () => {
    const base = path('base.raw');
    writeFileSync(base, Buffer.concat([main.subarray(0, 256 * 1024), Buffer.alloc(256 * 1024), main.subarray(0, 512 * 1024)]));
    const img = path('made.qcow2');
    let r = run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', '-b', base, '-F', 'raw', img, '3M']);
    assert.equal(r.status, 0, r.stderr);
    for (const c of [
      'write -P 0x11 0 64k',
      'write -P 0x11 128k 64k',
      'write -z 256k 64k',
      'write -P 0x22 300k 10k',
      'write -c -P 0x33 1M 64k',
      'write -P 0x33 2M 64k',
      'write -P 0x11 2500k 4k',
    ]) {
      r = run('qemu-io', ['-f', 'qcow2', '-c', c, img]);
      assert.equal(r.status, 0, r.stderr);
    }
    const raw = path('made.raw');
    r = run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
    assert.equal(r.status, 0, r.stderr);
    const q = estimateJson('--cluster-size', '512,4k,64k', img);
    const p = estimateJson('--cluster-size', '512,4k,64k', raw);
    assert.equal(q.json.inputs[0].format, 'qcow2');
    assert.deepEqual(q.sizes, p.sizes);
    const bytes = readFileSync(raw);
    for (const s of q.sizes) assertMatches(s, oracle([bytes], s['cluster-size']));
    // -f raw reads the qcow2 file's own bytes instead; -U too.
    assert.equal(estimateJson('-f', 'raw', img).json.inputs[0].format, 'raw');
    assert.deepEqual(estimateJson('-U', '-f', 'qcow2', img).sizes[0], q.sizes[1]);
  });
});

describe('estimate: bad input is a one-line error, exit 1', () => {
  const fails = (args: string[], message: RegExp) => {
    const r = qdedup(['estimate', ...args]);
    assert.equal(r.status, 1, r.stderr);
    assert.equal(r.stdout, '');
    assert.match(r.stderr.split('\n')[0], message);
    assert.doesNotMatch(r.stderr, /\n\s+at |internal error/);
    assert.ok(r.stderr.split('\n').filter(Boolean).length <= 2, r.stderr); // the message (+ the --help hint for usage errors)
  };
  it('missing file, bad cluster size, unsupported format, bad sample', () => {
    fails([path('nope.raw')], /^qdedup: .*nope\.raw.*No such file or directory/);
    fails(['--cluster-size', '3000', path('main.raw')], /^qdedup: invalid cluster size 3000: a power of two from 512 to 2M$/);
    fails(['--cluster-size', '4M', path('main.raw')], /^qdedup: invalid cluster size 4194304/);
    fails(['--cluster-size', '4k,x', path('main.raw')], /^qdedup: invalid cluster size 'x'/);
    fails(['-f', 'vmdk', path('main.raw')], /^qdedup: unsupported image format 'vmdk' \(estimate reads raw and qcow2\)$/);
    fails(['-f', 'qcow2', path('main.raw')], /^qdedup: .*main\.raw/);
    fails(['--sample', '3', path('main.raw')], /^qdedup: invalid sample 3: a power of two/);
    fails(['--refcount-bits', '2', path('main.raw')], /^qdedup: invalid refcount width 2/);
    fails(['--compression-sample', '0', path('main.raw')], /^qdedup: invalid compression sample size 0: 1 byte or more$/);
    fails(['--compression-sample', 'x', path('main.raw')], /^qdedup: invalid compression sample size 'x'/);
    fails([dir], /Is a directory/);
    fails(['/dev/null'], /^qdedup: \/dev\/null: not a regular file or block device/);
    fails([], /Not enough non-option arguments/);
  });
});

describe('estimate: compression', () => {
  /** `size` bytes of text-like data: words of a small vocabulary, the same for the same seed. */
  function text(seed: number, size: number): Buffer {
    const words = ['qcow2', 'cluster', 'the', 'of', 'refcount', 'table', 'guest', 'host', 'snapshot', 'deflate', 'a', 'image', 'backing'];
    let x = (seed * 2654435761) >>> 0 || 1;
    let t = '';
    while (t.length < size) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      x >>>= 0;
      t += words[x % words.length] + (x % 11 === 0 ? '\n' : x % 7 === 0 ? `, ${x % 1000} ` : ' ');
    }
    return Buffer.from(t.slice(0, size));
  }
  // 40 text blocks, 20 noise blocks, 10 half text half noise, repeats of each kind, a zero run, a partial text tail.
  const blocks: Buffer[] = [];
  for (let i = 0; i < 40; i++) blocks.push(text(i + 1, BLOCK));
  for (let i = 0; i < 20; i++) blocks.push(noise(500 + i, BLOCK));
  for (let i = 0; i < 10; i++) blocks.push(Buffer.concat([text(100 + i, BLOCK / 2), noise(600 + i, BLOCK / 2)]));
  for (let i = 0; i < 5; i++) blocks.push(text(1, BLOCK), noise(500, BLOCK));
  blocks.push(Buffer.alloc(16 * BLOCK), text(200, 1500));
  const mixed = Buffer.concat(blocks);
  writeFileSync(path('mixed.raw'), mixed);

  it('every distinct cluster compressed: the ratio node:zlib gives over the same clusters, at 512, 4k and 64k', () => {
    const { sizes } = estimateJson('--cluster-size', '512,4k,64k', path('mixed.raw'));
    for (const s of sizes) {
      const cs = s['cluster-size'];
      const o = compressionOracle([mixed], cs);
      const dedup = oracle([mixed], cs);
      assert.equal(s['allocated-clusters'], o.clusters, `${cs}: no cap copies`);
      assert.deepEqual(s['compression-sample'], {
        sample: 1,
        clusters: o.clusters,
        'input-bytes': o.input,
        'stored-bytes': o.stored,
        'plain-clusters': o.plain,
      });
      assert.equal(s['compression-ratio'], Math.round((o.input / o.stored) * 10000) / 10000, `${cs}: ratio`);
      assert.equal(s['compressed-allocated-bytes'], o.stored, `${cs}: the sample is every allocated cluster`);
      assert.equal(s['combined-ratio'], Math.round(((dedup.referenced * cs) / o.stored) * 10000) / 10000);
      assert.ok(s['compression-ratio'] > 1.3, `${cs}: text compresses (${s['compression-ratio']})`);
    }
    // At 4 KiB: the 20 noise blocks are stored plain, the text and half-text ones compressed.
    assert.equal(sizes[1]['compression-sample']['plain-clusters'], 20);
  });

  it('predicts what convert -c stores: the streams and plain clusters the file then holds', () => {
    const s = estimateJson(path('mixed.raw')).sizes[0];
    const img = path('mixed-c.qcow2');
    const r = qdedup(['convert', '-q', '-c', '-f', 'raw', path('mixed.raw'), img]);
    assert.equal(r.status, 0, r.stderr);
    const stats = JSON.parse(qdedup(['dedup-stats', '--output', 'json', img]).stdout);
    const c = s['compression-sample'];
    const streams = s['allocated-clusters'] - c['plain-clusters'];
    assert.equal(stats.compressed.copies, streams, 'one compressed copy per distinct compressible cluster');
    // The file's data clusters hold exactly the predicted bytes, plus an 8-byte frame per copy
    // and the unused tail of the run's last cluster (one chunk: one run of copies).
    const stored = stats['data-clusters'] * BLOCK;
    const predicted = s['compressed-allocated-bytes'] + 8 * streams;
    assert.ok(stored >= predicted && stored < predicted + BLOCK, `${stored} bytes stored, ${predicted} predicted (with frames)`);
  });

  it('incompressible data: every cluster stored plain, ratio 1', () => {
    writeFileSync(path('noise.raw'), Buffer.concat([noise(77, 64 * BLOCK), noise(77, 64 * BLOCK)]));
    const s = estimateJson(path('noise.raw')).sizes[0];
    assert.deepEqual(s['compression-sample'], { sample: 1, clusters: 64, 'input-bytes': 64 * BLOCK, 'stored-bytes': 64 * BLOCK, 'plain-clusters': 64 });
    assert.deepEqual([s['compression-ratio'], s['compressed-allocated-bytes'], s['dedup-ratio'], s['combined-ratio']], [1, 64 * BLOCK, 2, 2]);
  });

  it('--compression-sample: 1 in N distinct contents by hash (bytes 8–11 ≡ 0 mod N), scaled to all', () => {
    const run = () => estimateJson('--compression-sample', '64k', path('mixed.raw')).sizes[0];
    const s = run();
    const c = s['compression-sample'];
    // 16 contents at most: the smallest power of two N that keeps no more.
    const word = (h: Buffer) => h.readUInt32LE(8);
    const hashes = [...distinctClusters([mixed], BLOCK).keys()].map((k) => Buffer.from(k, 'hex'));
    let n = 1;
    while (hashes.filter((h) => word(h) % n === 0).length > 16) n *= 2;
    assert.ok(n > 1);
    const o = compressionOracle([mixed], BLOCK, (h) => word(h) % n === 0);
    assert.deepEqual(c, { sample: n, clusters: o.clusters, 'input-bytes': o.input, 'stored-bytes': o.stored, 'plain-clusters': o.plain });
    assert.equal(s['compression-ratio'], Math.round((o.input / o.stored) * 10000) / 10000);
    assert.equal(s['compressed-allocated-bytes'], Math.round((s['allocated-clusters'] * BLOCK * o.stored) / o.input));
    assert.deepEqual(run(), s, 'deterministic');
    // The human output says it sampled.
    const r = qdedup(['estimate', '--compression-sample', '64k', path('mixed.raw')]);
    assert.match(
      r.stdout,
      new RegExp(`^compressed 1 in ${n} distinct clusters: ${o.clusters} \\(${o.clusters * 4} KiB into [0-9.]+ KiB\\), ${o.plain} stored plain$`, 'm'),
    );
  });
});
