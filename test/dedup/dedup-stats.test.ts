// `qdedup dedup-stats` and the `dedup` section of `qdedup info`, through the real CLI
// (bin/qdedup, so run `npm run build` first): the exact accounting (one
// MiB written at ten offsets: 256 data clusters for 2560 guest clusters, and a file no
// bigger than the data plus the clusters the figures name), unique data at ratio 1, plain
// images ("off", sharing made by snapshots still counted), untrusted stores (store figures
// 0, with the reason), a tiny store through freezes and FIFO, the JSON shape, errors, and
// that neither command changes a byte of the image.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { decodeHeader } from '../../src/format/header.ts';
import { AUTOCLEAR_DEDUP, EXT_DEDUP, decodeDedupConfig, decodeDedupExtension } from '../../src/format/dedup-ext.ts';
import { NO_QEMU, qdedup, qemuCheck, run } from '../helpers.ts';
import { sha256File, workFolder } from './cli-lib.ts';

const { dir, create, randomFile } = workFolder('qdedup-stats-');
const MiB = 1024 * 1024;
const sha256 = sha256File;
let serial = 0;

function write(file: string, input: string, offset: number): void {
  const r = qdedup(['write', '-q', '-i', input, file, String(offset)]);
  assert.equal(r.status, 0, r.stderr);
}

function stats(file: string): Record<string, any> {
  const r = qdedup(['dedup-stats', '--output', 'json', file]);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stderr, '');
  return JSON.parse(r.stdout);
}

/** The header fields the size bound needs, read from the file. */
function layout(file: string) {
  const bytes = readFileSync(file);
  const h = decodeHeader(bytes.subarray(0, 1 << Math.min(21, bytes.readUInt32BE(20))));
  const cs = 2 ** h.clusterBits;
  const nonZero = (offset: number, entries: number) => {
    let n = 0;
    for (let i = 0; i < entries; i++) if (bytes.readBigUInt64BE(offset + i * 8) & 0x00ff_ffff_ffff_fe00n) n++;
    return n;
  };
  return {
    header: h,
    clusterSize: cs,
    refcountTableClusters: h.refcountTableClusters,
    refcountBlocks: nonZero(h.refcountTableOffset, (h.refcountTableClusters * cs) / 8),
    l1Clusters: Math.ceil((h.l1Size * 8) / cs),
    l2Tables: nonZero(h.l1TableOffset, h.l1Size),
  };
}

const KEYS = [
  'virtual-size',
  'cluster-size',
  'hash-algorithm',
  'trusted',
  'dirty',
  'guest-clusters',
  'data-clusters',
  'shared-clusters',
  'dedup-ratio',
  'bytes-saved',
  'compressed',
  'metadata-clusters',
  'holder-clusters',
  'index-entries',
  'index-ram-bytes',
  'log-store',
  'incarnations',
  'limbo',
  'journal',
];

