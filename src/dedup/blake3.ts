// BLAKE3 (https://github.com/BLAKE3-team/BLAKE3-specs), default hash mode, 32-byte output,
// for the dedup hasher (src/dedup/hasher.ts has the measurements that chose it). Pure.
// Written as one self-contained factory so that its source text can also run in the hash
// worker (WORKER_SOURCE in parallel-hasher.ts): it must not refer to anything outside its own body.

export type Blake3Into = (data: Uint8Array, byteOff: number, len: number, out: Uint8Array, outOff: number) => void;

export function makeBlake3(): Blake3Into {
  const IV = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const CHUNK_START = 1;
  const CHUNK_END = 2;
  const PARENT = 4;
  const ROOT = 8;
  // The compression function, truncated to the 8 chaining-value words. Reads all of cv and
  // m before writing out, so out may alias either. 7 rounds, G inlined, message words in
  // locals permuted between rounds.
  const compress = (
    cv: Uint32Array,
    cvOff: number,
    m: Uint32Array,
    mOff: number,
    counter: number,
    blockLen: number,
    flags: number,
    out: Uint32Array,
    outOff: number,
  ): void => {
    let v0 = cv[cvOff] | 0,
      v1 = cv[cvOff + 1] | 0,
      v2 = cv[cvOff + 2] | 0,
      v3 = cv[cvOff + 3] | 0;
    let v4 = cv[cvOff + 4] | 0,
      v5 = cv[cvOff + 5] | 0,
      v6 = cv[cvOff + 6] | 0,
      v7 = cv[cvOff + 7] | 0;
    let v8 = 0x6a09e667 | 0,
      v9 = 0xbb67ae85 | 0,
      v10 = 0x3c6ef372 | 0,
      v11 = 0xa54ff53a | 0;
    let v12 = counter | 0,
      v13 = Math.floor(counter / 4294967296) | 0,
      v14 = blockLen | 0,
      v15 = flags | 0;
    let m0 = m[mOff] | 0,
      m1 = m[mOff + 1] | 0,
      m2 = m[mOff + 2] | 0,
      m3 = m[mOff + 3] | 0;
    let m4 = m[mOff + 4] | 0,
      m5 = m[mOff + 5] | 0,
      m6 = m[mOff + 6] | 0,
      m7 = m[mOff + 7] | 0;
    let m8 = m[mOff + 8] | 0,
      m9 = m[mOff + 9] | 0,
      m10 = m[mOff + 10] | 0,
      m11 = m[mOff + 11] | 0;
    let m12 = m[mOff + 12] | 0,
      m13 = m[mOff + 13] | 0,
      m14 = m[mOff + 14] | 0,
      m15 = m[mOff + 15] | 0;
    for (let round = 0; ; round++) {
      // Columns: G(0,4,8,12) G(1,5,9,13) G(2,6,10,14) G(3,7,11,15).
      v0 = (v0 + v4 + m0) | 0;
      v12 ^= v0;
      v12 = (v12 >>> 16) | (v12 << 16);
      v8 = (v8 + v12) | 0;
      v4 ^= v8;
      v4 = (v4 >>> 12) | (v4 << 20);
      v0 = (v0 + v4 + m1) | 0;
      v12 ^= v0;
      v12 = (v12 >>> 8) | (v12 << 24);
      v8 = (v8 + v12) | 0;
      v4 ^= v8;
      v4 = (v4 >>> 7) | (v4 << 25);
      v1 = (v1 + v5 + m2) | 0;
      v13 ^= v1;
      v13 = (v13 >>> 16) | (v13 << 16);
      v9 = (v9 + v13) | 0;
      v5 ^= v9;
      v5 = (v5 >>> 12) | (v5 << 20);
      v1 = (v1 + v5 + m3) | 0;
      v13 ^= v1;
      v13 = (v13 >>> 8) | (v13 << 24);
      v9 = (v9 + v13) | 0;
      v5 ^= v9;
      v5 = (v5 >>> 7) | (v5 << 25);
      v2 = (v2 + v6 + m4) | 0;
      v14 ^= v2;
      v14 = (v14 >>> 16) | (v14 << 16);
      v10 = (v10 + v14) | 0;
      v6 ^= v10;
      v6 = (v6 >>> 12) | (v6 << 20);
      v2 = (v2 + v6 + m5) | 0;
      v14 ^= v2;
      v14 = (v14 >>> 8) | (v14 << 24);
      v10 = (v10 + v14) | 0;
      v6 ^= v10;
      v6 = (v6 >>> 7) | (v6 << 25);
      v3 = (v3 + v7 + m6) | 0;
      v15 ^= v3;
      v15 = (v15 >>> 16) | (v15 << 16);
      v11 = (v11 + v15) | 0;
      v7 ^= v11;
      v7 = (v7 >>> 12) | (v7 << 20);
      v3 = (v3 + v7 + m7) | 0;
      v15 ^= v3;
      v15 = (v15 >>> 8) | (v15 << 24);
      v11 = (v11 + v15) | 0;
      v7 ^= v11;
      v7 = (v7 >>> 7) | (v7 << 25);
      // Diagonals: G(0,5,10,15) G(1,6,11,12) G(2,7,8,13) G(3,4,9,14).
      v0 = (v0 + v5 + m8) | 0;
      v15 ^= v0;
      v15 = (v15 >>> 16) | (v15 << 16);
      v10 = (v10 + v15) | 0;
      v5 ^= v10;
      v5 = (v5 >>> 12) | (v5 << 20);
      v0 = (v0 + v5 + m9) | 0;
      v15 ^= v0;
      v15 = (v15 >>> 8) | (v15 << 24);
      v10 = (v10 + v15) | 0;
      v5 ^= v10;
      v5 = (v5 >>> 7) | (v5 << 25);
      v1 = (v1 + v6 + m10) | 0;
      v12 ^= v1;
      v12 = (v12 >>> 16) | (v12 << 16);
      v11 = (v11 + v12) | 0;
      v6 ^= v11;
      v6 = (v6 >>> 12) | (v6 << 20);
      v1 = (v1 + v6 + m11) | 0;
      v12 ^= v1;
      v12 = (v12 >>> 8) | (v12 << 24);
      v11 = (v11 + v12) | 0;
      v6 ^= v11;
      v6 = (v6 >>> 7) | (v6 << 25);
      v2 = (v2 + v7 + m12) | 0;
      v13 ^= v2;
      v13 = (v13 >>> 16) | (v13 << 16);
      v8 = (v8 + v13) | 0;
      v7 ^= v8;
      v7 = (v7 >>> 12) | (v7 << 20);
      v2 = (v2 + v7 + m13) | 0;
      v13 ^= v2;
      v13 = (v13 >>> 8) | (v13 << 24);
      v8 = (v8 + v13) | 0;
      v7 ^= v8;
      v7 = (v7 >>> 7) | (v7 << 25);
      v3 = (v3 + v4 + m14) | 0;
      v14 ^= v3;
      v14 = (v14 >>> 16) | (v14 << 16);
      v9 = (v9 + v14) | 0;
      v4 ^= v9;
      v4 = (v4 >>> 12) | (v4 << 20);
      v3 = (v3 + v4 + m15) | 0;
      v14 ^= v3;
      v14 = (v14 >>> 8) | (v14 << 24);
      v9 = (v9 + v14) | 0;
      v4 ^= v9;
      v4 = (v4 >>> 7) | (v4 << 25);
      if (round === 6) break;
      // Message permutation: m'[i] = m[[2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8][i]].
      const t0 = m0,
        t1 = m1;
      m0 = m2;
      m2 = m3;
      m3 = m10;
      m10 = m12;
      m12 = m9;
      m9 = m11;
      m11 = m5;
      m5 = t0;
      m1 = m6;
      m6 = m4;
      m4 = m7;
      m7 = m13;
      m13 = m14;
      m14 = m15;
      m15 = m8;
      m8 = t1;
    }
    out[outOff] = v0 ^ v8;
    out[outOff + 1] = v1 ^ v9;
    out[outOff + 2] = v2 ^ v10;
    out[outOff + 3] = v3 ^ v11;
    out[outOff + 4] = v4 ^ v12;
    out[outOff + 5] = v5 ^ v13;
    out[outOff + 6] = v6 ^ v14;
    out[outOff + 7] = v7 ^ v15;
  };

  const cv = new Uint32Array(8);
  const block = new Uint32Array(16);
  const blockBytes = new Uint8Array(block.buffer);
  const result = new Uint32Array(8);
  const resultBytes = new Uint8Array(result.buffer);
  // Chaining values waiting for their right sibling, contiguous so that a left and a right
  // CV form a parent's 16-word message in place. 54 levels cover 2^64 bytes.
  const stack = new Uint32Array(8 * 56);
  let aligned = new Uint32Array(1024);
  let alignedBytes = new Uint8Array(aligned.buffer);

  // One chunk (up to 1024 bytes at byte `off` of `bytes`; `words` views the same memory).
  const chunk = (
    words: Uint32Array,
    bytes: Uint8Array,
    off: number,
    len: number,
    counter: number,
    rootFlag: number,
    out: Uint32Array,
    outOff: number,
  ): void => {
    cv.set(IV);
    const blocks = len === 0 ? 1 : (len + 63) >>> 6;
    for (let b = 0; b < blocks; b++) {
      const last = b === blocks - 1;
      const flags = (b === 0 ? CHUNK_START : 0) | (last ? CHUNK_END | rootFlag : 0);
      const at = off + (b << 6);
      const blockLen = last ? len - (b << 6) : 64;
      if (blockLen === 64) {
        compress(cv, 0, words, at >>> 2, counter, 64, flags, last ? out : cv, last ? outOff : 0);
      } else {
        block.fill(0);
        blockBytes.set(bytes.subarray(at, at + blockLen));
        compress(cv, 0, block, 0, counter, blockLen, flags, out, outOff);
      }
    }
  };

  // Hashes data[byteOff, byteOff + len) into out[outOff, outOff + 32). Little-endian hosts only.
  return (data: Uint8Array, byteOff: number, len: number, out: Uint8Array, outOff: number): void => {
    // Word and byte views of the input from the same base (`words` needs 4-byte alignment:
    // an unaligned input is copied to a scratch buffer first).
    let words: Uint32Array;
    let bytes: Uint8Array;
    const base = data.byteOffset + byteOff;
    if ((base & 3) === 0) {
      bytes = new Uint8Array(data.buffer, base, len);
      words = new Uint32Array(data.buffer, base, len >>> 2);
    } else {
      if (alignedBytes.length < len) {
        aligned = new Uint32Array((len + 3) >>> 2);
        alignedBytes = new Uint8Array(aligned.buffer);
      }
      alignedBytes.set(data.subarray(byteOff, byteOff + len));
      bytes = alignedBytes;
      words = aligned;
    }
    const chunks = len === 0 ? 1 : Math.ceil(len / 1024);
    let sp = 0; // CVs on the stack
    for (let c = 0; c < chunks - 1; c++) {
      chunk(words, bytes, c * 1024, 1024, c, 0, stack, sp * 8);
      sp++;
      // Merge completed subtrees: one parent per trailing zero bit of the chunk count.
      for (let total = c + 1; total % 2 === 0; total /= 2) {
        sp--;
        compress(IV, 0, stack, (sp - 1) * 8, 0, 64, PARENT, stack, (sp - 1) * 8);
      }
    }
    const lastOff = (chunks - 1) * 1024;
    if (chunks === 1) {
      chunk(words, bytes, 0, len, 0, ROOT, result, 0);
    } else {
      chunk(words, bytes, lastOff, len - lastOff, chunks - 1, 0, stack, sp * 8);
      sp++;
      while (sp > 1) {
        sp--;
        if (sp === 1) compress(IV, 0, stack, 0, 0, 64, PARENT | ROOT, result, 0);
        else compress(IV, 0, stack, (sp - 1) * 8, 0, 64, PARENT, stack, (sp - 1) * 8);
      }
    }
    out.set(resultBytes, outOff);
  };
}
