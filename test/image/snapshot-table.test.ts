// The snapshot table walk (src/image/snapshot-table.ts) shared by Image, `info` and check:
// its limits as the engine words them, and as check words them (qemu-img check's lines)
// together with check's own test of incomplete v3 entries. No qemu needed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { openSync, closeSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers.ts';
import { CorruptImageError } from '../../src/errors.ts';
import { MAX_SNAPSHOT_TABLE_BYTES, SNAPSHOT_FIXED_BYTES, SnapshotExtraDataError } from '../../src/format/snapshot.ts';
import { SnapshotTableTooBigError, snapshotTableEntries } from '../../src/image/snapshot-table.ts';
import { createImage } from '../../src/image/create.ts';
import { checkExitCode, checkImage } from '../../src/image/check-image.ts';

const dir = tempDir('qdedup-snapshot-table-');

/** Bytes of an entry with no id, a `nameBytes` name of zeros and `extra` bytes of extra data. */
const entryBytes = (nameBytes: number, extra = 0) => Math.ceil((SNAPSHOT_FIXED_BYTES + extra + nameBytes) / 8) * 8;

/** The fixed part of such an entry (L1 table offset and size 0). */
function fixedPart(nameBytes: number, extra = 0): Buffer {
  const b = Buffer.alloc(SNAPSHOT_FIXED_BYTES);
  b.writeUInt16BE(nameBytes, 14);
  b.writeUInt32BE(extra, 36);
  return b;
}

/** A table of `count` entries with names of 65535 zero bytes, read as a file would be: zeros between the fixed parts. */
function bigTable(count: number): (offset: number, length: number) => Promise<Buffer> {
  const step = entryBytes(65535);
  const head = fixedPart(65535);
  return async (offset, length) => {
    const out = Buffer.alloc(length);
    for (let i = Math.floor(offset / step); i * step < offset + length && i < count; i++) {
      const at = i * step - offset;
      for (let k = 0; k < SNAPSHOT_FIXED_BYTES; k++) if (at + k >= 0 && at + k < length) out[at + k] = head[k];
    }
    return out;
  };
}

test('walk: entries with the table bytes so far; past 64 MiB SnapshotTableTooBigError names the entry', async () => {
  const step = entryBytes(65535);
  const fits = Math.floor(MAX_SNAPSHOT_TABLE_BYTES / step);
  const seen: number[] = [];
  for await (const { tableBytes } of snapshotTableEntries(bigTable(3), 0, 3)) seen.push(tableBytes);
  assert.deepEqual(seen, [step, 2 * step, 3 * step]);
  await assert.rejects(
    async () => {
      for await (const _ of snapshotTableEntries(bigTable(fits + 1), 0, fits + 1));
    },
    (e: unknown) =>
      e instanceof SnapshotTableTooBigError &&
      e instanceof CorruptImageError &&
      e.message === `snapshot table is too big (over ${MAX_SNAPSHOT_TABLE_BYTES} bytes at snapshot ${fits})`,
  );
});

test('walk: extra data past 1 KiB is a SnapshotExtraDataError', async () => {
  const read = async (offset: number, length: number) => {
    const out = Buffer.alloc(length);
    if (offset === 0) fixedPart(0, 1025).copy(out);
    return out;
  };
  await assert.rejects(
    async () => {
      for await (const _ of snapshotTableEntries(read, 0, 1));
    },
    (e: unknown) => e instanceof SnapshotExtraDataError && /extra data too large \(1025 bytes\)/.test(e.message),
  );
});

/** A v3 image (64 KiB clusters) whose header names `count` snapshots at 1 MiB, with `entries` written there `step` bytes apart. */
async function imageWithTable(name: string, count: number, entries: Buffer[], step: number): Promise<string> {
  const path = join(dir, name);
  await createImage(path, { size: 1 << 20, clusterBits: 16, version: 3, refcountOrder: 4, lazyRefcounts: false, force: true });
  const fd = openSync(path, 'r+');
  try {
    const header = Buffer.alloc(12);
    header.writeUInt32BE(count, 0);
    header.writeBigUInt64BE(1n << 20n, 4);
    writeSync(fd, header, 0, 12, 60);
    entries.forEach((e, i) => writeSync(fd, e, 0, e.length, (1 << 20) + i * step));
  } finally {
    closeSync(fd);
  }
  return path;
}

test('check: a table past 64 MiB is a check error ("Snapshot table is too big", File too large)', async () => {
  const step = entryBytes(65535);
  const count = Math.floor(MAX_SNAPSHOT_TABLE_BYTES / step) + 1;
  const path = await imageWithTable(
    'big.qcow2',
    count,
    Array.from({ length: count }, () => fixedPart(65535)),
    step,
  );
  const r = await checkImage(path);
  assert.equal(r.failure, 'File too large');
  assert.equal(r.checkErrors, 1);
  assert.deepEqual(r.messages, ['ERROR failed to read the snapshot table: Snapshot table is too big']);
  assert.equal(checkExitCode(r), 1);
});

test('check: a v3 entry with less than 16 bytes of extra data is incomplete (a corruption)', async () => {
  const path = await imageWithTable('short.qcow2', 2, [fixedPart(0, 16), fixedPart(0, 8)], entryBytes(0, 16));
  const r = await checkImage(path);
  assert.equal(r.failure, undefined);
  // The table's cluster (past what the image counted) is the second corruption.
  assert.deepEqual(r.messages, ['ERROR snapshot table entry 1 is incomplete', 'ERROR cluster 16 refcount=0 reference=1']);
  assert.equal(r.corruptions, 2);
});
