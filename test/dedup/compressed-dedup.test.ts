// Compressed dedup images (`-c` into a dedup image: src/dedup/compressed-copies.ts): unique
// clusters stored as framed deflate streams, duplicates linked to them. QEMU is the oracle:
// qemu-img compare finds the guest bytes, qemu-img check finds no error and no leak (the holder
// holds the runs), qemu-io reads and writes over shared compressed clusters; `check --deep`
// finds every index entry true, also after overwrites released streams (hashes deleted before
// their clusters were freed: I2) and after QEMU wrote into the image.

import { describe, it, before } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { dedupOf, openForWrite } from '../../src/dedup/open.ts';
import { NO_QEMU, qdedup, qemuCheck, qemuCompareRaw, run, tempDir } from '../helpers.ts';

const CS = 4096;
const HAVE_MKFS = spawnSync('mkfs.ext4', ['-V'], { stdio: 'ignore' }).status === 0;
const dir = tempDir('qdedup-cdedup-');

/** Text-like cluster `k` (compressible, distinct per k). */
function textCluster(k: number): Buffer {
  let s = '';
  for (let i = 0; s.length < CS; i++) s += `record ${k}.${i}: ${((k * 7919 + i * 104729) % 1000003).toString(36)} ok\n`;
  return Buffer.from(s.slice(0, CS), 'latin1');
}

/**
 * 6 MiB: 600 distinct text clusters, each written twice or three times at scattered places,
 * random (incompressible) clusters, and zeros.
 */
function sample(): Buffer {
  const clusters: Buffer[] = [];
  for (let k = 0; k < 600; k++) clusters.push(textCluster(k));
  for (let k = 0; k < 600; k++) clusters.push(textCluster((k * 37) % 600));
  for (let k = 0; k < 100; k++) clusters.push(randomBytes(CS));
  for (let k = 0; k < 100; k++) clusters.push(Buffer.alloc(CS));
  for (let k = 0; k < 136; k++) clusters.push(textCluster((k * 11) % 600));
  return Buffer.concat(clusters);
}

function checkDeep(path: string): { dedup: Record<string, number> } {
  const r = qdedup(['check', '--deep', '--output', 'json', path]);
  assert.equal(r.status, 0, `qdedup check --deep: ${r.stdout.slice(0, 400)}${r.stderr}`);
  const j = JSON.parse(r.stdout);
  assert.equal(j.dedup['bad-entries'], 0);
  return j;
}

function clean(path: string): void {
  const q = qemuCheck(path);
  assert.equal(q.status, 0, `qemu-img check: ${q.stderr}`);
  assert.equal(q.json!.leaks ?? 0, 0);
  checkDeep(path);
}

/** Guest clusters → their L2 entries (kind, where), through qdedup's engine. */
async function entries(path: string): Promise<{ kind: string; at: number }[]> {
  const img = await Image.open(path);
  try {
    const out = [];
    for (let g = 0; g < img.size / CS; g++) {
      const e = await img.entry(g);
      out.push({ kind: e.kind, at: e.kind === 'compressed' ? e.compressedOffset : e.hostOffset });
    }
    return out;
  } finally {
    await img.close();
  }
}

