// The cluster hasher of the dedup write path: the fastest correct implementation of each
// algorithm (names and on-disk numbers: ./hash-algorithms.ts, re-exported here) on Node 20,
// measured with `npm run bench:hash` (scripts/bench-hash.ts) on the project machine: 2 vCPU
// Zen 1 with SHA-NI, Node 20.20.2, OpenSSL 3.0.19, 256 MiB of random 4 KiB clusters, one
// call per cluster, median of 3 quiet runs, MB/s = 10^6 B/s.
// The VM is noisy: the same row varies by ±15 % from one run to the next.
//
//   sha256    OpenSSL through koffi (./native-sha256.ts): clusters of a batch eight at a time
//             through its multi-buffer sha256_multi_block 1573 MB/s; one at a time
//             (SHA256_Init/_Update/_Final) 934 (2026-12-06)
//             where it loads, else node:crypto crypto.hash('sha256', b, 'buffer'): 723 the
//             same day, 1006 on a faster one (createHash 856, @noble/hashes sha256 104)
//   sha3-256  node:crypto crypto.hash('sha3-256', b, 'buffer')   331 MB/s
//             (createHash 328, @noble/hashes sha3_256 23)
//   blake3    our own scalar BLAKE3 (src/dedup/blake3.ts)           368 MB/s
//             (@noble/hashes blake3 32: it allocates an object per compression and walks a
//             generic schedule table. Node's crypto has no BLAKE3 and no other package of
//             the design card has one.) Checked against the official BLAKE3 test vectors
//             and against @noble/hashes in test/dedup/hasher.test.ts; noble is kept as the
//             test reference and as the implementation on big-endian hosts.
//   skein     number 2 is reserved (the seed named it) and refused with UnsupportedError.
//
// The write pipeline hashes on a worker thread (ChunkHasher, ./chunk-hasher.ts) with these
// same functions, on chunks in shared memory: the main thread meanwhile decides and writes
// the chunk before. `npm run bench:hash` has its row.

import { createRequire } from 'node:module';
import { blake3 as nobleBlake3 } from '@noble/hashes/blake3.js';
import { InternalError } from '../errors.ts';
import { HASH_BYTES } from '../format/hash-entry.ts';
import { makeBlake3, type Blake3Into } from './blake3.ts';
import { nativeSha256 } from './native-sha256.ts';
import { HASH_ALGORITHMS, supportedHashAlgorithm, type HashAlgorithm, type SupportedHashAlgorithm } from './hash-algorithms.ts';

export {
  DEFAULT_HASH_ALGORITHM,
  HASH_ALGORITHMS,
  SUPPORTED_HASH_ALGORITHMS,
  hashAlgorithmId,
  hashAlgorithmName,
  parseHashAlgorithm,
  supportedHashAlgorithm,
  type HashAlgorithm,
  type SupportedHashAlgorithm,
} from './hash-algorithms.ts';

export const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

let cryptoModule: typeof import('node:crypto') | undefined;
/** node:crypto, loaded on first use: loading it costs ~9 ms of start-up that `create` and the sha256 of OpenSSL's own functions do not need. */
const nodeCrypto = () => (cryptoModule ??= createRequire(import.meta.url)('node:crypto') as typeof import('node:crypto'));

function nobleBlake3Into(data: Uint8Array, byteOff: number, len: number, out: Uint8Array, outOff: number): void {
  out.set(nobleBlake3(data.subarray(byteOff, byteOff + len)), outOff);
}

// ---------------------------------------------------------------------------------------
// Synchronous hasher (main thread).

export interface Hasher {
  readonly algorithm: SupportedHashAlgorithm;
  /** On-disk number. */
  readonly id: number;
  /** The 32-byte hash of one cluster. */
  hash(data: Uint8Array): Buffer;
}

export type ClustersInto = (data: Uint8Array, byteOff: number, clusterSize: number, count: number, out: Uint8Array, outOff: number) => void;

function nodeClustersInto(algorithm: string): ClustersInto {
  return (data, byteOff, clusterSize, count, out, outOff) => {
    for (let i = 0, at = byteOff; i < count; i++, at += clusterSize) {
      out.set(nodeCrypto().hash(algorithm, data.subarray(at, at + clusterSize), 'buffer'), outOff + i * HASH_BYTES);
    }
  };
}

/** Clusters one after another through a function hashing one range into place (BLAKE3). */
function fixedClustersInto(into: Blake3Into): ClustersInto {
  return (data, byteOff, clusterSize, count, out, outOff) => {
    for (let i = 0, at = byteOff; i < count; i++, at += clusterSize) into(data, at, clusterSize, out, outOff + i * HASH_BYTES);
  };
}

export function clustersInto(algorithm: SupportedHashAlgorithm): ClustersInto {
  switch (algorithm) {
    case 'sha256':
      return nativeSha256() ?? nodeClustersInto('sha256');
    case 'sha3-256':
      return nodeClustersInto('sha3-256');
    case 'blake3':
      return fixedClustersInto(LITTLE_ENDIAN ? makeBlake3() : nobleBlake3Into);
  }
}

/** A synchronous hasher for an algorithm given by name or on-disk number. Refuses skein (UnsupportedError). */
export function createHasher(algorithm: HashAlgorithm | number): Hasher {
  const name = supportedHashAlgorithm(algorithm);
  // One cluster through clustersInto, as a batch is: the same implementation (OpenSSL's own
  // SHA-256 where it loads) for both.
  const into = clustersInto(name);
  return {
    algorithm: name,
    id: HASH_ALGORITHMS[name],
    hash: (data) => {
      const out = Buffer.allocUnsafe(HASH_BYTES);
      into(data, 0, data.length, 1, out, 0);
      return out;
    },
  };
}
