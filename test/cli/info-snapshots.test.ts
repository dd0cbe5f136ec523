// `qdedup info` lists internal snapshots exactly as qemu-img info (7.2) does: the
// "Snapshot list:" table of the human output and the "snapshots" array of --output json
// (key order included), byte for byte against the real qemu-img on the same files, with
// TZ set to UTC and to a non-UTC zone (the DATE column is local time). Images: a plain one
// (no snapshot section at all), three qemu-made snapshots (one taken after a qemu-io
// write, one with a name longer than the TAG column), a dedup image (its holder snapshot),
// snapshot fields patched to the extremes of their u32/u64 ranges with odd names, and a dirty
// overlay (backing keys around "snapshots"). The pure formatters are tested on values
// qemu-img was seen to print.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BIN, NO_QEMU, tempDir } from '../helpers.ts';
import { humanSize } from '../../src/cli/parse.ts';
import { toJson } from '../../src/cli/output.ts';
import { imageInfo, infoText } from '../../src/cli/format-info.ts';
import { snapshotInfo, snapshotListLines, vmClock } from '../../src/cli/snapshot-list.ts';
import { decodeSnapshotEntry, encodeSnapshotEntry } from '../../src/format/snapshot.ts';

interface Ran {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command with TZ set, without blocking (the comparisons run concurrently). */
function exec(cmd: string, args: string[], tz: string): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1', TZ: tz } });
    const out: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (status) => resolve({ status, stdout: Buffer.concat(out).toString('utf8'), stderr }));
  });
}

/** Every object's keys in the same order, at every depth. */
function assertKeyOrder(ours: unknown, theirs: unknown, where: string): void {
  if (Array.isArray(theirs)) {
    assert.ok(Array.isArray(ours), where);
    theirs.forEach((t, i) => assertKeyOrder((ours as unknown[])[i], t, `${where}[${i}]`));
  } else if (theirs !== null && typeof theirs === 'object') {
    assert.deepEqual(Object.keys(ours as object), Object.keys(theirs), `${where}: key order`);
    for (const k of Object.keys(theirs)) assertKeyOrder((ours as Record<string, unknown>)[k], (theirs as Record<string, unknown>)[k], `${where}.${k}`);
  }
}

/** qdedup's own addition to a dedup image's info (README "info"): the dedup block / object. */
const withoutDedup = (text: string) => text.replace(/\n {4}dedup:(\n {8}[^\n]*)+/, '').replace(/,\n {12}"dedup": \{[^}]*\}/, '');

/**
 * Compares `qdedup info` with `qemu-img info` on `file` in zone `tz`, human and JSON, and
 * returns qdedup's parsed JSON and text. `cli` runs bin/qdedup; `api` runs the same
 * command code in this process (imageInfo, infoText, toJson: what runInfo prints), which
 * keeps the matrix fast (a bin/qdedup start costs ~0.3 s of CPU).
 */
async function compare(file: string, tz: string, via: 'cli' | 'api'): Promise<{ json: Record<string, unknown>; text: string }> {
  const [theirsText, theirsJson] = await Promise.all([
    exec('qemu-img', ['info', '-f', 'qcow2', file], tz),
    exec('qemu-img', ['info', '-f', 'qcow2', '--output=json', file], tz),
  ]);
  let oursText: Ran;
  let oursJson: Ran;
  if (via === 'cli') {
    [oursText, oursJson] = await Promise.all([
      exec(process.execPath, [BIN, 'info', file], tz),
      exec(process.execPath, [BIN, 'info', '--output', 'json', file], tz),
    ]);
  } else {
    const info = await imageInfo(file);
    const saved = process.env.TZ;
    process.env.TZ = tz; // Node re-reads the zone on assignment; set and restored synchronously
    try {
      oursText = { status: 0, stdout: infoText(info), stderr: '' };
    } finally {
      if (saved === undefined) delete process.env.TZ;
      else process.env.TZ = saved;
    }
    oursJson = { status: 0, stdout: toJson(info), stderr: '' };
  }
  for (const r of [oursText, theirsText, oursJson, theirsJson]) assert.equal(r.status, 0, `${file} (${tz}): ${r.stderr}`);
  const where = `${file} (TZ=${tz}, ${via})`;
  assert.equal(withoutDedup(oursText.stdout), theirsText.stdout, `${where}: human output byte for byte`);
  assert.equal(withoutDedup(oursJson.stdout), theirsJson.stdout, `${where}: JSON byte for byte`);
  const ours = JSON.parse(withoutDedup(oursJson.stdout));
  const theirs = JSON.parse(theirsJson.stdout);
  assert.deepEqual(ours, theirs, `${where}: same JSON`);
  assertKeyOrder(ours, theirs, where);
  return { json: JSON.parse(oursJson.stdout), text: oursText.stdout };
}