test('exact accounting: the same 1 MiB at 10 offsets of a 4 KiB-cluster image is stored once', () => {
  const img = create('64M', 'cluster_size=4k');
  const input = randomFile(MiB);
  // Offsets 3 MiB apart: ten distinct L2 tables' worth of guest space, one of them unaligned to 2 MiB.
  const offsets = Array.from({ length: 10 }, (_, i) => i * 3 * MiB);
  for (const o of offsets) write(img, input.path, o);

  const s = stats(img);
  assert.deepEqual(Object.keys(s), KEYS, 'the documented keys, in order');
  assert.equal(s['hash-algorithm'], 'sha256');
  assert.equal(s['cluster-size'], 4096);
  assert.equal(s['virtual-size'], 64 * MiB);
  assert.equal(s.trusted, true);
  assert.equal(s.dirty, false);
  assert.equal(s['data-clusters'], 256);
  assert.equal(s['guest-clusters'], 2560);
  assert.equal(s['dedup-ratio'], 10);
  assert.equal(s['shared-clusters'], 256, 'every data cluster has ten guest references');
  assert.equal(s['bytes-saved'], 9 * MiB);
  assert.equal(s['index-entries'], 256);
  assert.ok(s['metadata-clusters'] > 0);
  assert.ok(s['holder-clusters'] >= 2, 'holder L1 and at least one holder L2 table');
  assert.ok(s['index-ram-bytes'] > 0);
  assert.ok(s.journal['blocks-used'] >= 1 && s.journal['blocks-used'] <= s.journal['blocks-total']);

  // The size bound, honestly: every cluster of the file is one of the 256 data clusters, a
  // cluster the store owns (metadata-clusters), a holder table (holder-clusters), or one of
  // the fixed QCOW2 clusters: the header, the refcount table and its blocks, the active L1
  // table, the active L2 tables, the snapshot table (one cluster: a single holder entry).
  const l = layout(img);
  const fixed = 1 + l.refcountTableClusters + l.refcountBlocks + l.l1Clusters + l.l2Tables + 1;
  assert.equal(l.l2Tables, 10, 'the ten copies use ten L2 tables');
  const bound = (s['data-clusters'] + s['metadata-clusters'] + s['holder-clusters'] + fixed) * 4096;
  const size = statSync(img).size;
  assert.ok(
    size <= bound,
    `file ${size} bytes > bound ${bound} (1 MiB of data + ${s['metadata-clusters']} metadata + ${s['holder-clusters']} holder + ${fixed} fixed clusters)`,
  );
  assert.ok(size <= MiB + (s['metadata-clusters'] + s['holder-clusters'] + fixed) * 4096);

  // Every copy reads back (one read of the whole range).
  const r = qdedup(['read', img, '0', String(28 * MiB)]);
  assert.equal(r.status, 0, r.stderr);
  for (const o of offsets) assert.ok(r.stdoutBytes.subarray(o, o + MiB).equals(input.data), `copy at ${o}`);
  if (!NO_QEMU) {
    const q = qemuCheck(img);
    assert.equal(q.status, 0, `qemu-img check: ${JSON.stringify(q.json)} ${q.stderr}`);
    assert.equal(q.json?.leaks ?? 0, 0, "qemu-img check: the holder holds the store's clusters");
  }
});

test('unique data: ratio 1, nothing shared, nothing saved', () => {
  const img = create('16M');
  const input = randomFile(2 * MiB);
  write(img, input.path, 0);
  const s = stats(img);
  assert.equal(s['guest-clusters'], 512);
  assert.equal(s['data-clusters'], 512);
  assert.equal(s['dedup-ratio'], 1);
  assert.equal(s['shared-clusters'], 0, "the holder's reference is not counted");
  assert.equal(s['bytes-saved'], 0);
  assert.equal(s['index-entries'], 512);
});

test('an empty dedup image: ratio 1, no data clusters', () => {
  const img = create('1G');
  const s = stats(img);
  assert.equal(s['guest-clusters'], 0);
  assert.equal(s['data-clusters'], 0);
  assert.equal(s['dedup-ratio'], 1);
  assert.equal(s.trusted, true);
  assert.ok(s['metadata-clusters'] > 0);
});

