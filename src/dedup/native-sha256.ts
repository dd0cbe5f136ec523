// SHA-256 of clusters by OpenSSL's own SHA256 functions, called through koffi from the OpenSSL that
// node runs with (the symbols its binary exports, or the libcrypto it links): the same SHA-NI
// code crypto.hash reaches, without what crypto.hash does around it per call (the algorithm
// name normalised, a digest context made and freed, a result Buffer allocated and copied).
// On the project machine, 4 KiB clusters: 4.3 µs each against 5.5 µs (`npm run bench:hash`).
//
// Bytes are passed by address: a view's ArrayBuffer is made once (V8 then keeps its bytes
// where they are: backing stores do not move) and its address taken once. The worker of
// ./chunk-hasher.ts runs makeNativeSha256's source, so the function uses nothing from outside
// itself. Where koffi, the symbol or its self-check fails, there is no native SHA-256 and
// callers hash with crypto.hash.

import { createRequire } from 'node:module';
import { koffiModule } from '../image/libc.ts';

/** Hashes data[byteOff, +length) into out[outOff, +32). */
export type Sha256Into = (data: Uint8Array, byteOff: number, length: number, out: Uint8Array, outOff: number) => void;

/**
 * SHA-256 by the OpenSSL in this process (SHA256_Init, _Update, _Final) through the koffi
 * module at `path` (loaded with `load`, the caller's require), checked on "abc" (FIPS 180-2's
 * example); null where any step fails. Self-contained: the worker script runs its source.
 */
export function makeNativeSha256(load: (id: string) => unknown, path: string): Sha256Into | null {
  type Lib = { func(proto: string): (...args: unknown[]) => unknown };
  try {
    const koffi = load(path) as { load(name: null): Lib; address(pointer: unknown): bigint };
    const lib = koffi.load(null); // the program and what it links: node's OpenSSL
    // SHA256() itself goes through EVP_Q_digest (an algorithm fetch per call): the three
    // calls on a context of this thread's own cost 3.8 µs per 4 KiB where it costs 4.4
    // (a loop of calls alone; with the range checks and views of a real caller, 4.3).
    const init = lib.func('int SHA256_Init(uintptr_t c)');
    const update = lib.func('int SHA256_Update(uintptr_t c, uintptr_t d, size_t n)');
    const final = lib.func('int SHA256_Final(uintptr_t md, uintptr_t c)');
    const memmove = lib.func('void *memmove(void *dst, const void *src, size_t n)');
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
    // A SHA256_CTX is 112 bytes; `into` names `context` at every call, so it lives as long.
    const context = new Uint8Array(256);
    const contextAt = side();
    const into: Sha256Into = (data, byteOff, length, out, outOff) => {
      if (!(byteOff >= 0 && length >= 0 && outOff >= 0) || byteOff + length > data.length || outOff + 32 > out.length)
        throw new RangeError('SHA256: range outside its buffer');
      const c = contextAt(context);
      init(c);
      update(c, dataAt(data) + byteOff, length);
      final(outAt(out) + outOff, c);
    };
    const probe = new Uint8Array(3 + 32);
    probe.set([0x61, 0x62, 0x63]);
    into(probe, 0, 3, probe, 3);
    let hex = '';
    for (let i = 3; i < 35; i++) hex += probe[i].toString(16).padStart(2, '0');
    return hex === 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad' ? into : null;
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
