// SHA-256 of clusters by OpenSSL's own SHA256 functions, called through koffi from the OpenSSL that
// node runs with (the symbols its binary exports, or the libcrypto it links): the same SHA-NI
// code crypto.hash reaches, without what crypto.hash does around it per call (the algorithm
// name normalised, a digest context made and freed, a result Buffer allocated and copied).
// Clusters of one chunk go up to eight at once through OpenSSL's multi-buffer SHA-256. On the
// project machine, 4 KiB clusters: 2.5 µs each (one at a time 4.3) against crypto.hash's 5.5
// (`npm run bench:hash`).
//
// Bytes are passed by address: a view's ArrayBuffer is made once (V8 then keeps its bytes
// where they are: backing stores do not move) and its address taken once. The worker of
// ./chunk-hasher.ts runs makeNativeSha256's source, so the function uses nothing from outside
// itself. Where koffi, the symbol or its self-check fails, there is no native SHA-256 and
// callers hash with crypto.hash.

import { createRequire } from 'node:module';
import { koffiModule } from '../image/libc.ts';

/**
 * Hashes the `count` ranges of `length` bytes one after another from data[byteOff] into
 * out[outOff …], 32 bytes each: the shape of hasher.ts's ClustersInto.
 */
export type Sha256Into = ((data: Uint8Array, byteOff: number, length: number, count: number, out: Uint8Array, outOff: number) => void) & {
  /** True when ranges go up to eight at once (sha256_multi_block is there and passed its check). */
  readonly grouped: boolean;
};

/**
 * SHA-256 by the OpenSSL in this process through the koffi module at `path` (loaded with
 * `load`, the caller's require); null where any step fails. Self-contained: the worker
 * script runs its source.
 *
 * One range: SHA256_Init, _Update, _Final on a context of this thread's own. SHA256() itself
 * goes through EVP_Q_digest (an algorithm fetch per call): 4.4 µs per 4 KiB where the three
 * calls cost 3.8 (a loop of calls alone; with the range checks and views of a real caller, 4.3).
 *
 * Ranges of a whole number of 64-byte blocks, two or more: up to eight at once through
 * sha256_multi_block, the multi-buffer SHA-256 OpenSSL keeps for its AES-CBC-HMAC ciphers
 * (exported by node's binary; not a public API, so it is looked up, checked, and done
 * without where missing or wrong). It takes eight independent states (word w of lane l at
 * w·8 + l) and one {pointer, blocks} descriptor per lane, and runs each lane's blocks:
 * with SHA-NI two lanes interleaved (the rounds of one fill the other's latency), else eight
 * lanes in AVX2 or four in SSE. A first call runs the ranges' blocks, a second each lane's
 * padding, which is the same block for every range of one length (0x80, zeros, the length
 * in bits, big-endian); the digest is then the state's words, big-endian. 2.5 µs per 4 KiB
 * cluster against 3.9 for the three calls (SHA-NI, one loop of calls alone).
 *
 * Checked at load: "abc" (FIPS 180-2's example) one range at a time, then groups of every
 * size against it, one range at a time; groups are given up if they disagree.
 */
