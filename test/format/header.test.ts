import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decodeHeader, encodeHeader, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, type Header } from '../../src/format/header.ts';
import { CorruptImageError, NotQcow2Error, UnsupportedError } from '../../src/errors.ts';

// The first 112 bytes of `qemu-img create -f qcow2 -o cluster_size=4096 x.qcow2 1G`
// (QEMU 7.2: no feature table at 4 KiB clusters): reftable at 0x1000, L1 at 0x3000.
const QEMU_4K_1G =
  '514649fb00000003' +
  '0000000000000000' +
  '000000000000000c' +
  '0000000040000000' +
  '0000000000000200' +
  '0000000000003000' +
  '0000000000001000' +
  '0000000100000000' +
  '0000000000000000' +
  '0000000000000000' +
  '0000000000000000' +
  '0000000000000000' +
  '0000000400000070' +
  '0000000000000000';

function qemuHeaderBytes(): Buffer {
  const buf = Buffer.alloc(4096);
  Buffer.from(QEMU_4K_1G, 'hex').copy(buf);
  return buf; // end-of-extensions marker at 0x70 is already zero
}

test('decodes a header written by qemu-img', () => {
  const h = decodeHeader(qemuHeaderBytes());
  assert.equal(h.version, 3);
  assert.equal(h.clusterBits, 12);
  assert.equal(h.size, 1073741824);
  assert.equal(h.l1Size, 512);
  assert.equal(h.l1TableOffset, 0x3000);
  assert.equal(h.refcountTableOffset, 0x1000);
  assert.equal(h.refcountTableClusters, 1);
  assert.equal(h.refcountOrder, 4);
  assert.equal(h.headerLength, 112);
  assert.deepEqual(h.extensions, []);
});

test('encodes the same bytes qemu-img wrote (golden hex)', () => {
  const h = decodeHeader(qemuHeaderBytes());
  const bytes = encodeHeader(h);
  assert.equal(bytes.subarray(0, 112).toString('hex'), QEMU_4K_1G);
  assert.equal(bytes.length, 120); // header + 8-byte end marker
});

test('round trip keeps extensions, unknown bytes and the backing name', () => {
  const h: Header = decodeHeader(qemuHeaderBytes());
  h.extensions = [
    { type: EXT_BACKING_FORMAT, data: Buffer.from('qcow2') },
    { type: 0x64656475, data: Buffer.from('23 bytes of unknown ext') },
  ];
  h.backingFile = 'base image.qcow2';
  h.headerLength = 120;
  h.extraHeaderBytes = Buffer.from('0102030405060708', 'hex');
  h.compatibleFeatures = 0x8000000000000008n;
  const bytes = encodeHeader(h);
  const back = decodeHeader(Buffer.concat([bytes, Buffer.alloc(4096 - bytes.length)]));
  assert.deepEqual(back.extensions, h.extensions);
  assert.equal(back.backingFile, 'base image.qcow2');
  assert.equal(back.extraHeaderBytes.toString('hex'), '0102030405060708');
  assert.equal(back.compatibleFeatures, 0x8000000000000008n);
  // extensions are padded to 8 bytes; the name follows the end marker
  assert.equal(back.backingFileOffset, 120 + 16 + 32 + 8);
});

test('named refusals', () => {
  const bad = (patch: (b: Buffer) => void) => {
    const b = qemuHeaderBytes();
    patch(b);
    return () => decodeHeader(b);
  };
  assert.throws(
    bad((b) => b.writeUInt32BE(0, 0)),
    NotQcow2Error,
  );
  assert.throws(
    bad((b) => b.writeUInt32BE(4, 4)),
    /unsupported qcow2 version 4/,
  );
  assert.throws(
    bad((b) => b.writeUInt32BE(22, 20)),
    /cluster size: 2\^22/,
  );
  assert.throws(
    bad((b) => b.writeUInt32BE(100, 100)),
    /header too short/,
  );
  assert.throws(
    bad((b) => b.writeUInt32BE(7, 96)),
    /refcount_order 7/,
  );
  assert.throws(
    bad((b) => b.writeBigUInt64BE(0x20n, 72)),
    (e: unknown) => e instanceof UnsupportedError && /Unknown incompatible feature: 20/.test(e.message),
  );
  assert.throws(
    bad((b) => b.writeUInt32BE(1, 36)),
    /L1 table is too small/,
  );
  assert.throws(
    bad((b) => b.writeUInt32BE(0x3001, 44)),
    /not cluster aligned/,
  );
  assert.throws(
    bad((b) => b.writeUInt32BE(0, 56)),
    (e: unknown) => e instanceof CorruptImageError && /reference count table/.test(e.message),
  );
  assert.throws(
    bad((b) => b.writeUInt32BE(2, 32)),
    /encrypted/,
  );
});

