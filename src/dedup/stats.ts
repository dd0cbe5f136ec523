// What deduplication saves on an image and the state of its store: the figures of
// `qdedup dedup-stats` (docs/COMMANDS.md "dedup-stats" documents the keys). Read-only: the image is
// opened read-only, the store judged and replayed in memory (./judge-store.ts).

import { CorruptImageError } from '../errors.ts';
import { BUCKET_SLOTS } from '../format/incarnation.ts';
import { compressedClusterSpan } from '../format/l1l2.ts';
import { Image } from '../image/image.ts';
import type { LockRequest } from '../image/image-lock.ts';
import { clusterSetFor, heldClusters, storedRefcounts, type ClusterSet } from './clusters.ts';
import { judgeStore } from './judge-store.ts';

/** The JSON document of `dedup-stats --output json`, keys in output order. */
export interface DedupStats {
  'virtual-size': number;
  'cluster-size': number;
  /** sha256, sha3-256, blake3 (skein if the image names it), or "off" for a plain image. */
  'hash-algorithm': string;
  trusted: boolean;
  /** Why the store is not trusted (dedup images only). */
  reason?: string;
  dirty: boolean;
  'guest-clusters': number;
  'data-clusters': number;
  'shared-clusters': number;
  'dedup-ratio': number;
  'bytes-saved': number;
  /** Compressed clusters: guest entries naming one, distinct copies, and their bytes before and after compression. */
  compressed: { clusters: number; copies: number; 'bytes-before': number; 'bytes-after': number };
  'metadata-clusters': number;
  'holder-clusters': number;
  'index-entries': number;
  'index-ram-bytes': number;
  'log-store': { entries: number; capacity: number };
  incarnations: { count: number; max: number };
  limbo: number;
  journal: { 'blocks-used': number; 'blocks-total': number };
}

export interface GuestUsage {
  /** Active L2 entries that map to data (normal or compressed). */
  guestClusters: number;
  /** Distinct host clusters those entries use (every cluster a compressed stream touches). */
  dataClusters: ClusterSet;
  /** Of guestClusters, the compressed ones. */
  compressedClusters: number;
  /** Distinct compressed streams: their offset → the bytes their descriptor spans (to the end of its last 512-byte sector). */
  copies: Map<number, number>;
}

/**
 * Walks the active L1/L2 tables once through the engine's reader (Image.l2Reader),
 * which throws CorruptImageError for an entry a guest read would refuse.
 */
export async function guestUsage(image: Image): Promise<GuestUsage> {
  const data = await clusterSetFor(image);
  let guestClusters = 0;
  let compressedClusters = 0;
  const copies = new Map<number, number>();
  for (let i = 0; i < image.header.l1Size; i++) {
    const entryOf = await image.l2Reader(i);
    if (!entryOf.allocated) continue;
    for (let g = i * image.l2Entries; g < (i + 1) * image.l2Entries; g++) {
      const e = entryOf(g);
      if (e.kind === 'normal') {
        guestClusters++;
        data.add(e.hostOffset / image.clusterSize);
      } else if (e.kind === 'compressed') {
        guestClusters++;
        compressedClusters++;
        copies.set(e.compressedOffset, e.compressedLength);
        const [first, last] = compressedClusterSpan(e, image.clusterBits);
        for (let c = first; c <= last; c++) data.add(c);
      }
    }
  }
  return { guestClusters, dataClusters: data, compressedClusters, copies };
}

/**
 * Data clusters of `usage` with references other than the holder's beyond one (shared by
 * dedup links or by snapshots). One stored-refcount lookup per data cluster.
 */
export async function sharedClusters(image: Image, usage: GuestUsage, held: ClusterSet | null): Promise<number> {
  const refcounts = await storedRefcounts(image);
  let shared = 0;
  for (const c of usage.dataClusters) {
    if ((await refcounts.get(c)) - (held?.has(c) ? 1 : 0) > 1) shared++;
  }
  return shared;
}

/**
 * Computes the figures of `path` without writing to it, holding `lock` (QEMU's image locks).
 * Throws the open and read errors, and CorruptImageError for a broken holder snapshot.
 */
export async function dedupStats(path: string, lock?: LockRequest): Promise<DedupStats> {
  const image = await Image.open(path, { backing: false, lock });
  try {
    const v = await judgeStore(image);
    const held = v.holder
      ? await heldClusters(image, v.holder, (message, offset) => {
          throw new CorruptImageError(message, { path, offset, structure: 'dedup holder' });
        })
      : null;
    const usage = await guestUsage(image);
    const shared = await sharedClusters(image, usage, held);
    const guest = usage.guestClusters;
    const data = usage.dataClusters.size;
    const ext = v.ext;
    const s = v.store?.stats();
    return {
      'virtual-size': image.size,
      'cluster-size': image.clusterSize,
      'hash-algorithm': v.algorithm,
      trusted: v.trusted,
      ...(ext && !v.trusted ? { reason: v.reason! } : {}),
      dirty: ext?.dirty ?? false,
      'guest-clusters': guest,
      'data-clusters': data,
      'shared-clusters': shared,
      'dedup-ratio': data === 0 ? 1 : Math.round((guest / data) * 10000) / 10000,
      'bytes-saved': (guest - data) * image.clusterSize,
      compressed: {
        clusters: usage.compressedClusters,
        copies: usage.copies.size,
        'bytes-before': usage.copies.size * image.clusterSize,
        'bytes-after': [...usage.copies.values()].reduce((a, b) => a + b, 0),
      },
      'metadata-clusters': v.metadataClusters,
      'holder-clusters': v.holder?.tableClusters ?? 0,
      'index-entries': s?.indexEntries ?? 0,
      'index-ram-bytes': s?.ramBytes ?? 0,
      // Capacity and maximum are settings (the extension's), shown even for an untrusted store.
      'log-store': { entries: s?.logStore.entries ?? 0, capacity: ext ? 2 ** ext.order * BUCKET_SLOTS : 0 },
      incarnations: { count: s?.incarnations.count ?? 0, max: ext?.maxIncarnations ?? 0 },
      limbo: s?.limbo ?? 0,
      journal: { 'blocks-used': s?.journal.blocksUsed ?? 0, 'blocks-total': s?.journal.blocksTotal ?? 0 },
    };
  } finally {
    await image.close();
  }
}
