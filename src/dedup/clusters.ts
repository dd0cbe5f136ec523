// Read-only views of an image's host clusters for the dedup layer's reports (dedup-stats,
// check, the trust verdict): sets of cluster indexes bounded by the file, the clusters the
// holder snapshot holds, and the stored refcounts. Never writes.

import { hex } from '../errors.ts';
import { decodeL1Entry, decodeL2Entry } from '../format/l1l2.ts';
import type { Image } from '../image/image.ts';
import { Refcounts } from '../image/refcounts.ts';
import { HOLDER_NAME, type Holder } from './holder.ts';

/**
 * A set of host cluster indexes: a bitmap over the file's clusters (one bit each), plus an
 * overflow set for indexes past it (only hostile entries point there).
 */
export class ClusterSet {
  private readonly bits: Uint8Array;
  private readonly overflow = new Set<number>();
  size = 0;

  constructor(readonly limit: number) {
    this.bits = new Uint8Array(Math.ceil(limit / 8));
  }

  /** Adds `cluster`; returns true when it was not there yet. */
  add(cluster: number): boolean {
    if (cluster < this.limit) {
      const mask = 1 << (cluster & 7);
      if (this.bits[cluster >>> 3] & mask) return false;
      this.bits[cluster >>> 3] |= mask;
    } else {
      if (this.overflow.has(cluster)) return false;
      this.overflow.add(cluster);
    }
    this.size++;
    return true;
  }

  has(cluster: number): boolean {
    if (cluster < this.limit) return (this.bits[cluster >>> 3] & (1 << (cluster & 7))) !== 0;
    return this.overflow.has(cluster);
  }

  /** Every member, in increasing order. */
  *[Symbol.iterator](): Generator<number> {
    for (let byte = 0; byte < this.bits.length; byte++) {
      const b = this.bits[byte];
      if (!b) continue;
      for (let bit = 0; bit < 8; bit++) if (b & (1 << bit)) yield byte * 8 + bit;
    }
    yield* [...this.overflow].sort((a, b) => a - b);
  }
}

/** A ClusterSet sized for the clusters of `image`'s file. */
export async function clusterSetFor(image: Image): Promise<ClusterSet> {
  return new ClusterSet(Math.ceil((await image.file.size()) / image.clusterSize) + 1);
}

/** The first and last host cluster of [offset, +bytes) (an empty range covers its first cluster). */
export function clusterSpan(offset: number, bytes: number, clusterSize: number): [number, number] {
  return [Math.floor(offset / clusterSize), Math.floor((offset + Math.max(bytes, 1) - 1) / clusterSize)];
}

/**
 * The host clusters the holder holds, read table by table (its L2 tables map cluster P to
 * host cluster P). An entry that is not that identity is passed to `onBad` (which may
 * throw) and not counted.
 */
export async function heldClusters(image: Image, holder: Holder, onBad: (message: string, entryOffset: number) => void): Promise<ClusterSet> {
  const held = await clusterSetFor(image);
  const cs = image.clusterSize;
  const perTable = cs / 8;
  for (let i = 0; i < holder.l1Size; i++) {
    const l2Offset = decodeL1Entry(holder.l1, i).l2Offset;
    if (!l2Offset) continue;
    if (l2Offset % cs) {
      onBad(`dedup holder snapshot: L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${hex(i)})`, holder.l1Offset + i * 8);
      continue;
    }
    const table = await image.file.read(l2Offset, cs);
    for (let j = 0; j < perTable; j++) {
      const e = decodeL2Entry(table, j, image.clusterBits);
      if (e.kind === 'unallocated') continue;
      const cluster = i * perTable + j;
      if (e.kind === 'normal' && e.hostOffset === cluster * cs) held.add(cluster);
      else
        onBad(
          `dedup holder snapshot: entry for cluster ${hex(cluster * cs)} maps ${e.kind === 'compressed' ? 'a compressed cluster' : hex(e.hostOffset)}, not ` +
            `itself; delete the snapshot with 'qemu-img snapshot -d ${HOLDER_NAME}'`,
          l2Offset + j * 8,
        );
    }
  }
  return held;
}

/** The image's stored refcounts, read-only (Refcounts.get only reads). Throws CorruptImageError for a bad refcount table. */
export async function storedRefcounts(image: Image): Promise<Refcounts> {
  const h = image.header;
  const layout = { clusterBits: image.clusterBits, refcountOrder: h.refcountOrder, tableOffset: h.refcountTableOffset, tableClusters: h.refcountTableClusters };
  return Refcounts.load(image.file, layout, () => undefined);
}