/** Runs a setup command and requires success. */
async function must(cmd: string, ...args: string[]): Promise<void> {
  const r = await exec(cmd, args, 'UTC');
  assert.equal(r.status, 0, `${cmd} ${args.join(' ')}: ${r.stderr}`);
}

/** Calls `patch` on each snapshot table entry's offset (in table order) of the image bytes. */
function eachEntry(bytes: Buffer, patch: (offset: number, index: number, extra: number, idLen: number) => void): void {
  let off = Number(bytes.readBigUInt64BE(64));
  for (let i = 0; i < bytes.readUInt32BE(60); i++) {
    const extra = bytes.readUInt32BE(off + 36);
    const idLen = bytes.readUInt16BE(off + 12);
    const nameLen = bytes.readUInt16BE(off + 14);
    patch(off, i, extra, idLen);
    off += Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
  }
}

const U64_MAX = (1n << 64n) - 1n;
const ZONES = ['UTC', 'Asia/Kolkata'];

test('info snapshot list matches qemu-img info, text and JSON, in UTC and Asia/Kolkata', { skip: NO_QEMU }, async () => {
  const dir = tempDir('qdedup-info-snap-');
  const plain = join(dir, 'plain.qcow2');
  const three = join(dir, 'three.qcow2');
  const dedup = join(dir, 'dedup.qcow2');
  const odd = join(dir, 'odd.qcow2');
  const base = join(dir, 'base.qcow2');
  const overlay = join(dir, 'overlay.qcow2');
  await Promise.all([
    must('qemu-img', 'create', '-q', '-f', 'qcow2', plain, '64M'),
    must(process.execPath, BIN, 'create', '-q', dedup, '64M'),
    (async () => {
      await must('qemu-img', 'create', '-q', '-f', 'qcow2', three, '64M');
      await must('qemu-img', 'snapshot', '-c', 'first', three);
      await must('qemu-io', '-f', 'qcow2', '-c', 'write -P 0xab 0 64k', three);
      await must('qemu-img', 'snapshot', '-c', 'after-a-write-with-a-long-name', three);
      await must('qemu-img', 'snapshot', '-c', 'third', three);
      copyFileSync(three, odd);
      await must('qemu-img', 'snapshot', '-c', 'ünï-日本-😀', odd);
      await must('qemu-img', 'snapshot', '-c', 'c\u0001\u007f"q\\\tz', odd);
    })(),
    (async () => {
      await must('qemu-img', 'create', '-q', '-f', 'qcow2', base, '64M');
      await must('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', overlay);
      await must('qemu-img', 'snapshot', '-c', 'on-overlay', overlay);
    })(),
  ]);

  // Fields qemu-img snapshot never writes: extremes of date, VM clock, VM state size and
  // icount (2^64-1 = none), an entry without icount (16 bytes of extra data), a NUL in a name.
  const bytes = readFileSync(odd);
  eachEntry(bytes, (o, i, extra, idLen) => {
    assert.equal(extra, 24, 'qemu-img 7.2 writes 24 bytes of extra data');
    const rows: [number, number, bigint, bigint, bigint][] = [
      [0xffffffff, 999_999_999, U64_MAX, U64_MAX, U64_MAX - 1n],
      [0, 0, 1n << 63n, 1n << 63n, 1n << 63n],
      [1, 5, 360_061_123_456_789n, 1536n, U64_MAX],
    ];
    if (i < rows.length) {
      const [ds, dn, clock, vmState, icount] = rows[i];
      bytes.writeUInt32BE(ds, o + 16);
      bytes.writeUInt32BE(dn, o + 20);
      bytes.writeBigUInt64BE(clock, o + 24);
      bytes.writeBigUInt64BE(vmState, o + 40);
      bytes.writeBigUInt64BE(icount, o + 56);
    }
    if (i === 2) bytes[o + 40 + extra + idLen + 1] = 0; // "third" → "t"
    if (i === 3) bytes.writeBigUInt64BE(9_007_199_254_740_993n, o + 40); // 2^53 + 1: exact in JSON
  });
  writeFileSync(odd, bytes);
  // The dirty overlay: "cleanly shut down: no" before the backing file and the snapshot list.
  const ov = readFileSync(overlay);
  ov.writeBigUInt64BE(ov.readBigUInt64BE(72) | 1n, 72);
  writeFileSync(overlay, ov);

  // bin/qdedup itself in the non-UTC zone; the rest of the matrix in process.
  const [threeIst, dedupIst, threeUtc, oddUtc, , dedupUtc, plainIst, overlayIst] = await Promise.all([
    compare(three, 'Asia/Kolkata', 'cli'),
    compare(dedup, 'Asia/Kolkata', 'cli'),
    compare(three, 'UTC', 'api'),
    ...ZONES.map((tz) => compare(odd, tz, 'api')),
    compare(dedup, 'UTC', 'api'),
    compare(plain, 'Asia/Kolkata', 'api'),
    compare(overlay, 'Asia/Kolkata', 'api'),
  ]);

  // What the byte comparisons covered, spelled out.
  assert.doesNotMatch(plainIst.text, /Snapshot list/, 'no snapshots: no section');
  assert.equal('snapshots' in plainIst.json, false, 'no snapshots: no key');
  const snaps = threeUtc.json.snapshots as Record<string, unknown>[];
  assert.deepEqual(
    snaps.map((s) => [s.id, s.name, s['vm-state-size'], s.icount]),
    [
      ['1', 'first', 0, 0],
      ['2', 'after-a-write-with-a-long-name', 0, 0],
      ['3', 'third', 0, 0],
    ],
  );
  assert.ok(new Set(snaps.map((s) => `${s['date-sec']}.${s['date-nsec']}`)).size === 3, 'three different dates');
  assert.match(threeUtc.text, /\n2 {9}after-a-write-with-a-long-name {6}0 B /, 'a long name widens its row');
  assert.notEqual(threeUtc.text, threeIst.text, 'DATE is local time: UTC and Asia/Kolkata differ');
  assert.deepEqual(threeUtc.json, threeIst.json, 'JSON does not depend on the zone');
  assert.match(oddUtc.text, /\n1 {9}first {13} 16 EiB 2106-02-07 06:28:155124095:34:33.709 {9}-2\n/);
  const oddSnaps = oddUtc.json.snapshots as Record<string, unknown>[];
  assert.equal(oddSnaps[2].name, 't', 'a name ends at its first NUL');
  assert.equal('icount' in oddSnaps[2], false, 'icount 2^64-1 is none');
  assert.equal(oddSnaps.length, 5);
  const holder = (dedupUtc.json.snapshots as Record<string, unknown>[])[0];
  assert.equal(holder.name, 'qdedup-dedup-holder');
  assert.equal('icount' in holder, false, 'the holder has 16 bytes of extra data: no icount');
  assert.notEqual(dedupUtc.text, dedupIst.text);
  assert.match(
    dedupUtc.text,
    /\nSnapshot list:\nID {8}TAG {15}VM SIZE {16}DATE {5}VM CLOCK {5}ICOUNT\n1 {9}qdedup-dedup-holder {6}0 B \d{4}-\d\d-\d\d \d\d:\d\d:\d\d 00:00:00\.000 {11}\nFormat specific information:\n/,
  );
  assert.match(overlayIst.text, /\ncleanly shut down: no\nbacking file: base\.qcow2 \(actual path: [^\n]*\)\nbacking file format: qcow2\nSnapshot list:\n/);
  assert.deepEqual(Object.keys(overlayIst.json).slice(0, 2), ['backing-filename-format', 'snapshots']);
});

