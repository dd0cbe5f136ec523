// The refcount rebuild (rebuild_refcount_structure): a new refcount table and blocks, made
// from the references counted in memory alone, in clusters nothing references. Order (I3):
// blocks and table written and synced, then the header switched (synced); until then the
// old structure stays in force, untouched, and no new block is placed on its clusters.

import { errnoText } from '../block-file.ts';
import { MAX_REFTABLE_BYTES } from '../../format/header.ts';
import { setRefcount } from '../../format/refcount.ts';
import { U64_HI_UNSAFE, writeU64 } from '../../format/bytes.ts';
import { metadataOverlap } from './overlap.ts';
import type { CheckRun } from './run.ts';
import { CheckAborted } from './types.ts';

/** Byte offset of the header's refcount_table_offset (u64) and refcount_table_clusters (u32). */
const REFTABLE_POINTER_OFFSET = 48;

/**
 * Allocates `count` contiguous clusters in the IMRT (alloc_clusters_imrt), at or after
 * `from.cluster`, never on a cluster of the refcount structure still in use; the IMRT grows
 * past the end of the file when no free run is found. Returns the host offset.
 */
function allocImrt(run: CheckRun, count: number, from: { cluster: number }): number {
  let cluster = from.cluster;
  let contiguous = 0;
  let firstGap = true;
  for (; cluster < run.imrt.size && contiguous < count; cluster++) {
    if (run.imrt.get(cluster) === 0 && !run.oldStructure.has(cluster)) {
      contiguous++;
      if (firstGap) {
        from.cluster = cluster;
        firstGap = false;
      }
    } else {
      contiguous = 0;
    }
  }
  // Not enough room before the end: the free run at the end is extended past it.
  if (contiguous < count) run.imrt.grow(cluster + count - contiguous);
  const start = cluster - contiguous;
  for (let i = 0; i < count; i++) run.imrt.set(start + i, 1);
  return start * run.clusterSize;
}

/**
 * rebuild_refcounts_write_refblocks: writes a refcount block, taken from the IMRT, for
 * every block range of [firstCluster, endCluster) that holds a used cluster, allocating
 * blocks (and entries of `reftable`) as needed. Returns true when the table had to grow.
 */
async function writeRefblocks(run: CheckRun, firstCluster: number, endCluster: number, reftable: number[]): Promise<boolean> {
  const per = run.blockEntries;
  const from = { cluster: 0 };
  let grown = false;
  for (let cluster = firstCluster; cluster < endCluster; cluster++) {
    if (run.imrt.get(cluster) === 0) continue;
    const index = Math.floor(cluster / per);
    const blockStart = index * per;
    let blockOffset = index < reftable.length ? reftable[index] : 0;
    if (!blockOffset) {
      if (from.cluster < blockStart) from.cluster = blockStart; // never inside a block already written
      blockOffset = allocImrt(run, 1, from);
      const blockCluster = blockOffset / run.clusterSize;
      if (blockCluster >= endCluster) endCluster = blockCluster + 1; // the block holding its own count must be written too
      if (reftable.length <= index) {
        const entries = Math.ceil(((index + 1) * 8) / run.clusterSize) * (run.clusterSize / 8);
        if (entries * 8 > MAX_REFTABLE_BYTES) {
          run.emit('qdedup: ERROR allocating reftable: the refcount table would exceed 8 MiB');
          run.res.checkErrors++;
          throw new CheckAborted('File too large');
        }
        while (reftable.length < entries) reftable.push(0);
        grown = true;
      }
      reftable[index] = blockOffset;
    }
    const block = Buffer.alloc(run.clusterSize);
    const order = run.header.refcountOrder;
    const last = Math.min(blockStart + per, run.imrt.size);
    for (let c = blockStart; c < last; c++) {
      const value = run.imrt.get(c);
      if (value) setRefcount(block, c - blockStart, order, value);
    }
    if (metadataOverlap(run, blockOffset, run.clusterSize)) {
      run.emit('qdedup: ERROR writing refblock: Input/output error');
      run.res.checkErrors++;
      throw new CheckAborted('Input/output error');
    }
    await writeOrAbort(run, blockOffset, block, 'ERROR writing refblock');
    cluster = blockStart + per - 1; // this block is done
  }
  return grown;
}

/** A write of the rebuild: a failure is a check error that ends the pass. */
async function writeOrAbort(run: CheckRun, hostOffset: number, data: Buffer, what: string): Promise<void> {
  try {
    await run.write(hostOffset, data);
  } catch (err) {
    run.emit(`qdedup: ${what}: ${errnoText(err) ?? 'Input/output error'}`);
    run.res.checkErrors++;
    throw new CheckAborted(errnoText(err) ?? 'Input/output error');
  }
}

/** Writes the new refcount structure, switches the header to it, and makes it the run's stored refcounts. */
export async function rebuildRefcountStructure(run: CheckRun): Promise<void> {
  const h = run.header;
  // The old structure's clusters are off limits until the header no longer points at them.
  run.oldStructure = new Set<number>();
  const cs = run.clusterSize;
  for (let c = 0; c < h.refcountTableClusters; c++) run.oldStructure.add(Math.floor(h.refcountTableOffset / cs) + c);
  for (let i = 0; i < run.stored.entries; i++) {
    const { offset, hi } = run.stored.blockOffset(i);
    if (offset && hi < U64_HI_UNSAFE) run.oldStructure.add(Math.floor(offset / cs));
  }
  const reftable: number[] = [];
  let grown = await writeRefblocks(run, 0, run.imrt.size, reftable);
  let reftableOffset = 0;
  let reftableClusters = 0;
  do {
    reftableClusters = Math.ceil((reftable.length * 8) / cs);
    reftableOffset = allocImrt(run, reftableClusters, { cluster: 0 });
    const first = reftableOffset / cs;
    grown = await writeRefblocks(run, first, first + reftableClusters, reftable);
  } while (grown);

  const tableBuf = Buffer.alloc(reftableClusters * cs);
  reftable.forEach((o, i) => writeU64(tableBuf, i * 8, o));
  await writeOrAbort(run, reftableOffset, tableBuf, 'ERROR writing reftable');
  await run.sync(); // I3: the new blocks and table are durable before the header points at them

  const pointer = Buffer.alloc(12);
  writeU64(pointer, 0, reftableOffset);
  pointer.writeUInt32BE(reftableClusters, 8);
  await writeOrAbort(run, REFTABLE_POINTER_OFFSET, pointer, 'ERROR setting reftable');
  await run.sync();
  h.refcountTableOffset = reftableOffset;
  h.refcountTableClusters = reftableClusters;
  run.stored = run.storedRefcounts(reftableOffset, tableBuf);
  run.overlapIndex = null;
  run.oldStructure = new Set<number>();
}
