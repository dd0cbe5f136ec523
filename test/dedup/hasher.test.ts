import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { sha256 as nobleSha256 } from '@noble/hashes/sha2.js';
import { sha3_256 as nobleSha3 } from '@noble/hashes/sha3.js';
import { blake3 as nobleBlake3 } from '@noble/hashes/blake3.js';
import { HASH_BYTES } from '../../src/format/hash-entry.ts';
import {
  HASH_ALGORITHMS,
  SUPPORTED_HASH_ALGORITHMS,
  type SupportedHashAlgorithm,
  clustersInto,
  createHasher,
  hashAlgorithmId,
  hashAlgorithmName,
  parseHashAlgorithm,
} from '../../src/dedup/hasher.ts';
import { ChunkHasher } from '../../src/dedup/chunk-hasher.ts';
import { controlLayout } from '../../src/image/chunk-workers.ts';
import { InternalError, UnsupportedError, UsageError } from '../../src/errors.ts';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const ascii = (s: string) => Buffer.from(s, 'latin1');

/** A copy of `data` whose byteOffset is odd (exercises the unaligned paths). */
function unaligned(data: Uint8Array): Buffer {
  const b = Buffer.alloc(data.length + 1);
  b.set(data, 1);
  return b.subarray(1);
}

// FIPS 180-2 / FIPS 202 examples (NIST CSRC "Examples with intermediate values").
const SHA256_KAT: [string, string][] = [
  ['', 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'],
  ['abc', 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'],
  ['abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq', '248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1'],
];
const SHA3_KAT: [string, string][] = [
  ['', 'a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a'],
  ['abc', '3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532'],
];
// BLAKE3 official test vectors (BLAKE3-team/BLAKE3 test_vectors/test_vectors.json, "hash"
// mode, first 32 bytes): input of input_len bytes 0, 1, …, 250, 0, 1, … (i % 251).
const BLAKE3_KAT: [number, string][] = [
  [0, 'af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262'],
  [1, '2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213'],
  [1023, '10108970eeda3eb932baac1428c7a2163b0e924c9a9e25b35bba72b28f70bd11'],
  [1024, '42214739f095a406f3fc83deb889744ac00df831c10daa55189b5d121c855af7'],
  [1025, 'd00278ae47eb27b34faecf67b4fe263f82d5412916c1ffd97c8cb7fb814b8444'],
  [2048, 'e776b6028c7cd22a4d0ba182a8bf62205d2ef576467e838ed6f2529b85fba24a'],
  [2049, '5f4d72f40d7a5f82b15ca2b2e44b1de3c2ef86c426c95c1af0b6879522563030'],
  [3072, 'b98cb0ff3623be03326b373de6b9095218513e64f1ee2edd2525c7ad1e5cffd2'],
  [3073, '7124b49501012f81cc7f11ca069ec9226cecb8a2c850cfe644e327d22d3e1cd3'],
  [4096, '015094013f57a5277b59d8475c0501042c0b642e531b0a1c8f58d2163229e969'],
  [4097, '9b4052b38f1c5fc8b1f9ff7ac7b27cd242487b3d890d15c96a1c25b8aa0fb995'],
  [5120, '9cadc15fed8b5d854562b26a9536d9707cadeda9b143978f319ab34230535833'],
  [5121, '628bd2cb2004694adaab7bbd778a25df25c47b9d4155a55f8fbd79f2fe154cff'],
  [6144, '3e2e5b74e048f3add6d21faab3f83aa44d3b2278afb83b80b3c35164ebeca205'],
  [6145, 'f1323a8631446cc50536a9f705ee5cb619424d46887f3c376c695b70e0f0507f'],
  [7168, '61da957ec2499a95d6b8023e2b0e604ec7f6b50e80a9678b89d2628e99ada77a'],
  [7169, 'a003fc7a51754a9b3c7fae0367ab3d782dccf28855a03d435f8cfe74605e7817'],
  [8192, 'aae792484c8efe4f19e2ca7d371d8c467ffb10748d8a5a1ae579948f718a2a63'],
  [8193, 'bab6c09cb8ce8cf459261398d2e7aef35700bf488116ceb94a36d0f5f1b7bc3b'],
  [16384, 'f875d6646de28985646f34ee13be9a576fd515f76b5b0a26bb324735041ddde4'],
  [31744, '62b6960e1a44bcc1eb1a611a8d6235b6b4b78f32e7abc4fb4c6cdcce94895c47'],
  [102400, 'bc3e3d41a1146b069abffad3c0d44860cf664390afce4d9661f7902e7943e085'],
];
const blake3Input = (len: number) => Uint8Array.from({ length: len }, (_, i) => i % 251);

/** The hashes of the consecutive clusters of `data`, through clustersInto (the main thread's batch hashing). */
function hashAll(alg: SupportedHashAlgorithm, data: Uint8Array, clusterSize: number): Buffer {
  const n = data.length / clusterSize;
  const out = Buffer.alloc(n * HASH_BYTES);
  clustersInto(alg)(data, 0, clusterSize, n, out, 0);
  return out;
}

test('algorithm table: on-disk numbers and names round-trip', () => {
  assert.deepEqual(HASH_ALGORITHMS, { sha256: 0, 'sha3-256': 1, skein: 2, blake3: 3 });
  for (const [name, id] of Object.entries(HASH_ALGORITHMS)) {
    assert.equal(hashAlgorithmName(id), name);
    assert.equal(hashAlgorithmId(name as keyof typeof HASH_ALGORITHMS), id);
  }
  assert.deepEqual(SUPPORTED_HASH_ALGORITHMS, ['sha256', 'sha3-256', 'blake3']);
  for (const id of [4, 255, -1, 1.5]) assert.throws(() => hashAlgorithmName(id), UnsupportedError);
  for (const alg of SUPPORTED_HASH_ALGORITHMS) {
    assert.equal(createHasher(alg).id, HASH_ALGORITHMS[alg]);
    assert.equal(createHasher(HASH_ALGORITHMS[alg]).algorithm, alg);
  }
});

test('parseHashAlgorithm accepts the three names, any case', () => {
  assert.equal(parseHashAlgorithm('sha256'), 'sha256');
  assert.equal(parseHashAlgorithm('SHA3-256'), 'sha3-256');
  assert.equal(parseHashAlgorithm('Blake3'), 'blake3');
});

test('skein keeps number 2 but is refused with a clear UnsupportedError', () => {
  const isSkeinRefusal = (e: unknown) =>
    e instanceof UnsupportedError && /skein \(2\) is not supported; use sha256, sha3-256 or blake3/.test(e.message) && e.exitCode === 1;
  assert.throws(() => parseHashAlgorithm('skein'), isSkeinRefusal);
  assert.throws(() => createHasher('skein'), isSkeinRefusal);
  assert.throws(() => createHasher(2), isSkeinRefusal);
});

test('unknown names are usage errors that list the choices', () => {
  for (const name of ['md5', 'sha1', 'sha-256', 'sha3', 'off', '', 'blake2b']) {
    assert.throws(
      () => parseHashAlgorithm(name),
      (e: unknown) => e instanceof UsageError && e.message.includes(`'${name}'`) && e.message.includes('sha256, sha3-256 or blake3'),
      name,
    );
  }
});

test('sha256 known answers (FIPS 180-2)', () => {
  const h = createHasher('sha256');
  for (const [msg, want] of SHA256_KAT) {
    assert.equal(hex(h.hash(ascii(msg))), want, msg);
    assert.equal(hex(h.hash(unaligned(ascii(msg)))), want, msg);
  }
});

test('sha3-256 known answers (FIPS 202)', () => {
  const h = createHasher('sha3-256');
  for (const [msg, want] of SHA3_KAT) assert.equal(hex(h.hash(ascii(msg))), want, msg);
});

test('blake3 official test vectors, aligned and unaligned input', () => {
  const h = createHasher('blake3');
  assert.equal(hex(h.hash(ascii('abc'))), '6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85');
  for (const [len, want] of BLAKE3_KAT) {
    const input = blake3Input(len);
    assert.equal(hex(h.hash(input)), want, `length ${len}`);
    assert.equal(hex(h.hash(unaligned(input))), want, `length ${len}, unaligned`);
    assert.equal(hex(nobleBlake3(input)), want, `noble, length ${len}`);
  }
});

test('blake3 agrees with @noble/hashes on every length to 2100 and on random sizes', () => {
  const h = createHasher('blake3');
  const data = crypto.randomBytes(2100);
  for (let len = 0; len <= 2100; len++) {
    const input = data.subarray(0, len);
    assert.equal(hex(h.hash(input)), hex(nobleBlake3(input)), `length ${len}`);
  }
  for (const len of [4095, 4096, 4097, 65536, 65536 + 1024, 131072 - 1, 2 * 1024 * 1024, crypto.randomInt(1, 300_000)]) {
    const input = crypto.randomBytes(len);
    assert.equal(hex(h.hash(input)), hex(nobleBlake3(input)), `length ${len}`);
  }
});

test('node:crypto sha256 and sha3-256 agree with @noble/hashes on random 4 KiB clusters', () => {
  const data = crypto.randomBytes(64 * 4096);
  const a = hashAll('sha256', data, 4096);
  const b = hashAll('sha3-256', data, 4096);
  for (let i = 0; i < 64; i++) {
    const cluster = data.subarray(i * 4096, (i + 1) * 4096);
    assert.equal(hex(a.subarray(i * 32, i * 32 + 32)), hex(nobleSha256(cluster)), `sha256 cluster ${i}`);
    assert.equal(hex(b.subarray(i * 32, i * 32 + 32)), hex(nobleSha3(cluster)), `sha3-256 cluster ${i}`);
  }
});

test('clustersInto is hash() of each cluster, for every algorithm and cluster size', () => {
  for (const alg of SUPPORTED_HASH_ALGORITHMS) {
    const h = createHasher(alg);
    for (const clusterSize of [512, 4096, 65536]) {
      const n = clusterSize === 65536 ? 6 : 17;
      // Repeat cluster 0 at 5: equal clusters, equal hashes.
      const data = crypto.randomBytes(n * clusterSize);
      data.copy(data, 5 * clusterSize, 0, clusterSize);
      for (const input of [data, unaligned(data)]) {
        const all = hashAll(alg, input, clusterSize);
        assert.equal(all.length, n * HASH_BYTES);
        for (let i = 0; i < n; i++) {
          assert.deepEqual(
            all.subarray(i * 32, i * 32 + 32),
            h.hash(input.subarray(i * clusterSize, (i + 1) * clusterSize)),
            `${alg} ${clusterSize} cluster ${i}`,
          );
        }
        assert.deepEqual(all.subarray(0, 32), all.subarray(5 * 32, 6 * 32));
        assert.notDeepEqual(all.subarray(0, 32), all.subarray(32, 64));
      }
      assert.equal(h.hash(data.subarray(0, clusterSize)).length, HASH_BYTES);
    }
  }
});

/** `data` copied into shared memory at byte `at` of a larger buffer, as the write pipeline's chunks are. */
function sharedCopy(data: Buffer, at = 0): Buffer {
  const b = Buffer.from(new SharedArrayBuffer(at + data.length + 100));
  data.copy(b, at);
  return b.subarray(at, at + data.length);
}

test("ChunkHasher: the worker gives the main thread's digests and finds zero clusters, in shared memory or not", async () => {
  const data = crypto.randomBytes(64 * 4096 + 100);
  data.fill(0, 100 + 5 * 4096, 100 + 7 * 4096); // clusters 5 and 6 (from byte 100) are zero
  data[100 + 9 * 4096] = 0; // cluster 9 starts and ends with a zero byte but is not zero
  data[100 + 10 * 4096 - 1] = 0;
  for (const alg of SUPPORTED_HASH_ALGORITHMS) {
    const want = createHasher(alg);
    const h = new ChunkHasher(alg, 4096);
    try {
      for (const chunk of [sharedCopy(data, 3), Buffer.from(data)]) {
        const d = await h.digest(chunk, 100, 64);
        assert.equal(d.count, 64);
        for (let i = 0; i < 64; i++) {
          const cluster = chunk.subarray(100 + i * 4096, 100 + (i + 1) * 4096);
          if (i === 5 || i === 6) assert.equal(d.zero[i], 1, `${alg}: cluster ${i} is zero`);
          else {
            assert.equal(d.zero[i], 0);
            assert.deepEqual(d.hashes.subarray(i * 32, i * 32 + 32), want.hash(cluster), `${alg} cluster ${i}`);
          }
        }
      }
      // Two chunks out at once come back in order, each right.
      const [x, y] = await Promise.all([h.digest(sharedCopy(data), 100, 8), h.digest(sharedCopy(data), 100 + 4096, 8)]);
      assert.deepEqual(x.hashes.subarray(32, 64), y.hashes.subarray(0, 32));
      await assert.rejects(h.digest(sharedCopy(data), 100, 65), InternalError, 'clusters past the chunk');
    } finally {
      await h.close();
    }
  }
});

test('ChunkHasher: complete() at once shares the chunk between the worker and this thread, with the same digest', async () => {
  const data = sharedCopy(crypto.randomBytes(2048 * 4096));
  data.fill(0, 7 * 4096, 8 * 4096);
  const want = createHasher('sha256');
  const h = new ChunkHasher('sha256', 4096);
  try {
    for (let round = 0; round < 4; round++) {
      const d = h.begin(data, 0, 2048).complete(); // the worker may have done any part of it
      for (const i of [0, 6, 8, 1000, 2047])
        assert.deepEqual(d.hashes.subarray(i * 32, i * 32 + 32), want.hash(data.subarray(i * 4096, (i + 1) * 4096)), `round ${round}, cluster ${i}`);
      assert.equal(d.zero[7], 1);
      assert.equal(
        d.zero.reduce((n, z) => n + z, 0),
        1,
      );
    }
  } finally {
    await h.close();
  }
});

test('ChunkHasher: the worker script runs and hashes a whole chunk by itself, before complete()', async () => {
  // Results never depend on the worker (the main thread does what it leaves), so only this
  // test tells a worker whose script fails from one that works.
  const count = 1024; // 4 MiB: a chunk the worker is given
  const data = sharedCopy(crypto.randomBytes(count * 4096));
  const h = new ChunkHasher('sha256', 4096);
  try {
    const d = h.begin(data, 0, count);
    const ctrl = new Int32Array(d.out, controlLayout(count * (HASH_BYTES + 1), count).ctrl, 2); // the digest's counters
    for (const t0 = Date.now(); Atomics.load(ctrl, 1) < count && Date.now() - t0 < 20_000; ) await new Promise((r) => setTimeout(r, 5));
    assert.equal(Atomics.load(ctrl, 1), count, 'clusters the worker hashed');
    const want = createHasher('sha256');
    for (const i of [0, 511, 1023])
      assert.deepEqual(d.hashes.subarray(i * 32, i * 32 + 32), want.hash(data.subarray(i * 4096, (i + 1) * 4096)), `cluster ${i}`);
    d.complete();
  } finally {
    await h.close();
  }
});

test('ChunkHasher: a worker lost mid-chunk, or closed, leaves the main thread to hash', async () => {
  const data = sharedCopy(crypto.randomBytes(1024 * 4096));
  const want = hashAll('sha256', data, 4096);
  const h = new ChunkHasher('sha256', 4096);
  const pending = h.digest(data, 0, 1024);
  await h.close();
  assert.deepEqual((await pending).hashes, want);
  assert.deepEqual((await h.digest(data, 0, 1024)).hashes, want);
});
