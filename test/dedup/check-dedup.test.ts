// `qdedup check` on dedup images, through the real CLI (bin/qdedup, so run `npm run build`
// first): the store's clusters are held by the holder snapshot (qdedup check and qemu-img
// check both clean: "No errors were found"), every live index entry is verified (held, allocated and,
// with --deep, hashing to its entry) across freezes, FIFO and deletions, planted bad entries
// (a hash changed in a journal block whose CRC is then fixed; an entry pointed elsewhere)
// give exit 2 and one "ERROR dedup index:" line, `-r all` drops a bad index (bit 60 clear)
// and the next write starts a fresh one, repairs keep a sound index trusted, an untrusted
// store stays held (no leak) until the next write releases it through the holder, and a
// check without -r never changes a byte.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { decodeHeader } from '../../src/format/header.ts';
import { AUTOCLEAR_DEDUP, EXT_DEDUP, decodeDedupConfig, decodeDedupExtension } from '../../src/format/dedup-ext.ts';
import { JOURNAL_HEADER_BYTES, JOURNAL_HASH_ENTRY_BYTES, decodeJournalBlock } from '../../src/format/journal-block.ts';
import { incarnationLayout } from '../../src/format/incarnation.ts';
import { NO_QEMU, qdedup, qemuCheck, run } from '../helpers.ts';
import { dedupExtensionPayload, sha256File, workFolder } from './cli-lib.ts';

const { dir, create, randomFile } = workFolder('qdedup-check-dedup-');
const MiB = 1024 * 1024;
const sha256 = sha256File;
let serial = 0;

function q(...args: string[]) {
  return qdedup(args);
}

function ok(...args: string[]) {
  const r = qdedup(args);
  assert.equal(r.status, 0, `${args.join(' ')}: ${r.stderr}`);
  return r;
}

function stats(file: string): Record<string, any> {
  return JSON.parse(ok('dedup-stats', '--output', 'json', file).stdout);
}

function checkJson(file: string, ...flags: string[]) {
  const r = q('check', '--output', 'json', ...flags, file);
  return { status: r.status, json: r.stdout ? JSON.parse(r.stdout) : null, stderr: r.stderr };
}

function copy(file: string, tag: string): string {
  const to = join(dir, `${tag}-${++serial}.qcow2`);
  writeFileSync(to, readFileSync(file));
  return to;
}

function bit60(file: string): boolean {
  return (readFileSync(file).readBigUInt64BE(88) & AUTOCLEAR_DEDUP) !== 0n;
}

/** Asserts what qemu-img check says of an image qdedup wrote: exit 0, no corruption, no leak (the holder holds the store). */
function assertQemuClean(file: string): void {
  if (NO_QEMU) return;
  const c = qemuCheck(file);
  assert.equal(c.status, 0, `qemu-img check on ${file}: ${JSON.stringify(c.json)} ${c.stderr}`);
  assert.equal(c.json?.corruptions ?? 0, 0, c.stderr);
  assert.equal(c.json?.leaks ?? 0, 0, `qemu-img check leaks on ${file}`);
  assert.match(run('qemu-img', ['check', '-f', 'qcow2', file]).stdout, /^No errors were found on the image\.$/m);
}

/** Asserts qdedup check (plain and --deep) is clean and verified every live entry. */
function assertCheckClean(file: string): Record<string, any> {
  for (const deep of [[], ['--deep']]) {
    const r = checkJson(file, ...deep);
    assert.equal(r.status, 0, `check ${deep.join('')}: ${r.stderr}`);
    assert.equal(r.stderr, '');
    assert.equal(r.json.leaks, undefined, "no leaks: the store's clusters are counted");
    assert.equal(r.json.corruptions, undefined);
    assert.equal(r.json.dedup.trusted, true);
    assert.equal(r.json.dedup['bad-entries'], 0);
    assert.equal(r.json.dedup.deep, deep.length > 0);
  }
  return checkJson(file).json.dedup;
}

// ---------------------------------------------------------------- planting