test('plain image: hash-algorithm "off", store figures 0, and shared clusters made by a snapshot', () => {
  const img = create('16M', 'dedup=off,cluster_size=4k');
  const input = randomFile(MiB);
  write(img, input.path, 0);
  write(img, input.path, 4 * MiB);
  let s = stats(img);
  assert.deepEqual(Object.keys(s), KEYS);
  assert.equal(s['hash-algorithm'], 'off');
  assert.equal(s.trusted, false);
  assert.equal(s.dirty, false);
  assert.equal(s['guest-clusters'], 512);
  assert.equal(s['data-clusters'], 512, 'no dedup: two copies, two sets of clusters');
  assert.equal(s['dedup-ratio'], 1);
  assert.equal(s['shared-clusters'], 0);
  for (const k of ['metadata-clusters', 'holder-clusters', 'index-entries', 'index-ram-bytes', 'limbo']) assert.equal(s[k], 0, k);
  assert.deepEqual(s['log-store'], { entries: 0, capacity: 0 });
  assert.deepEqual(s.incarnations, { count: 0, max: 0 });
  assert.deepEqual(s.journal, { 'blocks-used': 0, 'blocks-total': 0 });
  if (NO_QEMU) return;
  const snap = run('qemu-img', ['snapshot', '-c', 'before', img]);
  assert.equal(snap.status, 0, snap.stderr);
  s = stats(img);
  assert.equal(s['shared-clusters'], 512, 'a snapshot shares every data cluster');
  assert.equal(s['dedup-ratio'], 1);
});

