// The cluster hasher of the dedup write path: algorithm numbers (a byte of the dedup header
// extension, src/format/dedup-ext.ts), name parsing, and the fastest correct implementation
// of each algorithm on Node 20, measured with `npm run bench:hash` (scripts/bench-hash.ts)
// on the project machine: 2 vCPU Zen 1 with SHA-NI, Node 20.20.2, OpenSSL 3.0.19, 256 MiB
// of random 4 KiB clusters, one call per cluster, median of 3 quiet runs, MB/s = 10^6 B/s.
// The VM is noisy: the same row varies by ±15 % from one run to the next.
//
//   sha256    node:crypto crypto.hash('sha256', b, 'buffer')    1006 MB/s
//             (createHash 856, @noble/hashes sha256 104)
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

import crypto from 'node:crypto';
import { endianness } from 'node:os';
import { blake3 as nobleBlake3 } from '@noble/hashes/blake3.js';
import { InternalError, UnsupportedError, UsageError } from '../errors.ts';
import { HASH_BYTES } from '../format/hash-entry.ts';
import { makeBlake3, type Blake3Into } from './blake3.ts';

/** On-disk algorithm numbers (dedup header extension, byte 1). */
export const HASH_ALGORITHMS = { sha256: 0, 'sha3-256': 1, skein: 2, blake3: 3 } as const;
export type HashAlgorithm = keyof typeof HASH_ALGORITHMS;
/** The algorithms qdedup implements (skein keeps its number but is refused). */
export type SupportedHashAlgorithm = Exclude<HashAlgorithm, 'skein'>;
export const SUPPORTED_HASH_ALGORITHMS: readonly SupportedHashAlgorithm[] = ['sha256', 'sha3-256', 'blake3'];
export const DEFAULT_HASH_ALGORITHM: SupportedHashAlgorithm = 'sha256';

/** "sha256, sha3-256 or blake3", for messages. */
const CHOICES = SUPPORTED_HASH_ALGORITHMS.join(', ').replace(/, ([^,]*)$/, ' or $1');
const NAMES_BY_ID = new Map<number, HashAlgorithm>(Object.entries(HASH_ALGORITHMS).map(([name, id]) => [id, name as HashAlgorithm]));

function skeinRefused(): UnsupportedError {
  return new UnsupportedError(`hash algorithm skein (${HASH_ALGORITHMS.skein}) is not supported; use ${CHOICES}`);
}

/** The on-disk number of an algorithm. */
export function hashAlgorithmId(name: HashAlgorithm): number {
  return HASH_ALGORITHMS[name];
}

/** The name of an on-disk algorithm number (skein included); UnsupportedError for a number no version of qdedup knows. */
export function hashAlgorithmName(id: number): HashAlgorithm {
  const name = NAMES_BY_ID.get(id);
  if (name === undefined)
    throw new UnsupportedError(`unknown dedup hash algorithm number ${id} (known: ` + `${[...NAMES_BY_ID].map(([i, n]) => `${i} ${n}`).join(', ')})`);
  return name;
}

/**
 * Parses a user-given algorithm name (e.g. `-o dedup=NAME`), case-insensitively.
 * UnsupportedError for skein, UsageError for anything else unknown (`off` included: the
 * caller handles it).
 */
export function parseHashAlgorithm(name: string): SupportedHashAlgorithm {
  const n = name.trim().toLowerCase();
  if (n === 'skein') throw skeinRefused();
  if ((SUPPORTED_HASH_ALGORITHMS as readonly string[]).includes(n)) return n as SupportedHashAlgorithm;
  throw new UsageError(`unknown hash algorithm '${name}': use ${CHOICES}`);
}

function supported(algorithm: HashAlgorithm | number): SupportedHashAlgorithm {
  const name = typeof algorithm === 'number' ? hashAlgorithmName(algorithm) : algorithm;
  if (name === 'skein') throw skeinRefused();
  if (!Object.hasOwn(HASH_ALGORITHMS, name)) throw new UsageError(`unknown hash algorithm '${String(name)}': use ${CHOICES}`);
  return name;
}

export function checkBatch(data: Uint8Array, clusterSize: number): number {
  if (!Number.isInteger(clusterSize) || clusterSize <= 0) throw new InternalError(`hashClusters: cluster size ${clusterSize} is not a positive integer`);
  if (data.length % clusterSize !== 0) throw new InternalError(`hashClusters: ${data.length} bytes is not a whole number of ${clusterSize}-byte clusters`);
  return data.length / clusterSize;
}

export const LITTLE_ENDIAN = endianness() === 'LE';

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
  /** n×32 bytes: the hashes of the n consecutive clusters of `data` (a whole number of clusters). */
  hashClusters(data: Uint8Array, clusterSize: number): Buffer;
}

export type ClustersInto = (data: Uint8Array, byteOff: number, clusterSize: number, count: number, out: Uint8Array, outOff: number) => void;

function nodeClustersInto(algorithm: string): ClustersInto {
  return (data, byteOff, clusterSize, count, out, outOff) => {
    for (let i = 0, at = byteOff; i < count; i++, at += clusterSize) {
      out.set(crypto.hash(algorithm, data.subarray(at, at + clusterSize), 'buffer'), outOff + i * HASH_BYTES);
    }
  };
}

function blake3ClustersInto(into: Blake3Into): ClustersInto {
  return (data, byteOff, clusterSize, count, out, outOff) => {
    for (let i = 0, at = byteOff; i < count; i++, at += clusterSize) into(data, at, clusterSize, out, outOff + i * HASH_BYTES);
  };
}

export function clustersInto(algorithm: SupportedHashAlgorithm): ClustersInto {
  switch (algorithm) {
    case 'sha256':
      return nodeClustersInto('sha256');
    case 'sha3-256':
      return nodeClustersInto('sha3-256');
    case 'blake3':
      return blake3ClustersInto(LITTLE_ENDIAN ? makeBlake3() : nobleBlake3Into);
  }
}

/** A synchronous hasher for an algorithm given by name or on-disk number. Refuses skein (UnsupportedError). */
export function createHasher(algorithm: HashAlgorithm | number): Hasher {
  const name = supported(algorithm);
  const into = clustersInto(name);
  const nodeName = name === 'blake3' ? undefined : name;
  return {
    algorithm: name,
    id: HASH_ALGORITHMS[name],
    hash: nodeName
      ? (data) => crypto.hash(nodeName, data, 'buffer')
      : (data) => {
          const out = Buffer.allocUnsafe(HASH_BYTES);
          into(data, 0, data.length, 1, out, 0);
          return out;
        },
    hashClusters(data, clusterSize) {
      const n = checkBatch(data, clusterSize);
      const out = Buffer.allocUnsafe(n * HASH_BYTES);
      into(data, 0, clusterSize, n, out, 0);
      return out;
    },
  };
}