/** The current journal's first block, where it is in the file, and its entries. */
function journalBlock0(bytes: Buffer) {
  const h = decodeHeader(bytes.subarray(0, 4096));
  const cs = 2 ** h.clusterBits;
  const e = h.extensions.find((x) => x.type === EXT_DEDUP)!;
  const ext = decodeDedupExtension(e.data, cs);
  const config = decodeDedupConfig(bytes.subarray(ext.configOffset, ext.configOffset + ext.configBytes), ext.configOffset, cs);
  const j = config.journals[config.currentJournal];
  const block = bytes.subarray(j.offset, j.offset + ext.journalBlockSize);
  const decoded = decodeJournalBlock(Buffer.from(block), j.startSequence);
  assert.equal(decoded.verdict, 'valid', decoded.reason);
  return { offset: j.offset, block, entries: decoded.entries, header: h };
}

/** Changes entry `i` of the current journal's block 0 with `mutate(entryPayloadOffset)` and fixes the block CRC. */
function plant(file: string, tag: string, i: number, mutate: (bytes: Buffer, payload: number) => void): string {
  const out = copy(file, tag);
  const bytes = readFileSync(out);
  const { offset, block } = journalBlock0(bytes);
  const payload = offset + JOURNAL_HEADER_BYTES + i * JOURNAL_HASH_ENTRY_BYTES + 4;
  mutate(bytes, payload);
  block.writeUInt32BE(crc32(block.subarray(8)), 4); // `block` is a view of `bytes`
  writeFileSync(out, bytes);
  return out;
}

// ---------------------------------------------------------------- tests

test("images qdedup wrote: qdedup check and qemu-img check are clean (the holder holds the store's clusters)", () => {
  // (a) ten copies of 1 MiB; (b) copies, a rewrite and zeroes (hash deletions);
  // (c) a tiny store: freezes, FIFO of 2 incarnations, limbo, then deletions and reuse.
  const a = create('64M');
  const one = randomFile(MiB);
  for (let i = 0; i < 10; i++) ok('write', '-q', '-i', one.path, a, String(i * 3 * MiB));

  const b = create('16M');
  const two = randomFile(256 * 1024);
  ok('write', '-q', '-i', two.path, b, '0');
  ok('write', '-q', '-i', two.path, b, String(MiB));
  ok('write', '-q', '-P', '0x33', b, '0', '128k');
  ok('write', '-q', '-z', b, String(MiB), '256k');
  ok('write', '-q', '-i', two.path, b, '100000'); // unaligned

  const c = create('16M', 'dedup_order=2,dedup_max_incarnations=2');
  const three = randomFile(MiB);
  ok('write', '-q', '-i', three.path, c, '0');
  ok('write', '-q', '-i', three.path, c, String(2 * MiB));
  ok('write', '-q', '-z', c, '0', String(MiB)); // the second copy still holds them
  ok('write', '-q', '-z', c, String(2 * MiB), String(MiB)); // now every hash goes: tombstones over incarnations
  // Every slot left is a tombstone or an entry a younger tombstone shadows (its cluster is
  // freed): none may be reported, and none is a live entry.
  const shadowed = checkJson(c, '--deep');
  assert.equal(shadowed.status, 0, shadowed.stderr);
  assert.equal(shadowed.json.dedup['entries-checked'], 0);
  assert.ok(stats(c)['index-entries'] > 0, 'slots still in use');
  const four = randomFile(512 * 1024);
  ok('write', '-q', '-i', four.path, c, String(4 * MiB)); // freed clusters reused for new content
  ok('write', '-q', '-i', four.path, c, String(6 * MiB));

  for (const [name, file] of [
    ['a', a],
    ['b', b],
    ['c', c],
  ] as const) {
    const s = stats(file);
    assert.equal(s.trusted, true, name);
    assert.ok(s['metadata-clusters'] > 0, `${name}: the store owns clusters`);
    assertQemuClean(file);
    const d = assertCheckClean(file);
    assert.ok(d['entries-checked'] > 0, `${name}: entries checked`);
    assert.ok(d['entries-checked'] <= s['index-entries'], `${name}: live entries ${d['entries-checked']} ≤ slots in use ${s['index-entries']}`);
    if (name === 'a') assert.equal(d['entries-checked'], 256);
    const human = ok('check', file).stdout;
    assert.match(human, /^No errors were found on the image\.$/m);
    assert.match(human, new RegExp(`^Dedup index: ${d['entries-checked']} entries checked, no errors\\.$`, 'm'));
  }
  assert.ok(stats(c).incarnations.count === 2 && stats(c).limbo >= 1, 'workload (c) went through the FIFO');
});