describe('compressed dedup images', { skip: NO_QEMU }, () => {
  const raw = join(dir, 'src.raw');
  let data: Buffer;
  before(() => {
    data = sample();
    writeFileSync(raw, data);
  });

  it('convert -c: identical, clean, duplicates share one compressed copy, smaller than dedup or compression alone', async () => {
    const both = join(dir, 'both.qcow2');
    const r = qdedup(['convert', '-c', raw, both]);
    assert.equal(r.status, 0, r.stderr);
    assert.ok(qemuCompareRaw(both, raw));
    clean(both);
    const e = await entries(both);
    // Every repeat of a text cluster names the same stream as its first occurrence.
    const streamOf = new Map<string, number>();
    let shared = 0;
    for (let g = 0; g < e.length; g++) {
      const key = data.subarray(g * CS, (g + 1) * CS).toString('latin1');
      if (e[g].kind === 'zero') continue;
      const seen = streamOf.get(key);
      if (seen === undefined) streamOf.set(key, e[g].at);
      else {
        assert.equal(e[g].at, seen, `guest cluster ${g} repeats content stored at ${seen}`);
        shared++;
      }
    }
    assert.ok(shared >= 700, `${shared} shared`);
    assert.ok(e.filter((x) => x.kind === 'compressed').length >= 1300, 'text clusters are compressed');
    assert.ok(e.filter((x) => x.kind === 'normal').length >= 100, 'random clusters stay whole');
    // dedup-stats counts them: guest entries, distinct copies, bytes before and after compression.
    const stats = JSON.parse(qdedup(['dedup-stats', '--output', 'json', both]).stdout);
    const compressed = e.filter((x) => x.kind === 'compressed');
    assert.equal(stats.compressed.clusters, compressed.length);
    assert.equal(stats.compressed.copies, new Set(compressed.map((x) => x.at)).size);
    assert.equal(stats.compressed['bytes-before'], stats.compressed.copies * CS);
    assert.ok(stats.compressed['bytes-after'] < stats.compressed['bytes-before'] / 1.5, JSON.stringify(stats.compressed));
    const dedupOnly = join(dir, 'dedup.qcow2');
    const compressOnly = join(dir, 'compress.qcow2');
    assert.equal(qdedup(['convert', raw, dedupOnly]).status, 0);
    assert.equal(qdedup(['convert', '-c', '-o', 'dedup=off,cluster_size=4k', raw, compressOnly]).status, 0);
    const [b, d, c] = [both, dedupOnly, compressOnly].map((p) => statSync(p).size);
    assert.ok(b < d && b < c, `both ${b}, dedup alone ${d}, compression alone ${c}`);
  });

  it('overwrites release compressed copies: hashes gone before the free, no leak; rewriting finds them again', () => {
    const img = join(dir, 'over.qcow2');
    assert.equal(qdedup(['convert', '-c', raw, img]).status, 0);
    // Plain over the first half (each text cluster there loses one reference: some streams die).
    assert.equal(qdedup(['write', '-q', '-P', '0x5c', img, '0', String(300 * CS)]).status, 0);
    const now = Buffer.from(data);
    now.fill(0x5c, 0, 300 * CS);
    writeFileSync(raw + '.now', now);
    assert.ok(qemuCompareRaw(img, raw + '.now'));
    clean(img);
    // Compressed over everything: the same contents again (links to surviving streams, new ones for the rest).
    assert.equal(qdedup(['write', '-q', '-c', '-i', raw, img, '0']).status, 0);
    assert.ok(qemuCompareRaw(img, raw));
    clean(img);
    // Zeros over all: every stream dies, every run cluster is freed.
    assert.equal(qdedup(['write', '-q', '-z', img, '0', String(data.length)]).status, 0);
    const j = checkDeep(img);
    assert.equal(j.dedup['entries-checked'], 0, 'no entry left');
    clean(img);
  });

  it('QEMU writes into a compressed dedup image, then qdedup again: both read the same, clean', () => {
    const img = join(dir, 'qemu.qcow2');
    const past = data.length; // QEMU writes compressed clusters only where none is allocated
    assert.equal(qdedup(['create', '-q', img, String(past + 65536)]).status, 0);
    assert.equal(qdedup(['convert', '-n', '-c', raw, img]).status, 0);
    // QEMU rewrites parts of shared compressed clusters (copy on write) and adds compressed clusters of its own.
    assert.equal(run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x21 10000 30000', '-c', `write -c -P 0x22 ${past} 64k`, img]).status, 0);
    const now = Buffer.concat([data, Buffer.alloc(65536, 0x22)]);
    now.fill(0x21, 10000, 40000);
    // qdedup: the index is no longer trusted (bit 60 cleared by QEMU) and rebuilt; writes go on.
    const w = qdedup(['write', '-c', '-i', raw, img, String(2 * 1024 * 1024), String(1024 * 1024)]);
    assert.equal(w.status, 0, w.stderr);
    assert.match(w.stderr, /dedup index not trusted/);
    data.copy(now, 2 * 1024 * 1024, 0, 1024 * 1024); // write -i INPUT IMG 2M 1M: the first MiB of INPUT
    writeFileSync(raw + '.q', now);
    assert.ok(qemuCompareRaw(img, raw + '.q'));
    clean(img);
    assert.equal(run('qemu-io', ['-f', 'qcow2', '-c', `read -P 0x22 ${past} 64k`, img]).status, 0);
  });

  it('a new session trusts and links to the compressed copies; verify mode compares them', () => {
    const img = join(dir, 'again.qcow2');
    assert.equal(qdedup(['create', '-q', '-o', 'dedup=sha256,dedup_verify=on', img, String(2 * data.length)]).status, 0);
    assert.equal(qdedup(['write', '-q', '-c', '-i', raw, img, '0']).status, 0);
    const before = statSync(img).size;
    const second = qdedup(['write', '-c', '-i', raw, img, String(data.length)]);
    assert.equal(second.status, 0, second.stderr);
    assert.doesNotMatch(second.stderr, /not trusted/);
    const grew = statSync(img).size - before;
    assert.ok(grew < data.length / 20, `a second copy of the data grew the file by ${grew} bytes`);
    writeFileSync(raw + '.2', Buffer.concat([data, data]));
    assert.ok(qemuCompareRaw(img, raw + '.2'));
    clean(img);
    const stats = JSON.parse(qdedup(['dedup-stats', '--output', 'json', img]).stdout);
    assert.equal(stats.trusted, true);
  });

  it('create -o compression=on: every later write compresses without -c; info says so; it needs dedup', () => {
    const img = join(dir, 'default.qcow2');
    assert.equal(qdedup(['create', '-q', '-o', 'compression=on', img, String(data.length)]).status, 0);
    const info = JSON.parse(qdedup(['info', '--output', 'json', img]).stdout);
    assert.equal(info['format-specific'].data.dedup.compression, true);
    assert.match(qdedup(['info', img]).stdout, /compression: on/);
    assert.equal(qdedup(['write', '-q', '-i', raw, img, '0']).status, 0);
    assert.ok(qemuCompareRaw(img, raw));
    const q = qemuCheck(img);
    assert.equal(q.status, 0, q.stderr);
    assert.ok(Number(q.json!['compressed-clusters']) >= 600, 'written compressed without -c');
    clean(img);
    const plain = qdedup(['create', '-q', '-o', 'dedup=off,compression=on', join(dir, 'x.qcow2'), '1M']);
    assert.equal(plain.status, 1);
    assert.match(plain.stderr, /'compression' needs dedup on/);
    assert.doesNotMatch(qdedup(['info', join(dir, 'both.qcow2')]).stdout, /compression: on/, 'convert -c alone sets no default');
  });

  it('the refcount cap holds on every cluster a compressed copy touches: past it, a new copy', async () => {
    const img = join(dir, 'cap.qcow2');
    assert.equal(qdedup(['create', '-q', img, '1M']).status, 0);
    const image = await openForWrite(img, { compress: true });
    dedupOf(image)!.cap = 4; // the holder's reference and three guests' per copy
    const same = Buffer.concat(Array.from({ length: 20 }, () => textCluster(7)));
    await image.write(0, same);
    await image.close();
    const e = (await entries(img)).slice(0, 20);
    assert.ok(e.every((x) => x.kind === 'compressed'));
    const copies = new Map<number, number>();
    for (const x of e) copies.set(x.at, (copies.get(x.at) ?? 0) + 1);
    assert.equal(copies.size, 7, `copies: ${[...copies.values()]}`);
    assert.ok([...copies.values()].every((n) => n <= 3));
    const zeros = Buffer.alloc(1024 * 1024 - same.length);
    writeFileSync(raw + '.cap', Buffer.concat([same, zeros]));
    assert.ok(qemuCompareRaw(img, raw + '.cap'));
    clean(img);
  });

  it(
    'an ext4 filesystem of generated files (repeated and compressible) through convert -c',
    { skip: HAVE_MKFS ? false : 'mkfs.ext4 not installed (e2fsprogs)' },
    () => {
      const tree = join(dir, 'tree');
      mkdirSync(join(tree, 'docs'), { recursive: true });
      mkdirSync(join(tree, 'copies'), { recursive: true });
      for (let f = 0; f < 40; f++) {
        const text = Buffer.concat(Array.from({ length: 3 + (f % 5) }, (_, k) => textCluster(f * 10 + k)));
        writeFileSync(join(tree, 'docs', `doc${f}.txt`), text);
        if (f % 3 === 0) writeFileSync(join(tree, 'copies', `doc${f}.copy`), text); // repeated files
      }
      writeFileSync(join(tree, 'random.bin'), randomBytes(300 * 1024)); // incompressible
      const fs = join(dir, 'fs.raw');
      writeFileSync(fs, Buffer.alloc(0));
      assert.equal(run('truncate', ['-s', '16M', fs]).status, 0);
      const mk = run('mkfs.ext4', ['-q', '-d', tree, fs]);
      assert.equal(mk.status, 0, mk.stderr);
      const both = join(dir, 'fs-both.qcow2');
      const plain = join(dir, 'fs-dedup.qcow2');
      assert.equal(qdedup(['convert', '-c', fs, both]).status, 0);
      assert.equal(qdedup(['convert', fs, plain]).status, 0);
      assert.ok(qemuCompareRaw(both, fs));
      clean(both);
      assert.ok(statSync(both).size < statSync(plain).size * 0.7, `${statSync(both).size} against dedup alone ${statSync(plain).size}`);
    },
  );

  it('the file QEMU sees is the one qemu-img map describes: compressed clusters, no data offsets for them', () => {
    const img = join(dir, 'both.qcow2');
    const map = JSON.parse(run('qemu-img', ['map', '--output=json', '-f', 'qcow2', img]).stdout) as { data: boolean; offset?: number; compressed?: boolean }[];
    assert.ok(
      map.some((m) => m.data && m.offset === undefined),
      'compressed ranges have no host offset',
    );
    assert.ok(readFileSync(img).length > 0);
  });
});
