// Torn and corrupted journal blocks: every kind of damage
// (torn prefix, bad checksum, old sequence number, zeroed, garbage entry size, entry crossing
// the block end) at 3 positions (first block, a middle block, the last written block) must
// stop replay at the damaged block with nothing after it used — in replayJournal(), in
// journal-dump, and through the real CLI, where the next `qdedup write` drops the store
// (even the kinds that look like a clean end: replay must stop exactly at the blocks the
// configuration area says were written, else a lost deletion could link a reused cluster),
// and every byte reads back right. A planted stale index entry never links wrong data, with
// dedup_verify on or off.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { closeSync, openSync, readFileSync, readSync, writeFileSync, writeSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { Journal, replayJournal } from '../../src/dedup/journal.ts';
import { scanJournal } from '../../src/dedup/journal-scan.ts';
import { JOURNAL_HEADER_BYTES, decodeJournalBlock, encodeJournalBlock, type JournalEntry } from '../../src/format/journal-block.ts';
import { MemFile } from '../doubles/mem-file.ts';
import { NO_QEMU, qdedup, qemuCheck, qemuCompareRaw, run, tempDir } from '../helpers.ts';
import { clusterOf, qdedupOk } from './cli-lib.ts';

const CS = 4096;
const dir = tempDir('qdedup-jdamage-');
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

// ------------------------------------------------------------------ the kinds of damage

const KINDS = ['torn-prefix', 'bad-checksum', 'old-sequence', 'zeroed', 'garbage-entry-size', 'entry-crosses-block-end'] as const;
type Kind = (typeof KINDS)[number];
/** Verdict replay must give, and whether the next write drops the whole store (Dedup.attach). */
const EXPECT: Record<Kind, { verdict: string; drops: boolean }> = {
  'torn-prefix': { verdict: 'bad-checksum', drops: true },
  'bad-checksum': { verdict: 'bad-checksum', drops: true },
  'old-sequence': { verdict: 'bad-sequence', drops: true },
  zeroed: { verdict: 'empty', drops: true },
  'garbage-entry-size': { verdict: 'bad-entry', drops: true },
  'entry-crosses-block-end': { verdict: 'bad-entry', drops: true },
};
const POSITIONS = ['first', 'middle', 'last written'] as const;

function fixCrc(b: Buffer): Buffer {
  b.writeUInt32BE(crc32(b.subarray(8)), 4);
  return b;
}

/**
 * Damages a copy of a valid, committed journal block. `stale` is the sequence number the
 * same block carried in the previous use of the area; `variant` (0–2, the position) picks
 * one of several forms of the same kind, so the matrix covers more of the decoder.
 */
function damage(block: Buffer, kind: Kind, expected: number, stale: number, variant: number): Buffer {
  const bs = block.length;
  const out = Buffer.from(block);
  const count = block.readUInt16BE(16);
  assert.ok(count >= 2 && JOURNAL_HEADER_BYTES + count * 52 > 512, 'the block must hold entries past its first sector');
  switch (kind) {
    case 'torn-prefix': {
      // Only the first 512-byte sector of the block reached the disk; the rest is what the
      // area held before: zeros (never written), or an older block's bytes.
      const before =
        variant === 1
          ? encodeJournalBlock(
              bs,
              stale,
              Array.from({ length: count + 1 }, (_, i) => entry(`old ${i}`, i)),
            )
          : Buffer.alloc(bs);
      before.copy(out, 512, 512);
      return out;
    }
    case 'bad-checksum':
      // One bit flips: in an entry's hash, in the checksum itself, or in the zero padding (covered too).
      out[[JOURNAL_HEADER_BYTES + 4 + 5, 5, bs - 1][variant]] ^= 0x01;
      return out;
    case 'old-sequence': {
      // A whole, checksummed block from an earlier use of the area.
      const entries = decodeJournalBlock(block, expected).entries.map(({ offsetInBlock, ...e }) => e);
      return encodeJournalBlock(bs, stale, entries);
    }
    case 'zeroed':
      return Buffer.alloc(bs);
    case 'garbage-entry-size':
      // Payload length of entry 0: runs far past the entries, zero, or one byte short. Checksum fixed.
      out.writeUInt16BE([0xffff, 0, 47][variant], JOURNAL_HEADER_BYTES + 2);
      return fixCrc(out);
    case 'entry-crosses-block-end': {
      // The last entry's length makes it end 4 bytes past the block; variant 1 leaves the
      // header's entry bytes alone (the entry then also crosses the end of the entries).
      const last = JOURNAL_HEADER_BYTES + (count - 1) * 52;
      const length = bs - last - 4 + 4;
      out.writeUInt16BE(length, last + 2);
      if (variant !== 1) out.writeUInt16BE(block.readUInt16BE(18) - 48 + length, 18);
      return fixCrc(out);
    }
  }
}