test('check --deep: a journal entry whose hash was changed (CRC fixed) → exit 2 and one ERROR line', () => {
  const img = create('16M');
  const input = randomFile(64 * 1024); // 16 clusters, one write: entries in block 0 of the current journal
  ok('write', '-q', '-i', input.path, img, '0');
  ok('write', '-q', '-i', input.path, img, String(MiB));
  const original = journalBlock0(readFileSync(img)).entries[0];
  const bad = plant(img, 'bad-hash', 0, (bytes, p) => {
    bytes[p] ^= 0xff; // first hash byte
  });
  const badHash = Buffer.from(original.hash);
  badHash[0] ^= 0xff;

  // Without --deep the entry still names a held, allocated cluster: nothing to see.
  assert.equal(q('check', bad).status, 0);
  const r = checkJson(bad, '--deep');
  assert.equal(r.status, 2, r.stderr);
  const lines = r.stderr.split('\n').filter(Boolean);
  assert.deepEqual(lines, [
    `ERROR dedup index: hash ${badHash.toString('hex')} (current log store) -> 0x${original.hostOffset.toString(16)}: cluster content hashes to ${original.hash.toString('hex')}`,
  ]);
  assert.equal(r.json.corruptions, 1);
  assert.equal(r.json.leaks, undefined);
  assert.deepEqual(r.json.dedup, { trusted: true, deep: true, 'entries-checked': 16, 'bad-entries': 1 });
  const human = q('check', '--deep', bad);
  assert.equal(human.status, 2);
  assert.match(human.stdout, /^1 errors were found on the image\.$/m);
  assert.match(human.stdout, /^Dedup index: 16 entries checked, content hashes verified, 1 bad\.$/m);

  // -r leaks does not repair corruptions: the index stays, bit 60 stays.
  const leaksOnly = q('check', '-r', 'leaks', '--deep', bad);
  assert.equal(leaksOnly.status, 2, leaksOnly.stderr);
  assert.ok(bit60(bad));

  // -r all drops the index: bit 60 cleared; the store's clusters stay held by the holder
  // snapshot (no leak) until the next write releases them.
  const repaired = q('check', '-r', 'all', '--deep', bad);
  assert.equal(repaired.status, 0, repaired.stderr);
  assert.match(repaired.stdout, /^The following inconsistencies were found and repaired:\n\n {4}0 leaked clusters\n {4}1 corruptions$/m);
  assert.match(repaired.stdout, /^Dedup index: dropped by the repair \(autoclear bit 60 cleared\); the next write starts a fresh index\.$/m);
  assert.match(repaired.stderr, /^Repairing dedup: structures dropped/m);
  assert.equal(bit60(bad), false, 'bit 60 is clear after -r all');
  assertQemuClean(bad);
  const after = checkJson(bad);
  assert.equal(after.status, 0, after.stderr);
  assert.equal(after.json.dedup.trusted, false);
  assert.match(after.json.dedup.reason, /autoclear bit 60 is clear/);

  // The next write starts a fresh index, the data reads back, the image stays consistent.
  const w = q('write', '-i', input.path, bad, String(2 * MiB));
  assert.equal(w.status, 0, w.stderr);
  assert.match(w.stderr, /dedup index not trusted/);
  const s = stats(bad);
  assert.equal(s.trusted, true);
  const back = ok('read', bad, '0', String(3 * MiB)).stdoutBytes;
  for (const o of [0, MiB, 2 * MiB]) assert.ok(back.subarray(o, o + input.data.length).equals(input.data), `copy at ${o}`);
  assertQemuClean(bad); // the old store released through the holder, the new one held
  assertCheckClean(bad);
});

