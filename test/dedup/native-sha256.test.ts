// OpenSSL's SHA-256 through koffi (src/dedup/native-sha256.ts): the digests of crypto.hash,
// for every kind of buffer a cluster comes in (shared memory, Node's pool, V8's heap, offsets),
// one range or many at once (up to eight through sha256_multi_block, on each of its code
// paths), ranges checked before any byte is read, and no native hasher where koffi's file is
// wrong.

import { execFileSync } from 'node:child_process';
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
      into(data, at, len, 1, out, 8);
      assert.deepEqual(Buffer.from(out.subarray(8, 40)), expected(data.subarray(at, at + len)), `${name}: [${at}, +${len})`);
    }
  }
  // Many buffers one after another (each side remembers its last): every digest in its place.
  const bufs = Array.from({ length: 50 }, () => crypto.randomBytes(1 + Math.floor(Math.random() * 5000)));
  const out = Buffer.alloc(50 * 32);
  bufs.forEach((b, i) => into(b, 0, b.length, 1, out, i * 32));
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
      into(data, 0, data.length, 1, out, 0);
      assert.deepEqual(Buffer.from(out), expected(data), `round ${round}`);
      const many = crypto.randomBytes(9 * 512);
      const outs = new Uint8Array(9 * 32);
      into(many, 0, 512, 9, outs, 0); // a group of eight and one
      for (let i = 0; i < 9; i++)
        assert.deepEqual(Buffer.from(outs.subarray(i * 32, i * 32 + 32)), expected(many.subarray(i * 512, (i + 1) * 512)), `round ${round}, range ${i}`);
      assert.equal(junk.length, 2000);
    }
  },
);

test('native SHA-256: a range outside its buffer is refused before anything is read', { skip: nativeSha256() ? false : 'no native SHA-256 here' }, () => {
  const into = nativeSha256()!;
  const data = Buffer.alloc(100);
  const out = Buffer.alloc(64);
  assert.throws(() => into(data, 50, 51, 1, out, 0), RangeError);
  assert.throws(() => into(data, -1, 10, 1, out, 0), RangeError);
  assert.throws(() => into(data, 0, 10, 1, out, 33), RangeError);
  assert.throws(() => into(data, 10, -5, 1, out, 0), RangeError);
  assert.throws(() => into(data, Number.NaN, 10, 1, out, 0), RangeError);
  assert.throws(() => into(data, 0, 64, 2, out, 0), RangeError, 'two ranges of 64 bytes past 100');
  assert.throws(() => into(data, 0, 10, 3, out, 0), RangeError, 'three digests past 64 bytes');
  assert.throws(() => into(data, 0, 10, -1, out, 0), RangeError);
});

/** Checks `into` against crypto.hash for every count of ranges to 20, of lengths that are whole 64-byte blocks and not, at offsets. */
function checkRanges(into: NonNullable<ReturnType<typeof nativeSha256>>): void {
  for (const length of [64, 128, 512, 4096, 65536, 100, 0]) {
    const data = crypto.randomBytes(20 * length + 13);
    for (let count = 0; count <= 20; count++) {
      const out = Buffer.alloc(count * 32 + 7, 0xee);
      into(data, 13, length, count, out, 7);
      for (let i = 0; i < count; i++)
        assert.deepEqual(
          out.subarray(7 + i * 32, 7 + (i + 1) * 32),
          expected(data.subarray(13 + i * length, 13 + (i + 1) * length)),
          `${count}×${length}: range ${i}`,
        );
      assert.ok(
        out.subarray(0, 7).every((b) => b === 0xee),
        `${count}×${length}: nothing written before the first digest`,
      );
    }
  }
}

test('native SHA-256: many ranges at once (groups of up to eight), every count and length', { skip: nativeSha256() ? false : 'no native SHA-256 here' }, () => {
  const into = nativeSha256()!;
  if (process.platform === 'linux' && process.arch === 'x64') assert.equal(into.grouped, true, "node's OpenSSL exports sha256_multi_block on x64");
  checkRanges(into);
});

test(
  "native SHA-256: sha256_multi_block's other code paths (no SHA-NI: AVX2; neither: SSE), by OpenSSL's capability mask",
  { skip: nativeSha256()?.grouped ? false : 'no grouped native SHA-256 here' },
  () => {
    // OPENSSL_ia32cap masks what OpenSSL believes the CPU has: bit 29 of the second word is
    // SHA-NI, bit 5 AVX2. A child process runs the same checks under each mask.
    const child = `
      const { nativeSha256 } = await import(${JSON.stringify(new URL('../../src/dedup/native-sha256.ts', import.meta.url).href)});
      const crypto = await import('node:crypto');
      const into = nativeSha256();
      if (!into?.grouped) throw new Error('no grouped native SHA-256');
      let checked = 0;
      for (const length of [64, 4096]) {
        const data = crypto.randomBytes(19 * length);
        for (let count = 1; count <= 19; count++) {
          const out = Buffer.alloc(count * 32);
          into(data, 0, length, count, out, 0);
          for (let i = 0; i < count; i++, checked++)
            if (!out.subarray(i * 32, i * 32 + 32).equals(crypto.hash('sha256', data.subarray(i * length, (i + 1) * length), 'buffer'))) throw new Error('digest ' + i + ' of ' + count + '×' + length);
        }
      }
      console.log(checked);`;
    for (const mask of [':~0x20000000', ':~0x20000020']) {
      const got = execFileSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', child], {
        env: { ...process.env, OPENSSL_ia32cap: mask },
        encoding: 'utf8',
      });
      assert.equal(got.trim(), String(2 * ((19 * 20) / 2)), `OPENSSL_ia32cap=${mask}`);
    }
  },
);

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