test('the remaining refusals: a v3 header cut short, a virtual size past 2^53, a header that outgrows its cluster; a feature name of the full 46 bytes', () => {
  const b = qemuHeaderBytes();
  assert.throws(
    () => decodeHeader(b.subarray(0, 100)),
    (e: unknown) => e instanceof CorruptImageError && /file ends inside the v3 header/.test(e.message),
  );
  const huge = qemuHeaderBytes();
  huge.writeBigUInt64BE(1n << 56n, 24);
  assert.throws(
    () => decodeHeader(huge),
    (e: unknown) => e instanceof UnsupportedError && /virtual size 0x100000000000000 is beyond 2\^53/.test(e.message),
  );

  const h = decodeHeader(qemuHeaderBytes());
  h.backingFile = 'b'.repeat(4096 - 120 + 1); // header 112 + end marker 8: one byte too many
  assert.throws(
    () => encodeHeader(h),
    (e: unknown) => e instanceof CorruptImageError && /\(4097 bytes\) do not fit in one 4096-byte cluster/.test(e.message),
  );
  h.backingFile = 'b'.repeat(4096 - 120);
  assert.equal(encodeHeader(h).length, 4096, 'exactly one cluster fits');

  // An unknown incompatible bit named by a feature-table entry whose name fills all 46 bytes (no NUL).
  const named = decodeHeader(qemuHeaderBytes());
  const table = Buffer.alloc(48);
  table[0] = 0; // incompatible
  table[1] = 5; // bit 5
  Buffer.from('n'.repeat(46)).copy(table, 2);
  named.extensions = [{ type: EXT_FEATURE_TABLE, data: table }];
  named.incompatibleFeatures = 1n << 5n;
  const bytes = encodeHeader(named);
  assert.throws(
    () => decodeHeader(Buffer.concat([bytes, Buffer.alloc(4096 - bytes.length)])),
    (e: unknown) => e instanceof UnsupportedError && e.message.includes(`unsupported qcow2 feature(s): ${'n'.repeat(46)}`) && !e.message.includes('Unknown'),
  );
});

// Found by the CLI fuzzer's soak (fixtures/fuzz-regressions/seed-519412018): an empty table's
// offset is still checked by QEMU (qcow2_validate_table), which refuses to open the image.
test('an empty table must still be cluster aligned (as QEMU requires); offset 0 is fine for an empty one', () => {
  const noSnapshots = qemuHeaderBytes();
  noSnapshots.writeBigUInt64BE(0x1ffn, 64); // nb_snapshots stays 0
  assert.throws(
    () => decodeHeader(noSnapshots),
    (e: unknown) => e instanceof CorruptImageError && /snapshot table offset 0x1ff is not cluster aligned/.test(e.message),
  );
  noSnapshots.writeBigUInt64BE(0x20000n, 64);
  assert.equal(decodeHeader(noSnapshots).snapshotsOffset, 0x20000);

  const empty = qemuHeaderBytes();
  empty.writeBigUInt64BE(0n, 24); // virtual size 0: no L1 entry needed
  empty.writeUInt32BE(0, 36);
  empty.writeBigUInt64BE(0x3001n, 40);
  assert.throws(() => decodeHeader(empty), /active L1 table offset 0x3001 is not cluster aligned/);
  empty.writeBigUInt64BE(0n, 40);
  assert.equal(decodeHeader(empty).l1Size, 0, 'qemu-img create of a 0-byte image: L1 offset 0, no entries');
});