test('check: an entry pointed at a cluster the holder does not hold → exit 2 without --deep; -r all drops it', () => {
  const img = create('16M');
  const input = randomFile(32 * 1024);
  ok('write', '-q', '-i', input.path, img, '0');
  const { header, entries } = journalBlock0(readFileSync(img));
  const elsewhere = header.l1TableOffset; // metadata: never held
  const bad = plant(img, 'elsewhere', 3, (bytes, p) => {
    bytes.writeBigUInt64BE(BigInt(elsewhere), p + 32);
  });
  const r = checkJson(bad);
  assert.equal(r.status, 2, r.stderr);
  assert.deepEqual(r.stderr.split('\n').filter(Boolean), [
    `ERROR dedup index: hash ${entries[3].hash.toString('hex')} (current log store) -> 0x${elsewhere.toString(16)}: cluster is not held by the dedup holder snapshot`,
  ]);
  assert.equal(r.json.corruptions, 1);
  assert.equal(r.json.dedup['bad-entries'], 1);
  // An unaligned host offset, and one past the end of the file.
  const unaligned = plant(img, 'unaligned', 1, (bytes, p) => bytes.writeBigUInt64BE(BigInt(entries[1].hostOffset + 512), p + 32));
  assert.match(q('check', unaligned).stderr, /-> 0x[0-9a-f]+: host offset is not a multiple of the cluster size, and the entry gives no compressed length$/m);
  const past = plant(img, 'past', 2, (bytes, p) => bytes.writeBigUInt64BE(BigInt(1 << 30), p + 32));
  assert.match(q('check', past).stderr, /-> 0x40000000: cluster is past the end of the file$/m);

  const fixed = checkJson(bad, '-r', 'all');
  assert.equal(fixed.status, 0, fixed.stderr);
  assert.equal(fixed.json['corruptions-fixed'], 1);
  assert.equal(fixed.json['leaks-fixed'] ?? 0, 0, "the dropped store's clusters stay held until the next write");
  assert.equal(fixed.json.dedup['index-dropped'], true);
  assert.equal(fixed.json.dedup.trusted, false);
  assert.equal(bit60(bad), false);
  // A qdedup write never linked to the bad entry before the repair either: it checks the holder.
  const w = q('write', '-q', '-i', input.path, bad, String(MiB));
  assert.equal(w.status, 0, w.stderr);
  assert.ok(ok('read', bad, String(MiB), String(input.data.length)).stdoutBytes.equals(input.data));
});

test('check: a bad slot in an incarnation is found and named', () => {
  const img = create('16M', 'dedup_order=2'); // 16-slot log stores: 64 clusters make several incarnations
  const input = randomFile(256 * 1024);
  ok('write', '-q', '-i', input.path, img, '0');
  const bytes = readFileSync(img);
  const h = decodeHeader(bytes.subarray(0, 4096));
  const ext = decodeDedupExtension(h.extensions.find((x) => x.type === EXT_DEDUP)!.data, 4096);
  const config = decodeDedupConfig(bytes.subarray(ext.configOffset, ext.configOffset + ext.configBytes), ext.configOffset, 4096);
  assert.ok(config.incarnations.length >= 2, `incarnations: ${config.incarnations.length}`);
  const k = 1;
  const area = config.incarnations[k].offset;
  const { slots, tableOffset } = incarnationLayout(2, 4096);
  let s = 0;
  while (s < slots && bytes.readUInt16BE(area + s * 2) === 0) s++;
  assert.ok(s < slots, 'a used slot');
  const slot = area + tableOffset + s * 48;
  const hash = bytes.subarray(slot, slot + 32).toString('hex');
  const host = Number(bytes.readBigUInt64BE(slot + 32));
  assert.notEqual(host, 0, 'not a tombstone');
  const bad = copy(img, 'incarnation');
  const patched = readFileSync(bad);
  patched.writeBigUInt64BE(BigInt(h.l1TableOffset), slot + 32);
  writeFileSync(bad, patched);
  assert.equal(q('check', img).status, 0, 'the original is clean');
  const r = checkJson(bad);
  assert.equal(r.status, 2, r.stderr);
  assert.deepEqual(r.stderr.split('\n').filter(Boolean), [
    `ERROR dedup index: hash ${hash} (incarnation ${k} slot ${s}) -> 0x${h.l1TableOffset.toString(16)}: cluster is not held by the dedup holder snapshot`,
  ]);
  assert.equal(r.json.dedup['entries-checked'], 64);
  // Pointed at another data cluster of the same write (held, allocated): only --deep sees it.
  const guest = readFileSync(img);
  const l2 = Number(guest.readBigUInt64BE(h.l1TableOffset) & 0x00ff_ffff_ffff_fe00n);
  let otherHost = 0;
  for (let i = 0; i < 64 && !otherHost; i++) {
    const o = Number(guest.readBigUInt64BE(l2 + i * 8) & 0x00ff_ffff_ffff_fe00n);
    if (o && o !== host) otherHost = o;
  }
  const other = copy(img, 'incarnation-swap');
  const p2 = readFileSync(other);
  p2.writeBigUInt64BE(BigInt(otherHost), slot + 32);
  writeFileSync(other, p2);
  assert.equal(q('check', other).status, 0, 'held and allocated: fine without --deep');
  const deep = checkJson(other, '--deep');
  assert.equal(deep.status, 2, deep.stderr);
  assert.match(
    deep.stderr,
    new RegExp(
      `^ERROR dedup index: hash ${hash} \\(incarnation ${k} slot ${s}\\) -> 0x${otherHost.toString(16)}: cluster content hashes to [0-9a-f]{64}$`,
      'm',
    ),
  );
});

