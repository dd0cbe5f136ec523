import { test } from 'node:test';
import assert from 'node:assert/strict';
import { crc32 } from 'node:zlib';
import { decodeJournalBlock, encodeJournalBlock, entriesPerBlock, type JournalEntry } from '../../src/format/journal-block.ts';

const entry = (i: number, deleted = false): JournalEntry => ({
  hash: Buffer.alloc(32, i),
  hostOffset: 0x10000 * (i + 1),
  firstGuestOffset: 0x1000 * i,
  deleted,
});

test('a 4 KiB block holds 78 hash entries of 52 bytes', () => {
  assert.equal(entriesPerBlock(4096), 78);
  assert.equal(entriesPerBlock(512), 9);
});

test('golden hex: a block with one entry', () => {
  const block = encodeJournalBlock(512, 7, [entry(0xab)]);
  const hex = block.subarray(0, 24 + 52).toString('hex');
  assert.equal(hex.slice(0, 8), '51444a42'); // "QDJB"
  assert.equal(hex.slice(16, 48), '0000000000000007' + '0001' + '0034' + '00000000'); // seq 7, 1 entry, 52 bytes
  assert.equal(hex.slice(48, 56), '01000030'); // type 1, flags 0, payload 48
  assert.equal(hex.slice(56, 120), 'ab'.repeat(32));
  assert.equal(hex.slice(120), '0000000000ac0000' + '00000000000ab000');
  assert.ok(block.subarray(76).every((b) => b === 0));
});

test('round trip, deleted flag included', () => {
  const entries = [entry(1), entry(2, true), entry(3)];
  const d = decodeJournalBlock(encodeJournalBlock(4096, 42, entries), 42);
  assert.equal(d.verdict, 'valid');
  assert.deepEqual(
    d.entries.map(({ offsetInBlock, ...e }) => e),
    entries,
  );
  assert.deepEqual(
    d.entries.map((e) => e.offsetInBlock),
    [24, 76, 128],
  );
});

test('damage of every kind is judged, never thrown', () => {
  const good = encodeJournalBlock(512, 3, [entry(1), entry(2)]);
  const damaged = (f: (b: Buffer) => void) => {
    const b = Buffer.from(good);
    f(b);
    return b;
  };
  assert.equal(decodeJournalBlock(Buffer.alloc(512), 3).verdict, 'empty');
  assert.equal(
    decodeJournalBlock(
      damaged((b) => b.writeUInt32BE(0xdeadbeef, 0)),
      3,
    ).verdict,
    'bad-magic',
  );
  assert.equal(
    decodeJournalBlock(
      damaged((b) => {
        b[100] ^= 1;
      }),
      3,
    ).verdict,
    'bad-checksum',
  );
  assert.equal(
    decodeJournalBlock(
      damaged((b) => b.fill(0, 300)),
      3,
    ).verdict,
    'valid',
  ); // padding only
  assert.equal(
    decodeJournalBlock(
      damaged((b) => b.fill(0, 60)),
      3,
    ).verdict,
    'bad-checksum',
  ); // torn
  assert.equal(decodeJournalBlock(good, 4).verdict, 'bad-sequence');
  // Entry-level damage behind a recomputed checksum: the checksum alone is not trusted.
  const resign = (f: (b: Buffer) => void) =>
    damaged((b) => {
      f(b);
      b.writeUInt32BE(crc32(b.subarray(8)), 4);
    });
  assert.equal(
    decodeJournalBlock(
      resign((b) => b.writeUInt16BE(0xffff, 18)),
      3,
    ).verdict,
    'bad-entry',
  );
  assert.equal(
    decodeJournalBlock(
      resign((b) => b.writeUInt16BE(300, 26)),
      3,
    ).verdict,
    'bad-entry',
  );
  assert.equal(
    decodeJournalBlock(
      resign((b) => {
        b[24] = 9;
      }),
      3,
    ).verdict,
    'bad-entry',
  );
  assert.equal(
    decodeJournalBlock(
      resign((b) => b.writeUInt16BE(3, 16)),
      3,
    ).verdict,
    'bad-entry',
  );
  assert.equal(
    decodeJournalBlock(
      resign((b) => b.writeUInt32BE(0xffffffff, 24 + 4 + 32)),
      3,
    ).verdict,
    'bad-entry',
  );
});

test('the remaining branches: too many entries to encode, a sequence past 2^53, entry bytes longer than the entries', () => {
  assert.throws(
    () =>
      encodeJournalBlock(
        512,
        0,
        Array.from({ length: 10 }, (_, i) => entry(i)),
      ),
    /10 entries do not fit in a 512-byte journal block/,
  );
  assert.equal(
    encodeJournalBlock(
      512,
      0,
      Array.from({ length: 9 }, (_, i) => entry(i)),
    ).length,
    512,
  );

  // A sequence number of 2^60: valid checksum, but no expected sequence can match it.
  const far = encodeJournalBlock(512, 0, [entry(1)]);
  far.writeBigUInt64BE(1n << 60n, 8);
  far.writeUInt32BE(crc32(far.subarray(8)), 4);
  const d = decodeJournalBlock(far, 0);
  assert.deepEqual([d.verdict, d.sequence, d.checksumValid], ['bad-sequence', -1, true]);
  const torn = Buffer.from(far);
  torn[100] ^= 1;
  assert.deepEqual([decodeJournalBlock(torn, 0).verdict, decodeJournalBlock(torn, 0).sequence], ['bad-checksum', -1]);

  // One entry, but 56 entry bytes declared: 4 bytes after the last entry that belong to none.
  const extra = encodeJournalBlock(512, 3, [entry(1)]);
  extra.writeUInt16BE(52 + 4, 18);
  extra.writeUInt32BE(crc32(extra.subarray(8)), 4);
  const e = decodeJournalBlock(extra, 3);
  assert.deepEqual([e.verdict, e.reason, e.entries.length], ['bad-entry', 'entry bytes 56 do not match 1 entries', 0]);
});
