// `qdedup journal-dump` through the real bin/qdedup: its
// figures against a known workload (one entry per unique cluster written, deletions only
// when a rewrite drops a cluster's last reference), agreement with replayJournal(), the
// frozen/current roles after a freeze, --limit, the untrusted and error cases (plain image,
// damaged configuration area), and that it never changes the file.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync, statSync, writeFileSync, openSync, writeSync, readSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { replayJournal } from '../../src/dedup/journal.ts';
import { readJournals } from '../../src/dedup/journal-scan.ts';
import { Image } from '../../src/image/image.ts';
import { HAVE_QEMU, qdedup, qemuCheck, tempDir } from '../helpers.ts';
import { clusterOf, qdedupOk } from './cli-lib.ts';

const CS = 4096;
const dir = tempDir('qdedup-jdump-');
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const fileSha = (p: string) => sha(readFileSync(p));

/** A 4 KiB cluster of content unique to `tag`. */
const cluster = (tag: string) => clusterOf(tag, CS);
const ok = (args: string[]) => qdedupOk(args).stdout;

// Parsed `journal-dump --output json`.
type Dump = {
  trusted: boolean;
  'autoclear-bit': boolean;
  dirty: boolean;
  'journal-block-size': number;
  'entries-per-block': number;
  'config-offset': number;
  'current-journal': number;
  'index-kept': boolean;
  'index-reason': string;
  'hash-algorithm': string;
  journals: {
    index: number;
    role: string;
    offset: number;
    'blocks-total': number;
    'start-sequence': number;
    'replay-stop': { block: number; verdict: string; reason: string };
    'blocks-replayed': number;
    'entries-replayed': number;
    insertions: number;
    deletions: number;
    'live-hashes': number;
    'deleted-hashes': number;
    'entries-omitted': number;
    blocks: {
      index: number;
      offset: number;
      'expected-sequence': number;
      sequence: number | null;
      'checksum-valid': boolean | null;
      verdict: string;
      reason: string;
      replayed: boolean;
      'entry-count': number;
      entries: {
        'journal-offset': number;
        offset: number;
        type: string;
        size: number;
        hash: string;
        'host-offset': number;
        'guest-offset': number;
        deleted: boolean;
      }[];
    }[];
  }[];
};
const dump = (file: string, ...extra: string[]): Dump => JSON.parse(ok(['journal-dump', '--output', 'json', ...extra, file]));
const current = (d: Dump) => d.journals[d['current-journal']];