function entry(tag: string, i: number, deleted = false): JournalEntry {
  return { hash: createHash('sha256').update(tag).digest(), hostOffset: CS * (100 + i), firstGuestOffset: CS * i, deleted };
}

let inProcessCases = 0;
let cliCases = 0;
let droppedCases = 0;

// ------------------------------------------------------------------ replayJournal and the scan

test('every kind of damage at 3 positions stops replayJournal() and the scan at the damaged block; nothing after it is used', async () => {
  const bs = 1024;
  const desc = { offset: 8192, blocks: 8, startSequence: 9, written: 0 }; // reset once: block i's stale sequence is i
  const sessions = 4;
  const file = new MemFile();
  const written: JournalEntry[][] = [];
  for (let s = 0; s < sessions; s++) {
    // One session per block, as qdedup writes them: 12 entries (one in three a deletion).
    const j = new Journal(file, desc, bs, s);
    const es = Array.from({ length: 12 }, (_, i) => entry(`s${s} e${i}`, s * 12 + i, i % 3 === 2));
    for (const e of es) j.append(e.hash, 0, e.hostOffset, e.firstGuestOffset, e.deleted);
    await j.flush();
    written.push(es);
  }
  const clean = await replayJournal(file, desc, bs);
  assert.deepEqual([clean.stop.block, clean.stop.verdict, clean.entries.length], [sessions, 'empty', 48]);
  const positions = [0, 2, sessions - 1];
  for (const kind of KINDS) {
    for (const [variant, b] of positions.entries()) {
      const bytes = Buffer.from(file.bytes());
      const at = desc.offset + b * bs;
      damage(bytes.subarray(at, at + bs), kind, desc.startSequence + b, b, variant).copy(bytes, at);
      const damaged = new MemFile('damaged', bytes);
      const what = `${kind} at block ${b}`;
      const r = await replayJournal(damaged, desc, bs);
      assert.deepEqual([r.stop.block, r.stop.verdict], [b, EXPECT[kind].verdict], `${what}: ${r.stop.reason}`);
      const strip = (es: JournalEntry[]) => es.map(({ offsetInBlock, ...e }) => e);
      assert.deepEqual(strip(r.entries), written.slice(0, b).flat(), `${what}: exactly the entries before the damage`);
      const scan = await scanJournal(damaged, desc, bs);
      assert.deepEqual(scan.stop, r.stop, what);
      assert.deepEqual(
        scan.blocks.filter((x) => x.replayed).map((x) => x.index),
        [...Array(b).keys()],
        `${what}: replayed blocks`,
      );
      assert.equal(scan.replayedEntries, b * 12);
      assert.equal(scan.blocks[b].verdict, EXPECT[kind].verdict);
      // Blocks after the damage that are still whole are shown, marked unused.
      for (const x of scan.blocks.slice(b + 1)) assert.equal(x.replayed, false);
      assert.equal(scan.blocks.length, sessions, `${what}: every written block listed, the damaged one and those after it included`);
      inProcessCases++;
    }
  }
  assert.equal(inProcessCases, 18);
});

// ------------------------------------------------------------------ through the real CLI

/** A 4 KiB cluster of content unique to `tag`. */
const cluster = (tag: string) => clusterOf(tag, CS);
const ok = (args: string[]) => qdedupOk(args).stdout;