test('repairs keep a sound index trusted: -r leaks and -r all fix a planted leak, bit 60 stays set', () => {
  const img = create('16M');
  const input = randomFile(256 * 1024);
  ok('write', '-q', '-i', input.path, img, '0');
  ok('write', '-q', '-i', input.path, img, String(MiB));
  const before = stats(img);
  for (const mode of ['leaks', 'all']) {
    // One more reference counted on a data cluster than there is: a leak.
    const leaky = copy(img, `leak-${mode}`);
    const bytes = readFileSync(leaky);
    const h = decodeHeader(bytes.subarray(0, 4096));
    const l2 = Number(bytes.readBigUInt64BE(h.l1TableOffset) & 0x00ff_ffff_ffff_fe00n);
    const data = Number(bytes.readBigUInt64BE(l2) & 0x00ff_ffff_ffff_fe00n);
    const refblock = Number(bytes.readBigUInt64BE(h.refcountTableOffset));
    const at = refblock + (data / 4096) * 2;
    assert.equal(bytes.readUInt16BE(at), 3, "two guest references and the holder's");
    bytes.writeUInt16BE(4, at);
    writeFileSync(leaky, bytes);
    const c = checkJson(leaky);
    assert.equal(c.status, 3, c.stderr);
    assert.equal(c.json.leaks, 1, "the planted leak only: the store's clusters are held");
    const r = q('check', '-r', mode, leaky);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^ {4}1 leaked clusters$/m);
    assert.ok(bit60(leaky), `-r ${mode}: bit 60 still set`);
    const s = stats(leaky);
    assert.equal(s.trusted, true);
    assert.equal(s['index-entries'], before['index-entries']);
    assertQemuClean(leaky);
    assertCheckClean(leaky);
    // And the index is still used: a third copy costs no data cluster.
    ok('write', '-q', '-i', input.path, leaky, String(2 * MiB));
    assert.equal(stats(leaky)['data-clusters'], before['data-clusters']);
  }
});

/** Host clusters of the store areas a clean image's configuration names (config area included). */
function storeClusters(file: string): Set<number> {
  const bytes = readFileSync(file);
  const h = decodeHeader(bytes.subarray(0, 4096));
  const ext = decodeDedupExtension(h.extensions.find((e) => e.type === EXT_DEDUP)!.data, 4096);
  const config = decodeDedupConfig(bytes.subarray(ext.configOffset, ext.configOffset + ext.configBytes), ext.configOffset, 4096);
  const out = new Set<number>();
  const add = (offset: number, bytes: number) => {
    for (let c = offset / 4096; c < Math.ceil((offset + bytes) / 4096); c++) out.add(c);
  };
  add(ext.configOffset, ext.configBytes);
  for (const j of config.journals) add(j.offset, j.blocks * ext.journalBlockSize);
  const inc = incarnationLayout(ext.order, 4096).clusters * 4096;
  for (const r of config.incarnations) add(r.offset, inc);
  for (const l of config.limbo) add(l.offset, l.clusters * 4096);
  return out;
}