test('journal-dump figures match a known workload: one entry per unique cluster, deletions after the last reference goes', () => {
  const img = join(dir, 'known.qcow2');
  ok(['create', '-q', img, '64M', '-o', 'dedup_order=5,dedup_journal_block=512']);
  const clusters = Array.from({ length: 16 }, (_, i) => cluster(`known ${i}`));
  const input = join(dir, 'known.raw');
  writeFileSync(input, Buffer.concat(clusters));
  ok(['write', '-q', '-i', input, img, '0']); // 16 unique clusters: 16 insertions
  ok(['write', '-q', '-i', input, img, '1M']); // the same 16 again: all hits, no entry
  let d = dump(img);
  let j = current(d);
  assert.equal(d.trusted, true);
  assert.equal(d['hash-algorithm'], 'sha256');
  assert.equal(d['journal-block-size'], 512);
  assert.equal(d['entries-per-block'], 9);
  assert.equal(j.role, 'current');
  assert.equal(j['entries-replayed'], 16);
  assert.deepEqual([j.insertions, j.deletions, j['live-hashes']], [16, 0, 16]);
  assert.deepEqual(j['replay-stop'], { block: 2, verdict: 'empty', reason: 'block never written (all zero)' });
  assert.deepEqual(
    j.blocks.filter((b) => b.replayed).map((b) => b['entry-count']),
    [9, 7],
  );
  const entries = j.blocks.flatMap((b) => b.entries);
  entries.forEach((e, i) => {
    assert.equal(e.hash, sha(clusters[i]), `entry ${i} hash`);
    assert.equal(e['guest-offset'], i * CS);
    assert.equal(e.type, 'hash');
    assert.equal(e.size, 52);
    assert.equal(e.deleted, false);
    assert.equal(e['host-offset'] % CS, 0);
    const block = Math.floor(i / 9);
    assert.equal(e['journal-offset'], block * 512 + 24 + (i % 9) * 52);
    assert.equal(e.offset, j.offset + e['journal-offset']);
  });
  assert.equal(new Set(entries.map((e) => e['host-offset'])).size, 16, 'distinct host clusters');
  for (const b of j.blocks) {
    assert.equal(b.offset, j.offset + b.index * 512);
    assert.equal(b['expected-sequence'], j['start-sequence'] + b.index);
    if (b.replayed) assert.deepEqual([b.sequence, b['checksum-valid'], b.verdict], [b['expected-sequence'], true, 'valid']);
  }

  // Rewriting clusters 0–3 at offset 0: one new content (1 insertion); the old clusters
  // are still used at 1M, so no deletion yet. Rewriting them at 1M too drops their last
  // reference: 4 deletions, after the insertions.
  ok(['write', '-q', '-P', '0xee', img, '0', '16k']);
  d = dump(img);
  assert.deepEqual([current(d).insertions, current(d).deletions], [17, 0]);
  ok(['write', '-q', '-P', '0xee', img, '1M', '16k']);
  d = dump(img);
  j = current(d);
  assert.deepEqual([j['entries-replayed'], j.insertions, j.deletions, j['live-hashes'], j['deleted-hashes']], [21, 17, 4, 13, 4]);
  const all = j.blocks.filter((b) => b.replayed).flatMap((b) => b.entries);
  const deletions = all.filter((e) => e.deleted);
  assert.deepEqual(deletions.map((e) => e.hash).sort(), clusters.slice(0, 4).map(sha).sort());
  const lastInsert = Math.max(...all.filter((e) => !e.deleted).map((e) => e['journal-offset']));
  assert.ok(
    deletions.every((e) => e['journal-offset'] > lastInsert),
    'deletions come after the insertions',
  );
  assert.equal(all.find((e) => !e.deleted && e.hash === sha(Buffer.alloc(CS, 0xee)))?.['guest-offset'], 0);
  assert.equal(j['replay-stop'].block, 4); // sessions wrote blocks 0–1, 2, 3

  // The human form says the same, one greppable line per entry.
  const text = ok(['journal-dump', img]);
  assert.match(text, /^trusted: yes \(autoclear bit 60 set, dirty flag clear\)$/m);
  assert.match(text, /^journal block size: 512 bytes \(9 hash entries a block\)$/m);
  assert.match(text, /^journal 0 \(current\): offset 0x[0-9a-f]+, \d+ blocks, start sequence 0$/m);
  assert.match(text, /^journal 1 \(frozen\): /m);
  assert.equal(
    text.match(/^ {4}entry \+\d+ \(0x[0-9a-f]+\): hash, 52 bytes, host 0x[0-9a-f]+, guest 0x[0-9a-f]+, deleted (yes|no), hash [0-9a-f]{64}$/gm)?.length,
    21,
  );
  assert.equal(text.match(/deleted yes/g)?.length, 4);
  assert.match(text, /^ {2}block 0 at 0x[0-9a-f]+: sequence 0 \(expected 0\), checksum ok, valid, 9 entries$/m);
  assert.match(text, /^ {2}replay stops at block 4: empty \(block never written \(all zero\)\)$/m);
  assert.match(text, /^ {2}replayed: 4 blocks, 21 entries \(17 insertions, 4 deletions\), 13 live hashes, 4 deleted$/m);
  if (HAVE_QEMU) assert.notEqual(qemuCheck(img).status, 2);
});

test('journal-dump agrees with replayJournal() on both journals', async () => {
  const img = join(dir, 'agree.qcow2');
  ok(['create', '-q', img, '64M', '-o', 'dedup_order=2,dedup_journal_block=512']);
  for (let s = 0; s < 4; s++) {
    const input = join(dir, `agree${s}.raw`);
    writeFileSync(input, Buffer.concat(Array.from({ length: 7 }, (_, i) => cluster(`agree ${s} ${i}`))));
    ok(['write', '-q', '-i', input, img, String(s * 7 * CS)]);
  }
  ok(['write', '-q', '-P', '3', img, '0', '8k']);
  const image = await Image.open(img);
  try {
    const r = await readJournals(image);
    for (const { index, scan } of r.journals) {
      const replay = await replayJournal(image.file, r.config.journals[index], r.ext.journalBlockSize);
      assert.deepEqual(scan.stop, replay.stop, `journal ${index} stop`);
      const scanned = scan.blocks.filter((b) => b.replayed).flatMap((b) => b.entries);
      assert.deepEqual(
        scanned.map((e) => [e.hash, e.hostOffset, e.firstGuestOffset, e.deleted, e.offsetInBlock]),
        replay.entries.map((e) => [e.hash.toString('hex'), e.hostOffset, e.firstGuestOffset, e.deleted, e.offsetInBlock]),
      );
    }
  } finally {
    await image.close();
  }
});

