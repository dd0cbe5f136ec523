// Hash algorithm names and on-disk numbers (a byte of the dedup header extension,
// src/format/dedup-ext.ts): what `info`, `create -o dedup=NAME` and the trust verdict
// (./judge-store.ts) need, without the implementations. ./hasher.ts hashes (it loads
// node:crypto and the BLAKE3 code, which a command that only names an algorithm need not
// load at start-up: docs/PERFORMANCE.md) and re-exports all of this.

import { UnsupportedError, UsageError } from '../errors.ts';

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

/**
 * The supported algorithm a name or on-disk number stands for: UnsupportedError for skein or
 * an unknown number, UsageError for an unknown name (what createHasher() throws).
 */
export function supportedHashAlgorithm(algorithm: HashAlgorithm | number): SupportedHashAlgorithm {
  const name = typeof algorithm === 'number' ? hashAlgorithmName(algorithm) : algorithm;
  if (name === 'skein') throw skeinRefused();
  if (!Object.hasOwn(HASH_ALGORITHMS, name)) throw new UsageError(`unknown hash algorithm '${String(name)}': use ${CHOICES}`);
  return name;
}