/** Stored refcount of host cluster `c` (16-bit refcounts, one refcount block). */
function refcountOf(file: string, c: number): number {
  const bytes = readFileSync(file);
  const h = decodeHeader(bytes.subarray(0, 4096));
  const perBlock = 4096 / 2;
  const block = Number(bytes.readBigUInt64BE(h.refcountTableOffset + Math.floor(c / perBlock) * 8));
  return block ? bytes.readUInt16BE(block + (c % perBlock) * 2) : 0;
}

test('untrusted stores: held by the holder (no leak, qemu-img agrees) until the next write releases them through it', { skip: NO_QEMU }, () => {
  const img = create('16M');
  const input = randomFile(128 * 1024);
  ok('write', '-q', '-i', input.path, img, '0');
  ok('write', '-q', '-i', input.path, img, String(MiB));
  const oldStore = storeClusters(img);
  for (const c of oldStore) assert.equal(refcountOf(img, c), 1, `store cluster ${c}: the holder's reference only`);

  // A foreign writer clears bit 60.
  const foreign = copy(img, 'foreign');
  assert.equal(run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 4M 64k', foreign]).status, 0);
  const c = checkJson(foreign);
  assert.equal(c.status, 0, c.stderr);
  assert.equal(c.json.leaks, undefined);
  assert.deepEqual(Object.keys(c.json.dedup), ['trusted', 'reason', 'deep', 'entries-checked', 'bad-entries']);
  assert.equal(c.json.dedup.trusted, false);
  assert.match(c.json.dedup.reason, /autoclear bit 60 is clear/);
  assert.equal(c.json.dedup['entries-checked'], 0);
  assertQemuClean(foreign);
  assert.match(
    q('check', foreign).stdout,
    /^Dedup index: not trusted \(dedup autoclear bit 60 is clear.*\); the holder snapshot keeps its clusters until the next write releases them\.$/m,
  );
  const r = q('check', '-r', 'leaks', foreign);
  assert.equal(r.status, 0, r.stderr);
  assert.doesNotMatch(r.stdout, /leaked clusters/, 'nothing to free');
  // The next write starts a fresh store and only then lets the old one go: every old store
  // cluster is free afterwards, or reused by the new store or by data.
  const w = q('write', '-i', input.path, foreign, String(2 * MiB)); // not -q: -q silences the notice
  assert.equal(w.status, 0, w.stderr);
  assert.match(w.stderr, /dedup index not trusted/);
  // (Freed at that write's commit, after the new store was allocated: nothing reused them.)
  const newStore = storeClusters(foreign);
  assert.equal([...oldStore].filter((cl) => newStore.has(cl)).length, 0, 'the new store is elsewhere');
  const stillHeld = [...oldStore].filter((cl) => refcountOf(foreign, cl) !== 0);
  assert.deepEqual(stillHeld, [], 'every old store cluster released through the holder');
  assertQemuClean(foreign);
  assertCheckClean(foreign);

  // The dirty flag (a crash): bit 60 still set, but untrusted; nothing leaks.
  const dirty = copy(img, 'dirty');
  const bytes = readFileSync(dirty);
  const h = decodeHeader(bytes.subarray(0, 4096));
  const ext = h.extensions.find((e) => e.type === EXT_DEDUP)!;
  const at = bytes.indexOf(ext.data.subarray(0, 16), h.headerLength);
  bytes[at + 2] |= 1;
  writeFileSync(dirty, bytes);
  const d = checkJson(dirty);
  assert.equal(d.status, 0, d.stderr);
  assert.equal(d.json.leaks, undefined);
  assert.match(d.json.dedup.reason, /dirty flag/);
  assert.equal(q('check', '-r', 'leaks', dirty).status, 0);
  assertQemuClean(dirty);

  // qemu-img check -r leaks on a dedup image (bit 60 set): QEMU 7.2 clears the unknown
  // autoclear bit while opening in check mode, and the header it rewrites then names no
  // snapshots (check mode has not read them yet): the holder (and any other internal
  // snapshot) is gone, its clusters are freed as leaks and COPIED is set again on clusters
  // left with one reference. Guest data is intact; qdedup starts a fresh index and holder.
  const byQemu = copy(img, 'qemu-repair');
  assert.equal(run('qemu-img', ['check', '-q', '-r', 'leaks', '-f', 'qcow2', byQemu]).status, 0);
  assert.equal(bit60(byQemu), false);
  assert.equal(run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', img, byQemu]).status, 0, 'guest data intact');
  const after = checkJson(byQemu);
  assert.equal(after.status, 0, after.stderr);
  assert.equal(after.json.dedup.trusted, false);
  const again = q('write', '-q', '-i', input.path, byQemu, String(2 * MiB));
  assert.equal(again.status, 0, again.stderr);
  assertQemuClean(byQemu);
  assertCheckClean(byQemu);
});

test("read-only: check (plain, --deep, JSON) never changes a byte, whatever the store's state", { skip: NO_QEMU }, () => {
  const img = create('16M');
  const input = randomFile(64 * 1024);
  ok('write', '-q', '-i', input.path, img, '0');
  ok('write', '-q', '-i', input.path, img, String(MiB));
  const badIndex = plant(img, 'ro-bad', 0, (bytes, p) => {
    bytes[p + 5] ^= 1;
  });
  const foreign = copy(img, 'ro-foreign');
  assert.equal(run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 4M 4k', foreign]).status, 0);
  for (const file of [img, badIndex, foreign]) {
    const before = sha256(file);
    const mtime = statSync(file).mtimeMs;
    for (const args of [
      ['check', file],
      ['check', '--deep', file],
      ['check', '--output', 'json', '--deep', file],
      ['check', '-q', file],
    ]) {
      q(...args);
      assert.equal(sha256(file), before, `${args.join(' ')} changed ${file}`);
    }
    assert.equal(statSync(file).mtimeMs, mtime);
  }
});

// A dedup extension that does not decode used to make every later write refuse, with no
// repair in check: the next write now replaces it (default settings, fresh store) as it
// replaces an untrusted store; the old one's clusters are released through the holder.
test('a malformed dedup extension: check reports it (exit 2); the next write replaces it with a fresh index; data reads back', () => {
  const file = create('64M');
  const first = randomFile(1 * MiB);
  ok('write', '-q', '-i', first.path, file, '0');
  const bytes = readFileSync(file);
  bytes[dedupExtensionPayload(bytes) + 3] = 30; // store order 30: above the limit of 20
  writeFileSync(file, bytes);

  const before = q('check', file);
  assert.equal(before.status, 2);
  assert.match(before.stdout + before.stderr, /ERROR dedup header extension: store order 30 above 20/);

  const w = q('write', '-i', first.path, file, '2M'); // not -q: -q silences the notice
  assert.equal(w.status, 0, w.stderr);
  assert.match(
    w.stderr,
    /^qdedup: .*: dedup index not trusted: dedup header extension: store order 30 above 20; the extension is replaced, with the default settings; starting a fresh index/,
  );
  const again = q('write', '-q', '-i', first.path, file, '4M');
  assert.equal(again.status, 0, again.stderr);
  assert.equal(again.stderr, '', 'the replacement is trusted');
  const st = stats(file);
  assert.equal(st.trusted, true);
  // The copy at 2M could not find the old store's clusters (a fresh index); the one at 4M shares 2M's.
  assert.deepEqual([st['guest-clusters'], st['data-clusters']], [768, 512]);
  for (const off of ['0', '2M', '4M']) assert.ok(ok('read', file, off, '1M').stdoutBytes.equals(first.data), `guest ${off}`);
  assertQemuClean(file);
  const after = checkJson(file);
  assert.equal(after.status, 0, after.stderr);
  assert.equal(after.json.corruptions, undefined);
  assert.equal(after.json.leaks, undefined, 'the old store was released through the holder');
});
