// OpenSSL's SHA256() through koffi (src/dedup/native-sha256.ts): the digests of crypto.hash,
// for every kind of buffer a cluster comes in (shared memory, Node's pool, V8's heap, offsets),
// ranges checked before any byte is read, and no native hasher where koffi's file is wrong.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { createRequire } from 'node:module';
import v8 from 'node:v8';
import { runInNewContext } from 'node:vm';
import { koffiModule } from '../../src/image/libc.ts';
import { makeNativeSha256, nativeSha256 } from '../../src/dedup/native-sha256.ts';
import { clustersInto } from '../../src/dedup/hasher.ts';

const expected = (b: Uint8Array) => crypto.hash('sha256', b, 'buffer');

test('native SHA-256 is there on Linux (koffi installed), else crypto.hash stands in', () => {
  if (process.platform === 'linux') assert.ok(nativeSha256(), 'OpenSSL SHA256() through koffi');
  else assert.equal(nativeSha256(), null);
});

test("native SHA-256: crypto.hash's digests for every kind of buffer and offset", { skip: nativeSha256() ? false : 'no native SHA-256 here' }, () => {
  const into = nativeSha256()!;
  const kinds: [string, () => Uint8Array][] = [
    ['shared memory, at an offset', () => new Uint8Array(new SharedArrayBuffer(20_000), 123, 9000)],
    ['a pooled Buffer slice', () => Buffer.from(crypto.randomBytes(300)).subarray(5)],
    ['a small array on V8 heap', () => new Uint8Array(50)],
    ['a fresh ArrayBuffer', () => new Uint8Array(new ArrayBuffer(8192))],
  ];
  for (const [name, make] of kinds) {
    const data = make();
    crypto.randomFillSync(data);
    const out = make().subarray(0, 40); // the same kind of memory for the digest, 8 bytes in
    for (const [at, len] of [
      [0, data.length],
      [7, 0],
      [3, Math.min(4096, data.length - 3)],
    ]) {
      into(data, at, len, out, 8);
      assert.deepEqual(Buffer.from(out.subarray(8, 40)), expected(data.subarray(at, at + len)), `${name}: [${at}, +${len})`);
    }
  }
  // Many buffers one after another (each side remembers its last): every digest in its place.
  const bufs = Array.from({ length: 50 }, () => crypto.randomBytes(1 + Math.floor(Math.random() * 5000)));
  const out = Buffer.alloc(50 * 32);
  bufs.forEach((b, i) => into(b, 0, b.length, out, i * 32));
  bufs.forEach((b, i) => assert.deepEqual(out.subarray(i * 32, i * 32 + 32), expected(b), `buffer ${i}`));
});

test(
  'native SHA-256: right after garbage collections (what it holds by address stays alive)',
  { skip: nativeSha256() ? false : 'no native SHA-256 here' },
  () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    const into = makeNativeSha256(createRequire(import.meta.url), koffiModule()!.path)!; // a hasher whose own memory is young
    for (let round = 0; round < 20; round++) {
      gc();
      const junk = Array.from({ length: 2000 }, (_, i) => new Uint8Array(200 + (i % 300))); // memory malloc hands out again
      const data = crypto.randomBytes(4096);
      const out = new Uint8Array(32);
      into(data, 0, data.length, out, 0);
      assert.deepEqual(Buffer.from(out), expected(data), `round ${round}`);
      assert.equal(junk.length, 2000);
    }
  },
);

test('native SHA-256: a range outside its buffer is refused before anything is read', { skip: nativeSha256() ? false : 'no native SHA-256 here' }, () => {
  const into = nativeSha256()!;
  const data = Buffer.alloc(100);
  const out = Buffer.alloc(64);
  assert.throws(() => into(data, 50, 51, out, 0), RangeError);
  assert.throws(() => into(data, -1, 10, out, 0), RangeError);
  assert.throws(() => into(data, 0, 10, out, 33), RangeError);
  assert.throws(() => into(data, 10, -5, out, 0), RangeError);
  assert.throws(() => into(data, Number.NaN, 10, out, 0), RangeError);
});

test('clustersInto(sha256) gives crypto.hash digests, cluster after cluster', () => {
  const data = crypto.randomBytes(16 * 4096 + 11);
  const out = Buffer.alloc(16 * 32 + 5);
  clustersInto('sha256')(data, 11, 4096, 16, out, 5);
  for (let i = 0; i < 16; i++) assert.deepEqual(out.subarray(5 + i * 32, 5 + i * 32 + 32), expected(data.subarray(11 + i * 4096, 11 + (i + 1) * 4096)));
});

test('no native SHA-256 from a file that is not koffi', () => {
  const require = createRequire(import.meta.url);
  assert.equal(makeNativeSha256(require, '/nonexistent/koffi.node'), null);
  assert.equal(makeNativeSha256(require, 'node:path'), null); // loads, but is not koffi
});