type DumpJournal = {
  index: number;
  role: string;
  offset: number;
  'start-sequence': number;
  'blocks-total': number;
  'replay-stop': { block: number; verdict: string; reason: string };
  'entries-replayed': number;
  blocks: { index: number; replayed: boolean; verdict: string; 'entry-count': number; entries: { hash: string; deleted: boolean; 'host-offset': number }[] }[];
};
type Dump = {
  trusted: boolean;
  'index-kept': boolean;
  'index-reason': string;
  'current-journal': number;
  'config-offset': number;
  'journal-block-size': number;
  journals: DumpJournal[];
};
const dump = (file: string): Dump => JSON.parse(ok(['journal-dump', '--output', 'json', file]));
const current = (d: Dump) => d.journals[d['current-journal']];

function readAt(path: string, pos: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  const b = Buffer.alloc(length);
  readSync(fd, b, 0, length, pos);
  closeSync(fd);
  return b;
}
function writeAt(path: string, pos: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  writeSync(fd, data, 0, data.length, pos);
  closeSync(fd);
}

/**
 * The base image, built once: a dedup image whose log store froze once (so its current
 * journal was reset and has a start sequence past 0: a block from the earlier use is
 * "old"), then three sessions whose blocks 0, 1, 2 of the current journal each hold more
 * than a sector of entries, with deletions from rewrites in blocks 1 and 2.
 */
function buildBase(): { path: string; shadow: Buffer; contents: Buffer[]; dump: Dump } {
  const path = join(dir, 'base.qcow2');
  const shadow = Buffer.alloc(8 * 1024 * 1024);
  const contents: Buffer[] = [];
  ok(['create', '-q', path, '64M', '-o', 'dedup_order=5']); // 128 slots, 4096-byte journal blocks
  const session = (tag: string, count: number, guestCluster: number) => {
    const cs = Array.from({ length: count }, (_, i) => cluster(`${tag} ${i}`));
    contents.push(...cs);
    const data = Buffer.concat(cs);
    const input = join(dir, `base-${tag}.raw`);
    writeFileSync(input, data);
    ok(['write', '-q', '-i', input, path, String(guestCluster * CS)]);
    data.copy(shadow, guestCluster * CS);
  };
  session('U', 160, 0); // the log store freezes once; the rest goes to the current journal's block 0
  session('V', 16, 152); // rewrites U152–U159 (8 deletions) + 8 new clusters: block 1
  session('W', 16, 164); // rewrites V12–V15 (4 deletions) + 12 new clusters: block 2
  const d = dump(path);
  const j = current(d);
  assert.equal(d['current-journal'], 1, 'the base froze its first log store');
  assert.ok(j['start-sequence'] > 2, 'the current journal was reset: old sequence numbers exist');
  assert.deepEqual([j['replay-stop'].block, j['replay-stop'].verdict], [3, 'empty']);
  assert.ok(j.blocks[1].entries.some((e) => e.deleted) && j.blocks[2].entries.some((e) => e.deleted), 'deletions in blocks 1 and 2');
  return { path, shadow, contents, dump: d };
}