test('after a freeze: current and frozen journals named, stale blocks of the reset journal shown, not replayed', () => {
  const img = join(dir, 'freeze.qcow2');
  ok(['create', '-q', img, '64M', '-o', 'dedup_order=2,dedup_journal_block=512']); // 16 slots
  for (let s = 0; s < 4; s++) {
    const input = join(dir, `freeze${s}.raw`);
    writeFileSync(input, Buffer.concat(Array.from({ length: 6 }, (_, i) => cluster(`freeze ${s} ${i}`))));
    ok(['write', '-q', '-i', input, img, String(s * 6 * CS)]);
  }
  const d = dump(img);
  assert.equal(d['current-journal'], 1, 'the log store froze once: journal 1 is current');
  const [frozen, cur] = d.journals;
  assert.deepEqual([frozen.role, cur.role], ['frozen', 'current']);
  // Both journals were reset once: their start sequence is one past their old blocks.
  assert.equal(cur['start-sequence'], cur['blocks-total'] + 1);
  assert.equal(frozen['start-sequence'], frozen['blocks-total'] + 1);
  // Journal 0 still holds the blocks of its first use: stale, refused by sequence number.
  assert.deepEqual([frozen['replay-stop'].block, frozen['replay-stop'].verdict], [0, 'bad-sequence']);
  assert.ok(frozen.blocks.length >= 2 && frozen.blocks.every((b) => !b.replayed && b.verdict === 'bad-sequence' && b.sequence === b.index));
  assert.equal(frozen['entries-replayed'], 0);
  assert.ok(cur['entries-replayed'] > 0 && cur['entries-replayed'] < 24);
  assert.equal(d['index-kept'], true);
  const text = ok(['journal-dump', img]);
  assert.match(
    text,
    /^ {2}block 0 at 0x[0-9a-f]+: sequence 0 \(expected \d+\), checksum ok, bad-sequence: sequence 0, expected \d+ \(a stale block\), not replayed$/m,
  );
  assert.match(text, /^journal 1 \(current\): /m);
});

test('--limit caps the entries printed per journal, never the counts', () => {
  const img = join(dir, 'limit.qcow2');
  ok(['create', '-q', img, '64M', '-o', 'dedup_order=5,dedup_journal_block=512']);
  const input = join(dir, 'limit.raw');
  writeFileSync(input, Buffer.concat(Array.from({ length: 20 }, (_, i) => cluster(`limit ${i}`))));
  ok(['write', '-q', '-i', input, img, '0']);
  const text = ok(['journal-dump', '--limit', '3', img]);
  assert.equal(text.match(/^ {4}entry /gm)?.length, 3);
  assert.match(text, /… 17 more entries not shown \(--limit 3\)/);
  assert.match(text, /replayed: 3 blocks, 20 entries/);
  const d = dump(img, '--limit', '5');
  assert.equal(current(d).blocks.flatMap((b) => b.entries).length, 5);
  assert.equal(current(d)['entries-omitted'], 15);
  assert.equal(current(d)['entries-replayed'], 20);
  assert.equal(dump(img, '--limit', '0').journals[0].blocks.flatMap((b) => b.entries).length, 0);
  const bad = qdedup(['journal-dump', '--limit', 'x', img]);
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /--limit must be a whole number/);
});

test('journal-dump never writes: the file is byte-identical and its mtime unchanged', () => {
  const img = join(dir, 'ro.qcow2');
  ok(['create', '-q', img, '64M', '-o', 'dedup_order=3,dedup_journal_block=1024']);
  ok(['write', '-q', '-P', '0x41', img, '0', '64k']);
  ok(['write', '-q', '-P', '0x42', img, '4k', '4k']);
  // A dirty image too: journal-dump must not "repair" nor clean it.
  const dirty = join(dir, 'ro-dirty.qcow2');
  writeFileSync(dirty, readFileSync(img));
  setDedupDirty(dirty);
  for (const f of [img, dirty]) {
    const before = fileSha(f);
    const mtime = statSync(f).mtimeMs;
    ok(['journal-dump', f]);
    ok(['journal-dump', '--output', 'json', '--limit', '1', f]);
    assert.equal(fileSha(f), before, `${f} unchanged`);
    assert.equal(statSync(f).mtimeMs, mtime);
  }
  const d = dump(dirty);
  assert.deepEqual([d.trusted, d.dirty, d['autoclear-bit'], d['index-kept']], [false, true, true, false]);
  // The reason judgeStore gives everywhere (info, dedup-stats, the write's notice).
  assert.equal(d['index-reason'], 'dropped: the image was not closed cleanly (dedup dirty flag set)');
  assert.match(ok(['journal-dump', dirty]), /^trusted: no \(autoclear bit 60 set, dirty flag set\)$/m);
});

