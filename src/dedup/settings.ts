// The settings of a dedup image's store (docs/COMMANDS.md, `qdedup create -o dedup=…`) and
// the defaults `qdedup create` picks: hash algorithm, verify mode, log store order, journal
// block size, incarnation limit, cluster and refcount widths.

import { MAX_STORE_ORDER } from '../format/dedup-ext.ts';
import { DEFAULT_HASH_ALGORITHM, type SupportedHashAlgorithm } from './hasher.ts';

export interface DedupSettings {
  algorithm: SupportedHashAlgorithm;
  verify: boolean;
  /** New unique clusters written compressed by default (`compression=on`). */
  compress?: boolean;
  /** 0 = unlimited. */
  maxIncarnations: number;
  order: number;
  journalBlockSize: number;
}

/** Smallest and largest store order the default rule picks (the option may go from 0 to 24). */
const MIN_DEFAULT_ORDER = 4;
const MAX_DEFAULT_ORDER = 20;

/**
 * The seed's rule: a log store holds about 1/128 of the disk's clusters, so about 128
 * incarnations cover the whole disk. Returns the order (log2 of buckets of 4 slots).
 */
export function defaultStoreOrder(virtualSize: number, clusterSize: number): number {
  const slots = virtualSize / clusterSize / 128;
  const order = Math.ceil(Math.log2(Math.max(1, slots / 4)));
  return Math.min(MAX_DEFAULT_ORDER, maxStoreOrder(virtualSize, clusterSize), Math.max(MIN_DEFAULT_ORDER, order));
}

/**
 * The largest store order worth having for a disk of `virtualSize` bytes: a log store of at
 * most twice as many slots (4 × 2^order) as the disk has clusters. A larger one never fills
 * (every guest cluster indexed twice over), so it is never frozen, while its journals and
 * RAM grow with it: order 20 made a 64 MiB disk an 881 MB file. At least MIN_DEFAULT_ORDER
 * (64 slots, 3 KiB of RAM), whatever the disk; at most MAX_STORE_ORDER.
 */
export function maxStoreOrder(virtualSize: number, clusterSize: number): number {
  const clusters = Math.ceil(virtualSize / clusterSize);
  const order = clusters >= 4 ? Math.floor(Math.log2(clusters / 2)) : 0;
  return Math.min(MAX_STORE_ORDER, Math.max(MIN_DEFAULT_ORDER, order));
}

/** Dedup images default to 4 KiB clusters: more duplicates found than at 64 KiB. */
export const DEDUP_CLUSTER_BITS = 12;
/** Smallest refcount width dedup works with: 4 bits (room to count shared clusters). */
export const MIN_DEDUP_REFCOUNT_ORDER = 2;
export const DEFAULT_JOURNAL_BLOCK = 4096;

/** What `qdedup create` picks when no dedup option is given. */
export function defaultDedupSettings(virtualSize: number, clusterSize: number): DedupSettings {
  return {
    algorithm: DEFAULT_HASH_ALGORITHM,
    verify: false,
    compress: false,
    maxIncarnations: 0,
    order: defaultStoreOrder(virtualSize, clusterSize),
    journalBlockSize: DEFAULT_JOURNAL_BLOCK,
  };
}
