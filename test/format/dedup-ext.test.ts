import { test } from 'node:test';
import assert from 'node:assert/strict';
import { crc32 } from 'node:zlib';
import {
  decodeDedupConfig,
  decodeDedupExtension,
  encodeDedupConfig,
  encodeDedupExtension,
  nextGeneration,
  configBytesFor,
  type DedupConfig,
  type DedupExtension,
} from '../../src/format/dedup-ext.ts';
import { CorruptImageError } from '../../src/errors.ts';

const ext: DedupExtension = {
  version: 1,
  hashAlgorithm: 0,
  dirty: true,
  verify: false,
  compress: false,
  order: 9,
  journalBlockSize: 4096,
  maxIncarnations: 2,
  configOffset: 0x5000,
  configBytes: 4096,
};

test('extension golden hex and round trip', () => {
  const buf = encodeDedupExtension(ext);
  assert.equal(buf.toString('hex'), '01000109' + '00001000' + '00000002' + '00001000' + '0000000000005000' + '00'.repeat(24));
  assert.deepEqual(decodeDedupExtension(buf, 4096), ext);
});

test('extension refusals name the field', () => {
  const bad = (f: (b: Buffer) => void) => {
    const b = encodeDedupExtension(ext);
    f(b);
    return () => decodeDedupExtension(b, 4096);
  };
  assert.throws(
    bad((b) => {
      b[0] = 2;
    }),
    /unknown version 2/,
  );
  assert.throws(
    bad((b) => {
      b[2] = 0x80;
    }),
    /unknown flags/,
  );
  assert.throws(
    bad((b) => {
      b[3] = 25;
    }),
    /store order 25/,
  );
  assert.throws(
    bad((b) => b.writeUInt32BE(3000, 4)),
    /journal block size 3000/,
  );
  assert.throws(
    bad((b) => b.writeUInt32BE(0x5200, 20)),
    /not a non-zero multiple/,
  );
  assert.throws(
    bad((b) => {
      b[30] = 1;
    }),
    /reserved/,
  );
  assert.throws(
    () => decodeDedupExtension(Buffer.alloc(10), 4096),
    (e: unknown) => e instanceof CorruptImageError && /payload of 10 bytes/.test(e.message),
  );
});

const config: DedupConfig = {
  currentJournal: 1,
  journals: [
    { offset: 0x10000, blocks: 16, startSequence: 0, written: 5 },
    { offset: 0x20000, blocks: 16, startSequence: 33, written: 0 },
  ],
  incarnations: [
    { offset: 0x40000, entries: 1900, generation: 5 },
    { offset: 0x30000, entries: 1890, generation: 4 },
  ],
  limbo: [{ offset: 0x50000, clusters: 26 }],
};

test('configuration area round trip and layout', () => {
  const buf = encodeDedupConfig(config, 4096);
  assert.equal(configBytesFor(config), 72 + 2 * 32 + 16);
  assert.equal(buf.subarray(0, 4).toString('latin1'), 'QDDC');
  assert.equal(buf.readUInt32BE(4), crc32(buf.subarray(8)));
  assert.equal(buf.subarray(8, 17).toString('hex'), '00000002' + '00000001' + '01');
  assert.equal(buf.subarray(48, 72).toString('hex'), '0000000000020000' + '00000010' + '00000000' + '0000000000000021');
  assert.deepEqual(decodeDedupConfig(buf, 0x5000, 4096), config);
  assert.equal(nextGeneration(config), 6);
});

test('configuration area damage is refused', () => {
  const buf = encodeDedupConfig(config, 4096);
  const flipped = Buffer.from(buf);
  flipped[100] ^= 1;
  assert.throws(() => decodeDedupConfig(flipped, 0x5000, 4096), /checksum mismatch/);
  const resign = (f: (b: Buffer) => void) => {
    const b = Buffer.from(buf);
    f(b);
    b.writeUInt32BE(crc32(b.subarray(8)), 4);
    return () => decodeDedupConfig(b, 0x5000, 4096);
  };
  assert.throws(
    resign((b) => b.writeUInt32BE(1000, 8)),
    /do not fit/,
  );
  assert.throws(
    resign((b) => {
      b[16] = 2;
    }),
    /current journal 2/,
  );
  assert.throws(
    resign((b) => b.writeUInt32BE(0x40200, 72 + 4)),
    /incarnation 0 offset/,
  );
  assert.throws(
    resign((b) => b.writeUInt32BE(9, 72 + 32 + 20)),
    /not older/,
  );
  assert.throws(() => encodeDedupConfig(config, 100), RangeError);
});