test('an image whose autoclear bit 60 was cleared is reported untrusted, its journals still shown', () => {
  const img = join(dir, 'foreign.qcow2');
  ok(['create', '-q', img, '64M', '-o', 'dedup_order=3']);
  ok(['write', '-q', '-P', '0x41', img, '0', '8k']);
  const fd = openSync(img, 'r+');
  const b = Buffer.alloc(8);
  readSync(fd, b, 0, 8, 88);
  b[0] &= ~0x10; // bit 60 of the big-endian autoclear field
  writeSync(fd, b, 0, 8, 88);
  closeSync(fd);
  const d = dump(img);
  assert.deepEqual([d.trusted, d['autoclear-bit'], d.dirty, d['index-kept']], [false, false, false, false]);
  assert.match(d['index-reason'], /autoclear bit 60 is clear/);
  assert.equal(current(d)['entries-replayed'], 1);
});

test('a plain image, a non-image and a damaged configuration area get a one-line error and exit 1', () => {
  const plain = join(dir, 'plain.qcow2');
  ok(['create', '-q', plain, '64M', '-o', 'dedup=off']);
  let r = qdedup(['journal-dump', plain]);
  assert.equal(r.status, 1);
  assert.equal(r.stdout, '');
  assert.equal(r.stderr.trim().split('\n').length, 1);
  assert.match(r.stderr, /plain\.qcow2.*not a dedup image/);
  r = qdedup(['journal-dump', '--output', 'json', plain]);
  assert.equal(r.status, 1);
  assert.equal(JSON.parse(r.stdout).error.code, 'ENOTDEDUP');

  const junk = join(dir, 'junk.bin');
  writeFileSync(junk, Buffer.alloc(4096, 7));
  r = qdedup(['journal-dump', junk]);
  assert.equal(r.status, 1);
  assert.equal(r.stderr.trim().split('\n').length, 1);

  const img = join(dir, 'badconfig.qcow2');
  ok(['create', '-q', img, '64M', '-o', 'dedup_order=3']);
  ok(['write', '-q', '-P', '0x41', img, '0', '8k']);
  const at = dump(img)['config-offset'];
  const fd = openSync(img, 'r+');
  writeSync(fd, Buffer.from([0xff]), 0, 1, at + 30); // inside journal 0's descriptor: checksum mismatch
  closeSync(fd);
  const before = fileSha(img);
  r = qdedup(['journal-dump', img]);
  assert.equal(r.status, 1);
  assert.equal(r.stdout, '');
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, new RegExp(`dedup configuration area: checksum mismatch at 0x${(at + 4).toString(16)}`));
  assert.equal(fileSha(img), before);
  const wrongMagic = join(dir, 'badmagic.qcow2');
  writeFileSync(wrongMagic, readFileSync(img));
  const fd2 = openSync(wrongMagic, 'r+');
  writeSync(fd2, Buffer.from('XXXX'), 0, 4, at);
  closeSync(fd2);
  r = qdedup(['journal-dump', wrongMagic]);
  assert.equal(r.status, 1);
  assert.match(r.stderr, /dedup configuration area: bad magic at 0x/);
});

/** Sets the dedup dirty flag (extension payload byte 2, bit 0) of an image in place. */
function setDedupDirty(path: string): void {
  const bytes = readFileSync(path);
  const hdrLen = bytes.readUInt32BE(100);
  let pos = hdrLen;
  for (;;) {
    const type = bytes.readUInt32BE(pos);
    const len = bytes.readUInt32BE(pos + 4);
    assert.notEqual(type, 0, 'dedup extension not found');
    if (type === 0xcd8e819b) {
      bytes[pos + 8 + 2] |= 1;
      writeFileSync(path, bytes);
      return;
    }
    pos += 8 + Math.ceil(len / 8) * 8;
  }
}