test('through the CLI: damage stops replay in journal-dump; the next write drops the store; data always reads back', { skip: NO_QEMU }, () => {
  const t0 = Date.now();
  const base = buildBase();
  const baseJournal = current(base.dump);
  const bs = base.dump['journal-block-size'];
  const all = Buffer.concat(base.contents); // every content ever written, for the follow-up write
  const allInput = join(dir, 'all.raw');
  writeFileSync(allInput, all);
  const FOLLOW = 1024; // guest cluster of the follow-up write
  const REWRITE = [150, 40] as const; // guest clusters rewritten by the second follow-up
  for (const kind of KINDS) {
    for (const [variant, b] of [0, 1, 2].entries()) {
      const what = `${kind} at block ${b} (${POSITIONS[variant]})`;
      const img = join(dir, `case-${kind}-${b}.qcow2`);
      writeFileSync(img, readFileSync(base.path));
      const at = baseJournal.offset + b * bs;
      const stale = b + baseJournal['start-sequence'] - (baseJournal['blocks-total'] + 1);
      writeAt(img, at, damage(readAt(img, at, bs), kind, baseJournal['start-sequence'] + b, stale, variant));

      // journal-dump: replay stops at the damage; nothing from it or after it is counted.
      const before = readFileSync(img);
      const d = dump(img);
      assert.ok(readFileSync(img).equals(before), `${what}: journal-dump wrote to the file`);
      const j = current(d);
      assert.deepEqual([j['replay-stop'].block, j['replay-stop'].verdict], [b, EXPECT[kind].verdict], `${what}: ${j['replay-stop'].reason}`);
      assert.deepEqual(
        j.blocks.filter((x) => x.replayed).map((x) => x.index),
        [...Array(b).keys()],
        what,
      );
      assert.equal(
        j['entries-replayed'],
        baseJournal.blocks.slice(0, b).reduce((n, x) => n + x['entry-count'], 0),
        what,
      );
      assert.equal(d['index-kept'], !EXPECT[kind].drops, `${what}: ${d['index-reason']}`);

      // The next write: every content ever written, again, at fresh guest offsets.
      const w = qdedup(['write', '-i', allInput, img, String(FOLLOW * CS)]); // not -q: -q silences the notice
      assert.equal(w.status, 0, `${what}: ${w.stderr}`);
      all.copy(shadowOf(base.shadow, img), FOLLOW * CS);
      const after = dump(img);
      assert.ok(EXPECT[kind].drops);
      assert.match(w.stderr, /dedup index not trusted: journal \d block \d+ is damaged/, what);
      assert.notEqual(after['config-offset'], base.dump['config-offset'], `${what}: a fresh store, elsewhere`);
      droppedCases++;
      assert.equal(after.trusted, true);
      // A second write rewrites clusters whose index entries may be lost (the release path).
      ok(['write', '-q', '-P', '0x5a', img, String(REWRITE[0] * CS), String(REWRITE[1] * CS)]);
      shadowOf(base.shadow, img).fill(0x5a, REWRITE[0] * CS, (REWRITE[0] + REWRITE[1]) * CS);

      // Every byte reads back right, through qdedup and through QEMU (qemu-img compare); no corruption.
      const shadow = shadowOf(base.shadow, img);
      const r = qdedup(['read', img, '0', String(shadow.length)]);
      assert.equal(r.status, 0, r.stderr);
      assert.ok(r.stdoutBytes.equals(shadow), `${what}: guest bytes differ from the shadow`);
      const raw = join(dir, 'shadow.raw');
      writeFileSync(raw, shadow);
      truncateSync(raw, 64 * 1024 * 1024);
      assert.ok(qemuCompareRaw(img, raw), `${what}: qemu-img compare`);
      const check = qemuCheck(img);
      assert.notEqual(check.status, 2, `${what}: qemu-img check: ${check.stderr}`);
      assert.ok(!check.json?.corruptions, `${what}: corruptions`);
      cliCases++;
    }
  }
  assert.equal(cliCases, 18);
  console.log(
    `journal damage: ${inProcessCases} cases in replayJournal() + ${cliCases} through the CLI (${KINDS.length} kinds x 3 positions), replay stopped at the damage in all; next write dropped the store (with a notice) in ${droppedCases}; guest data byte-exact and qemu-img check without corruption in all (${((Date.now() - t0) / 1000).toFixed(1)} s)`,
  );
});

/** Per-image copies of the base shadow (each case diverges from the base). */
const shadows = new Map<string, Buffer>();
function shadowOf(base: Buffer, img: string): Buffer {
  let s = shadows.get(img);
  if (!s) shadows.set(img, (s = Buffer.from(base)));
  return s;
}

// ------------------------------------------------------------------ verify mode

/** Rewrites block 0 of the current journal with one more entry: hash of `content`, pointing at `hostOffset`. */
function plantStaleEntry(img: string, content: Buffer, hostOffset: number, guestOffset: number): void {
  const d = dump(img);
  const j = current(d);
  const bs = d['journal-block-size'];
  const block = readAt(img, j.offset, bs);
  const decoded = decodeJournalBlock(block, j['start-sequence']);
  assert.equal(decoded.verdict, 'valid');
  const entries = decoded.entries.map(({ offsetInBlock, ...e }) => e);
  entries.push({ hash: createHash('sha256').update(content).digest(), hostOffset, firstGuestOffset: guestOffset, deleted: false });
  writeAt(img, j.offset, encodeJournalBlock(bs, j['start-sequence'], entries));
}