test('untrusted stores: store figures 0 and the reason; a dirty flag is reported', { skip: NO_QEMU }, () => {
  const img = create('16M');
  const input = randomFile(MiB);
  write(img, input.path, 0);
  write(img, input.path, MiB);
  const before = stats(img);
  assert.equal(before.trusted, true);

  // A foreign writer (qemu-io) clears autoclear bit 60.
  const foreign = join(dir, `foreign-${++serial}.qcow2`);
  writeFileSync(foreign, readFileSync(img));
  const w = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 8M 64k', foreign]);
  assert.equal(w.status, 0, w.stderr);
  const s = stats(foreign);
  assert.deepEqual(Object.keys(s), [...KEYS.slice(0, 4), 'reason', ...KEYS.slice(4)], 'reason comes right after trusted');
  assert.equal(s.trusted, false);
  assert.match(s.reason, /autoclear bit 60 is clear/);
  assert.equal(s['hash-algorithm'], 'sha256');
  for (const k of ['metadata-clusters', 'index-entries', 'index-ram-bytes', 'limbo']) assert.equal(s[k], 0, k);
  assert.equal(s['log-store'].entries, 0);
  assert.equal(s.incarnations.count, 0);
  assert.deepEqual(s.journal, { 'blocks-used': 0, 'blocks-total': 0 });
  assert.equal(s['holder-clusters'], before['holder-clusters'], 'the holder snapshot is still there');
  assert.equal(s['guest-clusters'], before['guest-clusters'] + 16);
  assert.equal(s['data-clusters'], before['data-clusters'] + 16);
  assert.equal(s['shared-clusters'], 256);

  // The dirty flag of the extension (a crash): byte 2 bit 0 of its payload.
  const dirty = join(dir, `dirty-${++serial}.qcow2`);
  const bytes = readFileSync(img);
  const payload = extensionPayloadOffset(bytes);
  bytes[payload + 2] |= 1;
  writeFileSync(dirty, bytes);
  const d = stats(dirty);
  assert.equal(d.trusted, false);
  assert.equal(d.dirty, true);
  assert.match(d.reason, /dedup dirty flag set/);
  const human = qdedup(['dedup-stats', dirty]);
  assert.equal(human.status, 0);
  assert.match(human.stdout, /^trusted: +false \(the image was not closed cleanly/m);

  // A torn journal block (checksum mismatch): untrusted for dedup-stats, info and the next write alike.
  const torn = join(dir, `torn-${++serial}.qcow2`);
  const tb = readFileSync(img);
  tb[currentJournalOffset(tb) + 100] ^= 0x40;
  writeFileSync(torn, tb);
  const t = stats(torn);
  assert.equal(t.trusted, false);
  assert.match(t.reason, /^journal [01] block 0 is damaged \(checksum mismatch/);
  assert.equal(t['metadata-clusters'], 0);
  const ti = JSON.parse(qdedup(['info', '--output', 'json', torn]).stdout)['format-specific'].data.dedup;
  assert.equal(ti.trusted, false);
  assert.equal(ti.reason, t.reason);
  const c = qdedup(['check', '--output', 'json', torn]);
  assert.equal(c.status, 0, 'its clusters stay held by the holder snapshot: no leak');
  assert.equal(JSON.parse(c.stdout).leaks, undefined);
  assert.ok(before['metadata-clusters'] > 0);
  const tw = qdedup(['write', '-P', '7', torn, '12M', '4k']); // not -q: -q silences the notice
  assert.equal(tw.status, 0, tw.stderr);
  assert.ok(tw.stderr.includes(`dedup index not trusted: ${t.reason}`), `the write path gives the same reason: ${tw.stderr}`);
});

test('a tiny store through freezes, FIFO and limbo: figures agree with the workload and with qemu-img', () => {
  // Order 2: log stores of 16 slots; at most 2 incarnations, older ones go to limbo.
  const img = create('16M', 'dedup_order=2,dedup_max_incarnations=2');
  const input = randomFile(MiB); // 256 distinct clusters
  write(img, input.path, 0);
  write(img, input.path, 2 * MiB); // all hits for what the index still knows
  const s = stats(img);
  assert.equal(s.trusted, true);
  assert.deepEqual(s['log-store'].capacity, 16);
  assert.equal(s.incarnations.max, 2);
  assert.equal(s.incarnations.count, 2, 'the FIFO keeps 2');
  assert.ok(s.limbo >= 1, `limbo ${s.limbo}: forgotten incarnations' areas`);
  assert.ok(s['index-entries'] <= 4 * 16, 'at most two incarnations and two log stores');
  assert.equal(s['guest-clusters'], 512);
  assert.ok(s['data-clusters'] >= 256 && s['data-clusters'] < 512, `data ${s['data-clusters']}: copies of forgotten hashes are stored again`);
  assert.equal(s['dedup-ratio'], Math.round((512 / s['data-clusters']) * 1e4) / 1e4);
  assert.equal(s['bytes-saved'], (512 - s['data-clusters']) * 4096);
  if (!NO_QEMU) {
    const q = qemuCheck(img);
    assert.equal(q.status, 0, `qemu-img check: ${JSON.stringify(q.json)} ${q.stderr}`);
    assert.equal(q.json?.leaks ?? 0, 0);
  }
});

test('human output: aligned "key: value" lines in the order of the JSON keys', () => {
  const img = create('64M');
  const input = randomFile(64 * 1024);
  write(img, input.path, 0);
  write(img, input.path, MiB);
  const r = qdedup(['dedup-stats', img]);
  assert.equal(r.status, 0, r.stderr);
  const lines = r.stdout.trimEnd().split('\n');
  const labels = lines.map((l) => l.slice(0, l.indexOf(':')));
  assert.deepEqual(labels, [
    'image',
    'virtual size',
    'cluster size',
    'hash algorithm',
    'trusted',
    'dirty',
    'guest clusters',
    'data clusters',
    'shared clusters',
    'dedup ratio',
    'bytes saved',
    'compressed',
    'metadata clusters',
    'holder clusters',
    'index entries',
    'index RAM',
    'log store',
    'incarnations',
    'limbo',
    'journal',
  ]);
  const column = lines.map((l) => l.search(/:\s+\S/) + l.slice(l.indexOf(':') + 1).search(/\S/) + 1);
  assert.ok(
    column.every((c) => c === column[0]),
    `values aligned: ${r.stdout}`,
  );
  assert.match(r.stdout, /^virtual size: +64 MiB \(67108864 bytes\)$/m);
  assert.match(r.stdout, /^dedup ratio: +2\.00$/m);
  assert.match(r.stdout, /^bytes saved: +64 KiB \(65536 bytes\)$/m);
  assert.match(r.stdout, /^incarnations: +0 \(max: unlimited\)$/m);
});

test('info: a "dedup" object in format-specific data, and a nested human block', () => {
  const img = create('64M', 'dedup=blake3,dedup_verify=on,dedup_max_incarnations=3,dedup_order=6,dedup_journal_block=1k');
  const j = qdedup(['info', '--output', 'json', img]);
  assert.equal(j.status, 0, j.stderr);
  const info = JSON.parse(j.stdout);
  assert.deepEqual(info['format-specific'].data.dedup, {
    algorithm: 'blake3',
    verify: true,
    trusted: true,
    dirty: false,
    order: 6,
    'journal-block-size': 1024,
    'max-incarnations': 3,
  });
  const h = qdedup(['info', img]);
  assert.equal(h.status, 0, h.stderr);
  assert.match(
    h.stdout,
    /\n {4}extended l2: false\n {4}dedup:\n {8}algorithm: blake3\n {8}verify: true\n {8}trusted: true\n {8}dirty: false\n {8}order: 6\n {8}journal block size: 1024\n {8}max incarnations: 3\n$/,
  );

  const plain = create('1M', 'dedup=off');
  const p = JSON.parse(qdedup(['info', '--output', 'json', plain]).stdout);
  assert.equal(p['format-specific'].data.dedup, undefined, 'plain images have no dedup object');

  // An untrusted store says why.
  const bytes = readFileSync(img);
  bytes.writeBigUInt64BE(bytes.readBigUInt64BE(88) & ~AUTOCLEAR_DEDUP, 88);
  const cleared = join(dir, `cleared-${++serial}.qcow2`);
  writeFileSync(cleared, bytes);
  const u = JSON.parse(qdedup(['info', '--output', 'json', cleared]).stdout)['format-specific'].data.dedup;
  assert.equal(u.trusted, false);
  assert.match(u.reason, /autoclear bit 60 is clear/);
  assert.match(qdedup(['info', cleared]).stdout, /\n {8}trusted: false\n {8}reason: dedup autoclear bit 60 is clear/);
});

test('--help: dedup-stats is listed and documents its option; check documents --deep', () => {
  const all = qdedup(['--help']);
  assert.equal(all.status, 0);
  assert.match(all.stdout, /qdedup dedup-stats\b/);
  const r = qdedup(['dedup-stats', '--help']);
  assert.equal(r.status, 0, r.stderr);
  assert.ok(r.stdout.startsWith('qdedup dedup-stats'), r.stdout.slice(0, 80));
  for (const o of ['--output', 'human or json', 'Examples']) assert.ok(r.stdout.includes(o), o);
  const c = qdedup(['check', '--help']);
  assert.equal(c.status, 0);
  assert.match(c.stdout, /--deep/);
});

test('errors: one line and exit 1, with the JSON error document under --output json', () => {
  const missing = qdedup(['dedup-stats', join(dir, 'nothere.qcow2')]);
  assert.equal(missing.status, 1);
  assert.equal(missing.stdout, '');
  assert.match(missing.stderr, /^qdedup: .*nothere\.qcow2: .*\n$/);
  const raw = join(dir, 'raw.img');
  writeFileSync(raw, Buffer.alloc(65536, 1));
  const notQcow2 = qdedup(['dedup-stats', '--output', 'json', raw]);
  assert.equal(notQcow2.status, 1);
  assert.equal(notQcow2.stderr.split('\n').filter(Boolean).length, 1, notQcow2.stderr);
  assert.equal(JSON.parse(notQcow2.stdout).error.code, 'ENOTQCOW2');
  // A holder snapshot whose entry is not the identity: a corrupt image, named.
  const img = create('16M');
  const input = randomFile(8192);
  write(img, input.path, 0);
  const bytes = readFileSync(img);
  const holderL2 = holderL2Offset(bytes);
  const at = findNonZeroEntry(bytes, holderL2);
  bytes.writeUInt32BE(bytes.readUInt32BE(at + 4) + 4096, at + 4);
  const bad = join(dir, `bad-holder-${++serial}.qcow2`);
  writeFileSync(bad, bytes);
  const r = qdedup(['dedup-stats', bad]);
  assert.equal(r.status, 1);
  assert.match(r.stderr, /^qdedup: .*bad-holder.*: dedup holder snapshot: entry for cluster 0x[0-9a-f]+ maps 0x[0-9a-f]+, not itself/);
  assert.doesNotMatch(r.stderr, /\n\s+at /);
  const usage = qdedup(['dedup-stats', '--output', 'xml', img]);
  assert.equal(usage.status, 1);
});

test('read-only: dedup-stats and info leave the file byte for byte as it was', () => {
  const img = create('16M');
  const input = randomFile(256 * 1024);
  write(img, input.path, 0);
  write(img, input.path, MiB);
  const dirty = join(dir, `ro-dirty-${++serial}.qcow2`);
  const bytes = readFileSync(img);
  bytes[extensionPayloadOffset(bytes) + 2] |= 1;
  writeFileSync(dirty, bytes);
  const plain = create('16M', 'dedup=off');
  write(plain, input.path, 0);
  for (const file of [img, dirty, plain]) {
    const before = sha256(file);
    const mtime = statSync(file).mtimeMs;
    for (const args of [
      ['dedup-stats', file],
      ['dedup-stats', '--output', 'json', file],
      ['info', file],
      ['info', '--output', 'json', file],
    ]) {
      assert.equal(qdedup(args).status, 0, args.join(' '));
      assert.equal(sha256(file), before, `${args.join(' ')} changed the file`);
    }
    assert.equal(statSync(file).mtimeMs, mtime, 'not even rewritten with the same bytes');
  }
});

// ---------------------------------------------------------------- byte helpers

/** Offset in the file of the dedup extension's payload. */
function extensionPayloadOffset(bytes: Buffer): number {
  let pos = bytes.readUInt32BE(100); // header length (v3)
  for (;;) {
    const type = bytes.readUInt32BE(pos);
    const len = bytes.readUInt32BE(pos + 4);
    if (type === EXT_DEDUP) return pos + 8;
    if (type === 0) throw new Error('no dedup extension');
    pos += 8 + Math.ceil(len / 8) * 8;
  }
}

/** Offset in the file of the current journal's block 0. */
function currentJournalOffset(bytes: Buffer): number {
  const h = decodeHeader(bytes.subarray(0, 4096));
  const ext = decodeDedupExtension(h.extensions.find((e) => e.type === EXT_DEDUP)!.data, 4096);
  const config = decodeDedupConfig(bytes.subarray(ext.configOffset, ext.configOffset + ext.configBytes), ext.configOffset, 4096);
  return config.journals[config.currentJournal].offset;
}

/** Offset of the holder snapshot's first L2 table (the last snapshot qdedup added). */
function holderL2Offset(bytes: Buffer): number {
  const h = decodeHeader(bytes.subarray(0, 4096));
  let pos = h.snapshotsOffset;
  for (let i = 0; i < h.nbSnapshots; i++) {
    const l1 = Number(bytes.readBigUInt64BE(pos));
    const l1Size = bytes.readUInt32BE(pos + 8);
    const idLen = bytes.readUInt16BE(pos + 12);
    const nameLen = bytes.readUInt16BE(pos + 14);
    const extra = bytes.readUInt32BE(pos + 36);
    const name = bytes.subarray(pos + 40 + extra + idLen, pos + 40 + extra + idLen + nameLen).toString();
    if (name === 'qdedup-dedup-holder') {
      for (let j = 0; j < l1Size; j++) {
        const e = Number(bytes.readBigUInt64BE(l1 + j * 8) & 0x00ff_ffff_ffff_fe00n);
        if (e) return e;
      }
    }
    pos += Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
  }
  throw new Error('no holder L2 table');
}

function findNonZeroEntry(bytes: Buffer, table: number): number {
  for (let i = 0; i < 512; i++) if (bytes.readBigUInt64BE(table + i * 8)) return table + i * 8;
  throw new Error('empty table');
}
