// The L1/L2 walk (check_refcounts_l1, check_refcounts_l2): counts the L1 tables, the L2
// tables and every cluster they reference in the in-memory refcount table, and checks
// their entries (reserved bits, alignment, COPIED on compressed entries) as decoded by the
// engine's decoders (../../format/l1l2.ts). An L2 table that several L1 entries share is
// read once and counted with its multiplicity, so a hostile L1 cannot multiply the work.

import { errnoText } from '../block-file.ts';
import { QCOW_OFLAG_ZERO, decodeL1Entry, decodeL2Entry } from '../../format/l1l2.ts';
import { metadataOverlap } from './overlap.ts';
import type { CheckRun } from './run.ts';
import { CheckAborted, FIX_ERRORS, entryHex, hex64 } from './types.ts';

/** L1 tables walked together: `times` L1 tables (snapshots) at `offset` with `size` entries. */
export interface L1Group {
  offset: number;
  size: number;
  times: number;
}

/** The L1 table of a group as a buffer (the active one from memory; others read, clipped to the file). */
async function l1Table(run: CheckRun, group: L1Group, active: boolean): Promise<Buffer> {
  if (active) return run.target.l1;
  return run.readClipped(group.offset, group.size * 8);
}

/**
 * check_refcounts_l1 for a group of L1 tables (the active one, or all snapshot ones). Each
 * in-file L2 table is read once and counted with the number of L1 entries of the group
 * that point at it, which is what QEMU's one-by-one walk adds up to.
 */
export async function checkL1Group(run: CheckRun, tables: L1Group[], active: boolean, fix: number): Promise<void> {
  const visits = new Map<number, number>();
  for (const t of tables) {
    if (!t.size) continue;
    const l1 = await l1Table(run, t, active);
    for (let i = 0; i < t.size; i++) {
      const e = decodeL1Entry(l1, i);
      if (!e.l2Offset && !e.copied && !e.reservedBits) continue; // an empty entry
      if (e.l2Offset < run.fileSize) visits.set(e.l2Offset, (visits.get(e.l2Offset) ?? 0) + t.times);
    }
  }
  const done = new Set<number>();
  for (const t of tables) {
    if (!t.size) continue;
    run.addReferences(t.offset, t.size * 8, t.times); // the L1 table itself
    const l1 = await l1Table(run, t, active);
    for (let i = 0; i < t.size; i++) {
      const e = decodeL1Entry(l1, i);
      if (!e.l2Offset && !e.copied && !e.reservedBits) continue;
      if (e.reservedBits) {
        run.emit(`ERROR found L1 entry with reserved bits set: ${entryHex(l1, i)}`, t.times);
        run.res.corruptions += t.times;
      }
      const l2Offset = e.l2Offset;
      run.addReferences(l2Offset, run.clusterSize, t.times); // the L2 table
      if (l2Offset % run.clusterSize !== 0) {
        run.emit(`ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`, t.times);
        run.res.corruptions += t.times;
      }
      if (l2Offset >= run.fileSize || done.has(l2Offset)) continue; // past EOF it reads as zeros: nothing more to count
      done.add(l2Offset);
      await checkL2(run, l2Offset, visits.get(l2Offset) ?? t.times, active, fix);
    }
  }
}

/**
 * check_refcounts_l2: counts the clusters an L2 table references, `times` over, and checks
 * its entries (reserved bits, alignment, COPIED on compressed entries). For the active
 * table it also gathers the allocation, fragmentation and compression figures.
 */
async function checkL2(run: CheckRun, l2Offset: number, times: number, active: boolean, fix: number): Promise<void> {
  const table = await run.readClipped(l2Offset, run.clusterSize);
  const cs = run.clusterSize;
  const res = run.res;
  let nextContiguousOffset = 0;
  for (let i = 0; i < run.l2Entries; i++) {
    const e = decodeL2Entry(table, i, run.clusterBits);
    if (e.kind === 'compressed') {
      // The message shows the offset's bits (the low 70 - cluster_bits of the entry) exactly,
      // as QEMU does; e.compressedOffset is rounded above 2^53.
      const coffsetHex = hex64(table.readUInt32BE(i * 8) & (2 ** (38 - run.clusterBits) - 1), table.readUInt32BE(i * 8 + 4));
      if (e.copied) {
        run.emit(`ERROR: coffset=0x${coffsetHex}: copied flag must never be set for compressed clusters`, times);
        res.corruptions += times;
      }
      run.addReferences(e.compressedOffset, e.compressedLength, times, coffsetHex);
      if (active) {
        res.allocatedClusters += times;
        res.compressedClusters += times;
        res.fragmentedClusters += times; // compressed clusters are fragmented by nature
      }
      continue;
    }
    if (e.reservedBits) {
      run.emit(`ERROR found l2 entry with reserved bits set: ${entryHex(table, i)}`, times);
      res.corruptions += times;
    }
    const hostOffset = e.hostOffset;
    if (!hostOffset) continue; // unallocated, or a zero cluster without a host cluster
    if (hostOffset % cs !== 0) {
      res.corruptions += times;
      if (e.kind === 'zero') {
        const fixing = (fix & FIX_ERRORS) !== 0;
        const what = `offset=${hostOffset.toString(16)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`;
        run.emit(`${fixing ? 'Repairing' : 'ERROR'} ${what}`, fixing ? 1 : times);
        if (fixing && (await fixL2EntryByZero(run, l2Offset, i, active))) {
          res.corruptions -= times;
          res.corruptionsFixed++;
          continue; // the entry no longer references anything
        }
      } else {
        run.emit(`ERROR offset=${hostOffset.toString(16)}: Data cluster is not properly aligned; L2 entry corrupted.`, times);
      }
    }
    if (active) {
      res.allocatedClusters += times;
      if (nextContiguousOffset && hostOffset !== nextContiguousOffset) res.fragmentedClusters += times;
      nextContiguousOffset = hostOffset + cs;
    }
    run.addReferences(hostOffset, cs, times);
  }
}

/** fix_l2_entry_by_zero: turns a preallocated zero cluster with a bad offset into a plain zero cluster. */
async function fixL2EntryByZero(run: CheckRun, l2Offset: number, l2Index: number, active: boolean): Promise<boolean> {
  const entryOffset = l2Offset + l2Index * 8;
  const overlap = metadataOverlap(run, entryOffset, 8, active ? 'active L2 table' : 'inactive L2 table');
  if (overlap) {
    run.emit('ERROR: Overlap check failed');
    run.res.checkErrors++;
    throw new CheckAborted('Input/output error');
  }
  const entry = Buffer.alloc(8);
  entry.writeUInt32BE(QCOW_OFLAG_ZERO, 4);
  try {
    await run.write(entryOffset, entry);
    await run.sync();
  } catch (err) {
    run.emit(`ERROR: Failed to overwrite L2 table entry: ${errnoText(err) ?? 'Input/output error'}`);
    run.res.checkErrors++;
    return false;
  }
  return true;
}
