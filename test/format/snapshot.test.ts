// Snapshot table entries (src/format/snapshot.ts): every branch of the decoder — the fixed
// part and its two sources of the VM state size, extra data with and without the instruction
// count, an entry cut short (read more), extra data past QEMU's limit, an L1 offset past 2^53 —
// and the entry the dedup holder writes, byte for byte.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CorruptImageError, UnsupportedError } from '../../src/errors.ts';
import { MAX_SNAPSHOT_EXTRA, SNAPSHOT_FIXED_BYTES, decodeSnapshotEntry, encodeSnapshotEntry } from '../../src/format/snapshot.ts';

/** A raw entry: the fixed part, `extra` bytes of extra data, then id and name (padded to 8). */
function rawEntry(o: { extra: Buffer; id: string; name: string; vmState32?: number }): Buffer {
  const id = Buffer.from(o.id);
  const name = Buffer.from(o.name);
  const buf = Buffer.alloc(Math.ceil((SNAPSHOT_FIXED_BYTES + o.extra.length + id.length + name.length) / 8) * 8);
  buf.writeBigUInt64BE(0x50000n, 0); // L1 table offset
  buf.writeUInt32BE(2, 8); // L1 size
  buf.writeUInt16BE(id.length, 12);
  buf.writeUInt16BE(name.length, 14);
  buf.writeUInt32BE(1_700_000_000, 16);
  buf.writeUInt32BE(123_000_000, 20);
  buf.writeBigUInt64BE(3_723_456_000_000n, 24); // VM clock: 1 h 2 min 3.456 s
  buf.writeUInt32BE(o.vmState32 ?? 0, 32);
  buf.writeUInt32BE(o.extra.length, 36);
  o.extra.copy(buf, SNAPSHOT_FIXED_BYTES);
  id.copy(buf, SNAPSHOT_FIXED_BYTES + o.extra.length);
  name.copy(buf, SNAPSHOT_FIXED_BYTES + o.extra.length + id.length);
  return buf;
}

test('the holder entry: golden bytes, and it decodes back', () => {
  const buf = encodeSnapshotEntry({
    l1TableOffset: 0x30000,
    l1Size: 1,
    id: '1',
    name: 'qdedup-dedup-holder',
    dateSec: 0x65000000,
    dateNsec: 5,
    diskSize: 0x40000000,
  });
  assert.equal(buf.length, 80); // 40 fixed + 16 extra + 1 + 19 = 76, padded to 80
  assert.equal(
    buf.subarray(0, 56).toString('hex'),
    '0000000000030000' +
      '00000001' +
      '0001' +
      '0013' +
      '65000000' +
      '00000005' +
      '0000000000000000' +
      '00000000' +
      '00000010' +
      '0000000000000000' +
      '0000000040000000',
  );
  assert.equal(buf.subarray(56, 76).toString(), '1qdedup-dedup-holder');
  const d = decodeSnapshotEntry(buf, 0, 0x20000);
  assert.ok(d);
  assert.equal(d.length, 80);
  assert.deepEqual(
    { ...d.entry },
    {
      l1TableOffset: 0x30000,
      l1Size: 1,
      dateSec: 0x65000000,
      dateNsec: 5,
      vmClockNsec: 0n,
      vmStateSize: 0n,
      id: '1',
      name: 'qdedup-dedup-holder',
      tableOffset: 0x20000,
      byteLength: 80,
      extraDataBytes: 16,
    },
  );
});

test('VM state size: the u32 of the fixed part without extra data, the u64 of the extra data with it; icount from 24 bytes of extra data', () => {
  const v2 = decodeSnapshotEntry(rawEntry({ extra: Buffer.alloc(0), id: '7', name: 'old', vmState32: 0xfffffff0 }), 0, 0);
  assert.equal(v2?.entry.vmStateSize, 0xfffffff0n);
  assert.equal('icount' in v2!.entry, false);
  assert.equal(v2?.entry.vmClockNsec, 3_723_456_000_000n);

  const extra16 = Buffer.alloc(16);
  extra16.writeBigUInt64BE(0xffff_ffff_ffff_fff0n, 0); // past 2^53: a bigint, not refused
  const v3 = decodeSnapshotEntry(rawEntry({ extra: extra16, id: '8', name: 'v3', vmState32: 1 }), 0, 0);
  assert.equal(v3?.entry.vmStateSize, 0xffff_ffff_ffff_fff0n);
  assert.equal('icount' in v3!.entry, false);

  const extra24 = Buffer.alloc(24);
  extra24.writeBigUInt64BE(42n, 16);
  const withIcount = decodeSnapshotEntry(rawEntry({ extra: extra24, id: '9', name: 'icount' }), 0, 0);
  assert.equal(withIcount?.entry.icount, 42n);
  assert.deepEqual([withIcount?.entry.id, withIcount?.entry.name, withIcount?.length], ['9', 'icount', 72]);
});

test('an entry cut short asks for more bytes (null); extra data past QEMU limit and an L1 offset past 2^53 are refused', () => {
  const whole = rawEntry({ extra: Buffer.alloc(16), id: '1', name: 'name' });
  assert.equal(decodeSnapshotEntry(whole.subarray(0, SNAPSHOT_FIXED_BYTES - 1), 0, 0), null, 'inside the fixed part');
  assert.equal(decodeSnapshotEntry(whole.subarray(0, SNAPSHOT_FIXED_BYTES + 16 + 2), 0, 0), null, 'inside the name');
  assert.ok(decodeSnapshotEntry(whole.subarray(0, SNAPSHOT_FIXED_BYTES + 16 + 5), 0, 0), 'padding is not needed');

  const big = Buffer.from(whole);
  big.writeUInt32BE(MAX_SNAPSHOT_EXTRA + 1, 36);
  assert.throws(
    () => decodeSnapshotEntry(big, 0, 0x10000),
    (e: unknown) => e instanceof CorruptImageError && /snapshot entry at 0x10000: extra data too large \(1025 bytes\)/.test(e.message),
  );
  const limit = Buffer.from(whole);
  limit.writeUInt32BE(MAX_SNAPSHOT_EXTRA, 36);
  assert.equal(decodeSnapshotEntry(limit, 0, 0), null, 'at the limit: a valid length, more bytes needed');

  const far = Buffer.from(whole);
  far.writeBigUInt64BE(1n << 60n, 0);
  assert.throws(
    () => decodeSnapshotEntry(far, 0, 0),
    (e: unknown) => e instanceof UnsupportedError && /snapshot L1 table offset .* beyond 2\^53/.test(e.message),
  );
});