export function makeNativeSha256(load: (id: string) => unknown, path: string): Sha256Into | null {
  type Lib = { func(proto: string): (...args: unknown[]) => unknown };
  try {
    const koffi = load(path) as { load(name: null): Lib; address(pointer: unknown): bigint };
    const lib = koffi.load(null); // the program and what it links: node's OpenSSL
    const init = lib.func('int SHA256_Init(uintptr_t c)');
    const update = lib.func('int SHA256_Update(uintptr_t c, uintptr_t d, size_t n)');
    const final = lib.func('int SHA256_Final(uintptr_t md, uintptr_t c)');
    const memmove = lib.func('void *memmove(void *dst, const void *src, size_t n)');
    type MultiBlock = (ctx: number, desc: number, n4x: number) => unknown;
    let multiBlock: MultiBlock | null = null;
    try {
      multiBlock = lib.func('void sha256_multi_block(uintptr_t ctx, uintptr_t desc, int n4x)') as MultiBlock;
    } catch {
      // not exported by this OpenSSL: one range at a time
    }
    // The address of an ArrayBuffer's first byte (memmove(p, p, 0) returns p), remembered;
    // each side keeps its last buffer at hand, as a chunk's clusters come one after another.
    const known = new WeakMap<ArrayBufferLike, number>();
    const addressOf = (buffer: ArrayBufferLike): number => {
      let a = known.get(buffer);
      if (a === undefined) {
        const whole = new Uint8Array(buffer);
        a = Number(koffi.address(memmove(whole, whole, 0)));
        known.set(buffer, a);
      }
      return a;
    };
    const side = () => {
      let last: ArrayBufferLike | null = null;
      let address = 0;
      return (view: Uint8Array): number => {
        const buffer = view.buffer; // made once for a view on V8's heap: its bytes then stay where they are
        if (buffer !== last) {
          address = addressOf(buffer);
          last = buffer;
        }
        return address + view.byteOffset;
      };
    };
    const dataAt = side();
    const outAt = side();
    // This thread's own memory, named at every call that uses it, so it lives as long as the
    // function: a SHA256_CTX (112 bytes), the eight lanes' states, their descriptors
    // ({pointer, blocks} in 16 bytes), and the padding block of the last length.
    const context = new Uint8Array(256);
    const lanes = new Uint32Array(64);
    const lanesBytes = new Uint8Array(lanes.buffer);
    const descs = new Uint32Array(32);
    const descsBytes = new Uint8Array(descs.buffer);
    const padding = new Uint8Array(64);
    let paddedLength = -1;
    const ownAt = side();
    const IV = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

    const one = (at: number, length: number, outAddress: number) => {
      const c = ownAt(context);
      init(c);
      update(c, at, length);
      final(outAddress, c);
    };
    /** Lanes [0, n) get their first block at `at` + l·length (or each the padding block). */
    const describe = (at: number, stride: number, blocks: number, n: number) => {
      for (let l = 0; l < 8; l++) {
        const a = at + (l < n ? l * stride : 0);
        descs[l * 4] = a >>> 0;
        descs[l * 4 + 1] = Math.floor(a / 0x100000000);
        descs[l * 4 + 2] = l < n ? blocks : 0; // a lane of no blocks is left alone
      }
    };
    /** The `n` (2–8) ranges from address `at`, `length` bytes apart, into out[outOff …]. */
    const group = (at: number, length: number, n: number, out: Uint8Array, outOff: number) => {
      if (length !== paddedLength) {
        padding.fill(0);
        padding[0] = 0x80;
        const bits = length * 8;
        for (let b = 0; b < 8; b++) padding[63 - b] = Math.floor(bits / 2 ** (8 * b)) & 0xff;
        paddedLength = length;
      }
      for (let w = 0; w < 8; w++) lanes.fill(IV[w], w * 8, w * 8 + 8);
      const n4x = n > 4 ? 2 : 1;
      describe(at, length, length / 64, n);
      multiBlock!(ownAt(lanesBytes), ownAt(descsBytes), n4x);
      describe(ownAt(padding), 0, 1, n);
      multiBlock!(ownAt(lanesBytes), ownAt(descsBytes), n4x);
      for (let l = 0; l < n; l++) {
        for (let w = 0, o = outOff + l * 32; w < 8; w++, o += 4) {
          const v = lanes[w * 8 + l];
          out[o] = v >>> 24;
          out[o + 1] = (v >>> 16) & 0xff;
          out[o + 2] = (v >>> 8) & 0xff;
          out[o + 3] = v & 0xff;
        }
      }
    };
    let grouped = multiBlock !== null;
    const into = (data: Uint8Array, byteOff: number, length: number, count: number, out: Uint8Array, outOff: number) => {
      if (!(byteOff >= 0 && length >= 0 && count >= 0 && outOff >= 0) || byteOff + length * count > data.length || outOff + 32 * count > out.length)
        throw new RangeError('SHA256: range outside its buffer');
      const d = dataAt(data) + byteOff;
      let i = 0;
      if (grouped && length % 64 === 0 && length > 0)
        for (; count - i >= 2; i += 8) group(d + i * length, length, Math.min(8, count - i), out, outOff + i * 32);
      for (; i < count; i++) one(d + i * length, length, outAt(out) + outOff + i * 32);
    };

    const hex = (b: Uint8Array) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    const probe = new Uint8Array(3 + 32);
    probe.set([0x61, 0x62, 0x63]);
    into(probe, 0, 3, 1, probe, 3);
    if (hex(probe.subarray(3)) !== 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad') return null;
    if (grouped) {
      // Nine ranges of 128 bytes, each its own bytes: groups of 2 to 8 (and one range after
      // a group of 8) against one range at a time.
      const data = new Uint8Array(9 * 128);
      for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 7)) & 0xff;
      const expected = new Uint8Array(9 * 32);
      grouped = false;
      into(data, 0, 128, 9, expected, 0);
      grouped = true;
      const got = new Uint8Array(9 * 32);
      for (let n = 2; n <= 9 && grouped; n++) {
        got.fill(0);
        into(data, 0, 128, n, got, 0);
        grouped = hex(got.subarray(0, n * 32)) === hex(expected.subarray(0, n * 32));
      }
    }
    return Object.assign(into, { grouped });
  } catch {
    return null;
  }
}

let made: Sha256Into | null | undefined;

/** The native SHA-256 of this thread, made on first use; null where there is none. */
export function nativeSha256(): Sha256Into | null {
  if (made === undefined) {
    const k = koffiModule();
    made = k ? makeNativeSha256(createRequire(import.meta.url), k.path) : null;
  }
  return made;
}

/** koffi's file, for a worker thread's makeNativeSha256; null where this thread has no native SHA-256. */
export function nativeSha256Path(): string | null {
  return nativeSha256() ? koffiModule()!.path : null;
}