test('size_to_str, VM clock and the table rows, as qemu-img prints them', () => {
  // Each value as qemu-img 7.2 printed it in the VM SIZE column ("%0.3g": ties to even, exponent at 1000).
  const seen: [number | bigint, string][] = [
    [0, '0 B'],
    [999, '999 B'],
    [1000, '0.977 KiB'],
    [1024, '1 KiB'],
    [1152, '1.12 KiB'],
    [1535, '1.5 KiB'],
    [2560, '2.5 KiB'],
    [1023898, '1e+03 KiB'],
    [1048064, '1 MiB'],
    [1179648, '1.12 MiB'],
    [12845056, '12.2 MiB'],
    [5683281920, '5.29 GiB'],
    [U64_MAX, '16 EiB'],
    [1n << 63n, '8 EiB'],
    [9_007_199_254_740_993n, '8 PiB'],
  ];
  for (const [v, s] of seen) assert.equal(humanSize(v), s, String(v));
  assert.equal(vmClock(0, 0), '00:00:00.000');
  assert.equal(vmClock(360_061, 123_456_789), '100:01:01.123', 'hours are not wrapped, at least two digits');
  assert.equal(vmClock(59, 999_999_999), '00:00:59.999');

  // An entry qdedup writes (the holder's layout): 16 bytes of extra data, so no icount.
  const buf = encodeSnapshotEntry({
    l1TableOffset: 0x30000,
    l1Size: 1,
    id: '1',
    name: 'qdedup-dedup-holder',
    dateSec: 86400 * 365,
    dateNsec: 7,
    diskSize: 1 << 20,
  });
  const info = snapshotInfo(decodeSnapshotEntry(buf, 0, 0)!.entry);
  assert.deepEqual(Object.keys(info), ['vm-clock-nsec', 'name', 'date-sec', 'date-nsec', 'vm-clock-sec', 'id', 'vm-state-size']);
  const lines = snapshotListLines([info, { ...info, icount: 12, id: '10', name: 'ü' }], () => '1971-01-01 00:00:00');
  assert.deepEqual(lines, [
    'Snapshot list:',
    'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT',
    '1         qdedup-dedup-holder      0 B 1971-01-01 00:00:00 00:00:00.000           ',
    '10        ü                    0 B 1971-01-01 00:00:00 00:00:00.000         12', // padding counts bytes, as printf does
  ]);
  assert.deepEqual(snapshotListLines([]), [], 'no snapshots: no section');

  // JSON as qemu's json-writer: non-ASCII and control characters as upper-case \u escapes, u64 digits exact.
  assert.equal(
    toJson({ name: 'ü\u0001\u007f"\\\t😀', n: 2n ** 64n - 2n }),
    '{\n    "name": "\\u00FC\\u0001\\u007F\\"\\\\\\t\\uD83D\\uDE00",\n    "n": 18446744073709551614\n}\n',
  );
  assert.equal(toJson({ a: 1, b: ['x'] }), '{\n    "a": 1,\n    "b": [\n        "x"\n    ]\n}\n');
});
