// `qdedup check` against `qemu-img check` (the oracle): images made by qemu-img/qemu-io,
// damaged byte by byte like QEMU's iotests 060, then checked by both tools, plain, with
// -r leaks and with -r all. The JSON numbers, the exit codes and the problem lines must be
// the same, and after a repair `qemu-img check` must judge both images alike.
// Skips (saying why) when qemu-img/qemu-io are not installed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NO_QEMU, qdedup, qemuCheck, run, tempDir } from '../helpers.ts';
import { checkExitCode, checkImage, type RepairMode } from '../../src/image/check-image.ts';
import { checkJson, quietKeeps } from '../../src/cli/format-check.ts';
import { getRefcount, setRefcount } from '../../src/format/refcount.ts';

const dir = NO_QEMU ? '' : tempDir('qdedup-check-');
let serial = 0;

// ---------------------------------------------------------------- making and damaging images

/** A fresh image from qemu-img create (-o options) with qemu-io commands applied. */
function makeImage(size: string, options: string[], commands: string[]): string {
  const file = join(dir, `img${serial++}.qcow2`);
  const opts = options.length ? ['-o', options.join(',')] : [];
  const c = run('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, file, size]);
  assert.equal(c.status, 0, c.stderr);
  if (commands.length) {
    const w = run('qemu-io', ['-f', 'qcow2', ...commands.flatMap((cmd) => ['-c', cmd]), file]);
    assert.equal(w.status, 0, w.stderr);
  }
  return file;
}

interface Layout {
  clusterSize: number;
  refcountOrder: number;
  l1Offset: number;
  reftableOffset: number;
}

function layout(file: string): Layout {
  const d = readFileSync(file);
  const version = d.readUInt32BE(4);
  return {
    clusterSize: 2 ** d.readUInt32BE(20),
    refcountOrder: version === 3 ? d.readUInt32BE(96) : 4,
    l1Offset: Number(d.readBigUInt64BE(40)),
    reftableOffset: Number(d.readBigUInt64BE(48)),
  };
}

function patchU64(file: string, offset: number, value: bigint): void {
  const d = readFileSync(file);
  d.writeBigUInt64BE(value, offset);
  writeFileSync(file, d);
}

function readU64(file: string, offset: number): bigint {
  return readFileSync(file).readBigUInt64BE(offset);
}

/** Byte offset of the refcount entry's block and index for host cluster `clusterIndex`. */
function refcountSlot(file: string, clusterIndex: number): { blockOffset: number; index: number; order: number } {
  const l = layout(file);
  const perBlock = (l.clusterSize * 8) / 2 ** l.refcountOrder;
  const blockOffset = Number(readU64(file, l.reftableOffset + 8 * Math.floor(clusterIndex / perBlock)) & ~0x1ffn);
  return { blockOffset, index: clusterIndex % perBlock, order: l.refcountOrder };
}

function setStoredRefcount(file: string, clusterIndex: number, value: number): void {
  const { blockOffset, index, order } = refcountSlot(file, clusterIndex);
  const d = readFileSync(file);
  const block = d.subarray(blockOffset, blockOffset + layout(file).clusterSize);
  setRefcount(block, index, order, value);
  writeFileSync(file, d);
}

function storedRefcount(file: string, clusterIndex: number): number {
  const { blockOffset, index, order } = refcountSlot(file, clusterIndex);
  const d = readFileSync(file);
  return getRefcount(d.subarray(blockOffset, blockOffset + layout(file).clusterSize), index, order);
}

/** Byte offset of the active L2 entry of guest cluster `guestCluster`. */
function l2EntryOffset(file: string, guestCluster: number): number {
  const l = layout(file);
  const perL2 = l.clusterSize / 8;
  const l1e = readU64(file, l.l1Offset + 8 * Math.floor(guestCluster / perL2));
  return Number(l1e & 0x00fffffffffffe00n) + 8 * (guestCluster % perL2);
}

const getL2 = (file: string, guestCluster: number) => readU64(file, l2EntryOffset(file, guestCluster));
const setL2 = (file: string, guestCluster: number, value: bigint) => patchU64(file, l2EntryOffset(file, guestCluster), value);
/** Host cluster index that guest cluster `guestCluster` maps to. */
const hostCluster = (file: string, guestCluster: number) => {
  const l = layout(file);
  return Number(getL2(file, guestCluster) & 0x00fffffffffffe00n) / l.clusterSize;
};
const COPIED = 1n << 63n;

// ---------------------------------------------------------------- the comparison

type Mode = 'none' | RepairMode;

interface Outcome {
  status: number;
  json: Record<string, unknown> | null;
  lines: string[];
}

function withoutFilename(json: Record<string, unknown> | null): Record<string, unknown> | null {
  if (!json) return null;
  const { filename: _f, ...rest } = json;
  return rest;
}

function qemuOutcome(file: string, mode: Mode): Outcome {
  const q = qemuCheck(file, mode === 'none' ? undefined : mode);
  // The problem lines; qemu-img's own "qemu-img: …" lines are the CLI's business, not the check's.
  const lines = q.stderr.split('\n').filter((l) => l && !l.startsWith('qemu-img: '));
  return { status: q.status, json: q.status === 1 && !q.json ? null : withoutFilename(q.json), lines };
}

async function ourOutcome(file: string, mode: Mode): Promise<Outcome> {
  const r = await checkImage(file, { repair: mode === 'none' ? undefined : mode });
  const lines = r.messages.filter((l) => !l.startsWith('qdedup: '));
  return { status: checkExitCode(r), json: r.failure === undefined ? withoutFilename(checkJson(r)) : null, lines };
}

interface CompareOptions {
  /** Modes whose outcome may differ from QEMU's on purpose (qdedup repairs more); they must then end clean. */
  betterThanQemu?: Mode[];
  /** Also compare the problem lines (default true). */
  lines?: boolean;
}

/**
 * Checks `file` with both tools in every mode, each on its own copy, and compares. Returns
 * the qdedup outcomes by mode. A plain check must not change a byte of the file.
 */
async function compareWithQemu(file: string, options: CompareOptions = {}): Promise<Record<Mode, Outcome>> {
  const out = {} as Record<Mode, Outcome>;
  for (const mode of ['none', 'leaks', 'all'] as Mode[]) {
    const qemuCopy = `${file}.${mode}.qemu`;
    const ourCopy = `${file}.${mode}.ours`;
    copyFileSync(file, qemuCopy);
    copyFileSync(file, ourCopy);
    const before = readFileSync(ourCopy);
    const q = qemuOutcome(qemuCopy, mode);
    const o = await ourOutcome(ourCopy, mode);
    out[mode] = o;
    const qAfter = qemuCheck(qemuCopy).status;
    const oAfter = qemuCheck(ourCopy).status;
    if (mode === 'none') assert.ok(readFileSync(ourCopy).equals(before), 'a check without -r must not write');
    if (options.betterThanQemu?.includes(mode)) {
      assert.equal(o.status, 0, `${mode}: qdedup's repair should leave a clean image`);
      assert.equal(oAfter, 0, `${mode}: qemu-img check after qdedup's repair`);
      continue;
    }
    assert.deepEqual(o.json, q.json, `${mode}: JSON`);
    assert.equal(o.status, q.status, `${mode}: exit code`);
    if (options.lines ?? true) assert.deepEqual(o.lines, q.lines, `${mode}: problem lines`);
    assert.equal(oAfter, qAfter, `${mode}: qemu-img check of the result`);
    if (mode !== 'none' && qAfter === 0) {
      assert.equal(run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', qemuCopy, ourCopy]).status, 0, `${mode}: guest data after repair`);
    }
  }
  return out;
}

/** The base image most cases damage: 64 KiB clusters, guest clusters 0, 1 and 16 written. */
const basic = () => makeImage('1G', [], ['write -P 1 0 128k', 'write -P 2 1M 64k']);
/** Like basic() with guest cluster 1 discarded: its host cluster is free (refcount 0) inside the file. */
const withHole = () => makeImage('1G', [], ['write -P 1 0 128k', 'write -P 2 1M 64k', 'discard 64k 64k']);
/** Two snapshots taken by qemu-img snapshot -c, with writes between them. */
const withSnapshots = () => {
  const file = makeImage('4M', [], ['write -P 1 0 192k']);
  assert.equal(run('qemu-img', ['snapshot', '-c', 's1', file]).status, 0);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 2 64k 64k', '-c', 'write -P 3 1M 64k', file]);
  assert.equal(run('qemu-img', ['snapshot', '-c', 's2', file]).status, 0);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 4 0 64k', file]);
  return file;
};

const skip = NO_QEMU;

// ---------------------------------------------------------------- clean images

test('clean images of every kind check like qemu-img', { skip }, async () => {
  await compareWithQemu(basic());
  await compareWithQemu(makeImage('1M', ['cluster_size=512'], ['write -P 1 0 8k', 'write -P 2 100k 3k', 'discard 2k 1k', 'write -z 4k 1k']));
  await compareWithQemu(makeImage('1M', ['refcount_bits=1'], ['write -P 1 0 128k', 'discard 0 64k']));
  await compareWithQemu(makeImage('1M', ['refcount_bits=64'], ['write -P 1 0 128k']));
  await compareWithQemu(makeImage('1M', ['compat=0.10'], ['write -P 1 0 128k']));
  await compareWithQemu(withSnapshots());
});

test('compressed image from qemu-img convert -c', { skip }, async () => {
  const raw = join(dir, 'compressible.raw');
  const random = Buffer.alloc(100_000);
  for (let i = 0; i < random.length; i++) random[i] = (i * 2654435761) >>> 24;
  writeFileSync(raw, Buffer.concat([random, Buffer.alloc(300_000, 0x61), Buffer.alloc(100_000)]));
  const file = join(dir, 'compressed.qcow2');
  assert.equal(run('qemu-img', ['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4k', raw, file]).status, 0);
  const clean = await compareWithQemu(file);
  assert.ok((clean.none.json!['compressed-clusters'] as number) > 0, 'the image has compressed clusters');
  // A compressed cluster's host cluster with refcount 0: a rebuild.
  const entry = getL2(file, 30);
  assert.ok(entry & (1n << 62n), 'guest cluster 30 is compressed');
  const damaged = `${file}.rc0.qcow2`;
  copyFileSync(file, damaged);
  setStoredRefcount(damaged, Number(entry & ((1n << 58n) - 1n)) >> 12, 0);
  await compareWithQemu(damaged);
});

// ---------------------------------------------------------------- refcount damage

test('leak: refcount 1 on a free cluster', { skip }, async () => {
  const file = withHole();
  setStoredRefcount(file, 6, 1);
  const r = await compareWithQemu(file);
  assert.equal(r.none.status, 3);
  assert.equal(r.leaks.json!['leaks-fixed'], 1);
});

test('refcount too low: 0 on a used data cluster needs a rebuild (-r leaks cannot)', { skip }, async () => {
  const file = basic();
  setStoredRefcount(file, hostCluster(file, 1), 0);
  const r = await compareWithQemu(file);
  assert.equal(r.none.status, 2);
  assert.equal(r.leaks.status, 1);
  assert.equal(r.all.status, 0);
});

test('refcount too low but not 0: a cluster shared with a snapshot', { skip }, async () => {
  const file = withSnapshots();
  const shared = hostCluster(file, 2); // written before the first snapshot, never since
  assert.ok(storedRefcount(file, shared) > 1);
  setStoredRefcount(file, shared, 1);
  await compareWithQemu(file);
});

test('refcount too high: a leak plus a COPIED mismatch', { skip }, async () => {
  const file = basic();
  setStoredRefcount(file, hostCluster(file, 1), 2);
  const r = await compareWithQemu(file);
  assert.equal(r.none.json!.leaks, 1);
  assert.equal(r.none.json!.corruptions, 1);
});

test('refcount block: its own refcount 0 in a 512-byte-cluster image', { skip }, async () => {
  const file = makeImage('64M', ['cluster_size=512'], ['write -P 1 0 4M', 'write -P 2 20M 64k']);
  setStoredRefcount(file, 300, 0);
  await compareWithQemu(file);
});

test('refcount_bits=1 and 64: leaks, refcount 0, and an overflow of a 1-bit refcount', { skip }, async () => {
  for (const bits of [1, 64]) {
    const leak = makeImage('1M', [`refcount_bits=${bits}`], ['write -P 1 0 128k', 'discard 0 64k']);
    setStoredRefcount(leak, 5, 1);
    await compareWithQemu(leak);
    const low = makeImage('1M', [`refcount_bits=${bits}`], ['write -P 1 0 128k']);
    setStoredRefcount(low, hostCluster(low, 1), 0);
    await compareWithQemu(low);
  }
  // Two L2 entries, one host cluster: the second reference overflows a 1-bit refcount.
  const over = makeImage('1M', ['refcount_bits=1'], ['write -P 1 0 64k', 'write -P 2 128k 64k']);
  setL2(over, 2, getL2(over, 0));
  const r = await compareWithQemu(over);
  assert.ok(r.none.lines.some((l) => l.startsWith('ERROR: overflow cluster offset=')));
});

// ---------------------------------------------------------------- COPIED flags

test('COPIED clear on a data cluster with refcount 1 (-r leaks repairs it)', { skip }, async () => {
  const file = basic();
  setL2(file, 1, getL2(file, 1) & ~COPIED);
  const r = await compareWithQemu(file);
  assert.equal(r.leaks.json!['corruptions-fixed'], 1);
});

test('COPIED set on a data cluster shared with a snapshot', { skip }, async () => {
  const file = withSnapshots();
  setL2(file, 2, getL2(file, 2) | COPIED);
  await compareWithQemu(file);
});

test('COPIED clear on an L1 entry whose L2 table has refcount 1', { skip }, async () => {
  const file = basic();
  const l = layout(file);
  patchU64(file, l.l1Offset, readU64(file, l.l1Offset) & ~COPIED);
  await compareWithQemu(file);
});

// ---------------------------------------------------------------- L1/L2 damage

test('L2 entry past the end of the file', { skip }, async () => {
  const file = basic();
  setL2(file, 1, COPIED | 0x10000000n);
  await compareWithQemu(file);
});

test('L2 table past the end of the file', { skip }, async () => {
  const file = basic();
  patchU64(file, layout(file).l1Offset, COPIED | 0x10000000n);
  await compareWithQemu(file);
});

test('L2 entry not cluster aligned (data), and L2 table not aligned', { skip }, async () => {
  const data = basic();
  setL2(data, 1, getL2(data, 1) + 0x200n);
  await compareWithQemu(data);
  const table = basic();
  const l = layout(table);
  patchU64(table, l.l1Offset, readU64(table, l.l1Offset) + 0x200n);
  await compareWithQemu(table);
});

test('preallocated zero cluster not aligned: -r all makes it a plain zero cluster', { skip }, async () => {
  const file = makeImage('1G', [], ['write -P 1 0 128k', 'write -z 64k 64k']);
  assert.equal(getL2(file, 1) & 1n, 1n);
  setL2(file, 1, getL2(file, 1) + 0x200n);
  const r = await compareWithQemu(file);
  assert.equal(r.all.status, 0);
});

test('reserved bits in an L2 entry and in an L1 entry', { skip }, async () => {
  const l2 = basic();
  setL2(l2, 1, getL2(l2, 1) | 2n);
  await compareWithQemu(l2);
  const l1 = basic();
  const l = layout(l1);
  patchU64(l1, l.l1Offset, readU64(l1, l.l1Offset) | (1n << 56n));
  await compareWithQemu(l1);
});

test('overlapping metadata: an L2 entry pointing at the L1 table', { skip }, async () => {
  const file = basic();
  setL2(file, 1, COPIED | BigInt(layout(file).l1Offset));
  const r = await compareWithQemu(file);
  assert.equal(r.all.status, 0);
});

test('many L1 entries sharing one L2 table count like QEMU walking each', { skip }, async () => {
  const file = makeImage('100G', [], ['write -P 1 0 128k', 'write -P 2 1M 64k']);
  const l = layout(file);
  const first = readU64(file, l.l1Offset);
  for (let i = 1; i < 200; i++) patchU64(file, l.l1Offset + 8 * i, i % 2 ? first : first & ~COPIED);
  await compareWithQemu(file);
});

// ---------------------------------------------------------------- refcount table damage

test('refcount block past the end of the file: -r all grows the file and rebuilds', { skip }, async () => {
  const file = basic();
  patchU64(file, layout(file).reftableOffset, 0x1000000n);
  await compareWithQemu(file);
});

test('refcount table entry with reserved bits: qdedup rebuilds where qemu-img 7.2 fails', { skip }, async () => {
  const file = basic();
  const l = layout(file);
  patchU64(file, l.reftableOffset, readU64(file, l.reftableOffset) | 1n);
  await compareWithQemu(file, { betterThanQemu: ['all'] });
});

test('refcount block not cluster aligned: check errors; qdedup -r all rebuilds', { skip }, async () => {
  const file = basic();
  const l = layout(file);
  patchU64(file, l.reftableOffset, readU64(file, l.reftableOffset) + 0x200n);
  // QEMU's read-write open words the corruption event differently ("Marking image as corrupt").
  const r = await compareWithQemu(file, { betterThanQemu: ['all'], lines: false });
  assert.equal(r.none.status, 1);
  assert.ok(r.none.lines.some((line) => line === "Can't get refcount for cluster 0: Input/output error"));
});

// Found by the CLI fuzzer's soak (fixtures/fuzz-regressions/seed-519412175): the masked low
// half of the entry went negative and the message read "Refblock offset 0x-200".
test('refcount table entry of all ones: the unaligned block named by its 64-bit offset, as qemu-img names it', { skip }, async () => {
  const file = basic();
  patchU64(file, layout(file).reftableOffset, 0xffffffffffffffffn);
  const r = await compareWithQemu(file, { betterThanQemu: ['all'], lines: false });
  assert.equal(r.none.status, 1);
  const q = qemuCheck(file);
  assert.match(q.stderr, /Refblock offset 0xfffffffffffffe00 unaligned \(reftable index: 0\)/, 'what qemu-img says');
  const ours = qdedup(['check', file]);
  assert.match(ours.stderr + ours.stdout, /Refblock offset 0xfffffffffffffe00 unaligned \(reftable index: 0\)/);
});

// ---------------------------------------------------------------- snapshots

test('snapshot table: an entry with an unaligned L1 table and one with a huge one', { skip }, async () => {
  const file = withSnapshots();
  const d = readFileSync(file);
  const tableOffset = Number(d.readBigUInt64BE(64));
  const unaligned = `${file}.unaligned.qcow2`;
  const huge = `${file}.huge.qcow2`;
  const u = Buffer.from(d);
  u.writeBigUInt64BE(u.readBigUInt64BE(tableOffset) + 512n, tableOffset);
  writeFileSync(unaligned, u);
  const h = Buffer.from(d);
  h.writeUInt32BE(5_000_000, tableOffset + 8);
  writeFileSync(huge, h);
  await compareWithQemu(unaligned);
  await compareWithQemu(huge);
});

// ---------------------------------------------------------------- persistent bitmaps

test('persistent dirty bitmaps: their clusters are references, and a repair keeps them', { skip }, async () => {
  const file = makeImage('1G', [], []);
  assert.equal(run('qemu-img', ['bitmap', '--add', file, 'b0']).status, 0);
  assert.equal(run('qemu-img', ['bitmap', '--add', '-g', '512', file, 'b1']).status, 0);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 500M 64k', file]);
  assert.equal(readU64(file, 88) & 1n, 1n, 'bitmaps autoclear bit set');
  await compareWithQemu(file);
  const damaged = `${file}.leak.qcow2`;
  copyFileSync(file, damaged);
  setStoredRefcount(damaged, hostCluster(damaged, 0), 3); // a leak: repairing it must not drop the bitmaps
  const r = await compareWithQemu(damaged);
  assert.equal(r.leaks.status, 0);
  assert.equal(readU64(`${damaged}.leaks.ours`, 88) & 1n, 1n, 'the bitmaps bit survives the repair');
  assert.match(run('qemu-img', ['info', `${damaged}.leaks.ours`]).stdout, /name: b1/);
});

// ---------------------------------------------------------------- header bits

test('dirty image (lazy refcounts, crashed): check, repair, and the read-write open of qdedup write', { skip }, async () => {
  const file = makeImage('1G', ['lazy_refcounts=on'], []);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 128k', '-c', 'abort', file]);
  assert.equal(readU64(file, 72) & 1n, 1n, 'the crash left the dirty bit');
  const r = await compareWithQemu(file);
  assert.equal(r.none.status, 2);
  assert.equal(r.all.status, 0);
  assert.equal(readU64(`${file}.all.ours`, 72) & 1n, 0n, '-r all clears the dirty bit');

  const w = qdedup(['write', '-q', '-P', '0x11', file, '1M', '4k']);
  assert.equal(w.status, 0, w.stderr);
  assert.match(w.stderr, /Rebuilding refcount structure/);
  assert.equal(readU64(file, 72) & 1n, 0n, 'the open cleared the dirty bit');
  assert.equal(qemuCheck(file).status, 0);
  const read = run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x5a 0 128k', '-c', 'read -P 0x11 1M 4k', file]);
  assert.doesNotMatch(read.stdout, /verification failed/);
  assert.equal(read.status, 0);
});

test('corrupt bit: a plain check keeps it, -r leaks clears it once the image is clean; autoclear bits go too', { skip }, async () => {
  const file = withHole();
  setStoredRefcount(file, 6, 1);
  patchU64(file, 72, 2n);
  patchU64(file, 88, 0x8000000000000004n);
  await compareWithQemu(file);
  assert.equal(readU64(`${file}.none.ours`, 72), 2n);
  assert.equal(readU64(`${file}.leaks.ours`, 72), 0n);
  assert.equal(readU64(`${file}.leaks.ours`, 88), 0n);
});

// ---------------------------------------------------------------- the command line

test('qdedup check: human output, JSON, -q and exit codes as qemu-img check', { skip }, () => {
  const file = withHole();
  setStoredRefcount(file, 6, 1);
  setL2(file, 16, getL2(file, 16) & ~COPIED);
  for (const args of [[], ['-r', 'leaks'], ['-r', 'all'], ['--output=json'], ['-q'], ['-q', '--output=json']]) {
    const qemuCopy = `${file}.cli.qemu`;
    const ourCopy = `${file}.cli.ours`;
    copyFileSync(file, qemuCopy);
    copyFileSync(file, ourCopy);
    const q = run('qemu-img', ['check', '-f', 'qcow2', ...args, qemuCopy]);
    const o = qdedup(['check', ...args, ourCopy]);
    assert.equal(o.status, q.status, `${args.join(' ')}: exit code`);
    assert.equal(o.stdout.replaceAll(ourCopy, 'F'), q.stdout.replaceAll(qemuCopy, 'F'), `${args.join(' ')}: stdout`);
    const lines = (s: string, prefix: string) => s.split('\n').filter((l) => l && !l.startsWith(prefix));
    // Under -q qdedup prints errors only: qemu-img's leak and repair-progress lines go (README "Exit codes").
    const qemuLines = lines(q.stderr, 'qemu-img: ').filter((l) => !args.includes('-q') || quietKeeps(l));
    assert.deepEqual(lines(o.stderr, 'qdedup: '), qemuLines, `${args.join(' ')}: stderr`);
  }
});

test('qdedup check: cannot check → 63 for a non-qcow2 file, 1 for a missing one, no JSON', { skip }, () => {
  const raw = join(dir, 'not-qcow2.raw');
  writeFileSync(raw, Buffer.alloc(4096, 7));
  const notQcow2 = qdedup(['check', '--output', 'json', raw]);
  assert.equal(notQcow2.status, 63);
  assert.equal(notQcow2.stdout, '');
  assert.match(notQcow2.stderr, /^qdedup: .*not in qcow2 format/);
  const missing = qdedup(['check', '--output', 'json', join(dir, 'nope.qcow2')]);
  assert.equal(missing.status, 1);
  assert.equal(missing.stdout, '');
  assert.equal(missing.stderr.trim().split('\n').length, 1);
  const badMode = qdedup(['check', '-r', 'some', basic()]);
  assert.equal(badMode.status, 1);
  assert.match(badMode.stderr, /Unknown option for -r/);
});

test('qdedup check -r leaks when a rebuild is needed: check failed, exit 1, nothing written', { skip }, () => {
  const file = basic();
  setStoredRefcount(file, hostCluster(file, 1), 0);
  const before = readFileSync(file);
  const mtime = statSync(file).mtimeMs;
  const o = qdedup(['check', '-r', 'leaks', file]);
  assert.equal(o.status, 1);
  assert.match(o.stderr, /ERROR need to rebuild refcount structures\nqdedup: Check failed: Input\/output error/);
  assert.equal(o.stdout, '');
  assert.ok(readFileSync(file).equals(before));
  assert.equal(statSync(file).mtimeMs, mtime);
});