// An entry replayed from disk is not confirmed for the session (src/dedup/slot-bits.ts): its
// first hit compares bytes even with dedup_verify=off, so a lying entry costs a read, never
// wrong data. (Before, verify off believed it: the fuzzer's F1, now a regression.)
test('a planted stale index entry (hash of A, cluster holding B) never links A to B, dedup_verify on or off', { skip: NO_QEMU }, () => {
  const A = Buffer.alloc(CS, 0xaa);
  for (const verify of ['on', 'off']) {
    const img = join(dir, `verify-${verify}.qcow2`);
    ok(['create', '-q', img, '64M', '-o', `dedup_order=5,dedup_journal_block=512,dedup_verify=${verify}`]);
    ok(['write', '-q', '-P', '0xbb', img, '0', '4k']); // B, indexed
    const b = current(dump(img)).blocks[0].entries[0];
    assert.equal(b.hash, sha(Buffer.alloc(CS, 0xbb)));
    plantStaleEntry(img, A, b['host-offset'], CS);
    const planted = current(dump(img));
    assert.deepEqual([planted['replay-stop'].block, planted['entries-replayed']], [1, 2], 'the planted block replays');
    const w = qdedupOk(['write', '-q', '-P', '0xaa', img, '4k', '4k']); // A: the index says "B's cluster"
    assert.equal(
      w.stderr,
      `qdedup: ${img}: warning: 1 dedup index entry names a cluster holding other content; not used (a damaged index: 'qdedup check --deep' lists such entries)\n`,
    );
    const readA = qdedup(['read', '-q', '-P', '0xaa', img, '4k', '4k']);
    assert.equal(readA.status, 0, `verify ${verify}: A was linked to B: ${readA.stderr}`);
    ok(['read', '-q', '-P', '0xbb', img, '0', '4k']);
    const io = run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0xaa 4096 4096', '-c', 'read -P 0xbb 0 4096', img]);
    assert.equal(io.status, 0, io.stderr);
    assert.doesNotMatch(io.stdout + io.stderr, /verification failed/i);
    // The refused link became a new cluster, indexed under A's hash with its own host offset.
    const entries = current(dump(img))
      .blocks.filter((x) => x.replayed)
      .flatMap((x) => x.entries);
    const aEntries = entries.filter((e) => e.hash === sha(A) && !e.deleted);
    assert.equal(aEntries.length, 2);
    assert.notEqual(aEntries[1]['host-offset'], b['host-offset']);
    assert.ok(!qemuCheck(img).json?.corruptions);
  }
});

// ------------------------------------------------------------------ regression: a lost deletion (found by this harness)

test(
  'a zeroed or stale journal block that held a deletion must not let a later write link to a reused cluster',
  {
    skip: NO_QEMU,
  },
  () => {
    const wrong: string[] = [];
    for (const kind of ['zeroed', 'old-sequence'] as const) {
      const img = join(dir, `lost-deletion-${kind}.qcow2`);
      ok(['create', '-q', img, '64M', '-o', 'dedup_order=5,dedup_journal_block=512']);
      ok(['write', '-q', '-P', '0x11', img, '0', '4k']); // A at cluster X: block 0 [A→X]
      ok(['write', '-q', '-P', '0x22', img, '0', '4k']); // rewrite: block 1 [C→Y, delete A]; X freed
      const j = current(dump(img));
      assert.ok(j.blocks[1].entries.some((e) => e.deleted));
      const bs = 512;
      const at = j.offset + bs;
      // Zeroed, or the same entries under block 0's sequence number (a checksummed block that is not block 1's).
      const entries = decodeJournalBlock(readAt(img, at, bs), j['start-sequence'] + 1).entries.map(({ offsetInBlock, ...e }) => e);
      writeAt(img, at, kind === 'zeroed' ? Buffer.alloc(bs) : encodeJournalBlock(bs, j['start-sequence'], entries));
      assert.equal(current(dump(img))['replay-stop'].block, 1);
      ok(['write', '-q', '-P', '0x33', img, '4k', '4k']); // B: a new cluster — X, free again
      ok(['write', '-q', '-P', '0x11', img, '8k', '4k']); // A again: the stale A→X entry
      if (qdedup(['read', '-q', '-P', '0x11', img, '8k', '4k']).status !== 0) wrong.push(kind);
    }
    assert.deepEqual(wrong, [], `A at 8k reads back as B (linked to the reused cluster) after: ${wrong.join(', ')}`);
  },
);
