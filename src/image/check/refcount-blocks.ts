// The stored refcounts in the check: each refcount table entry and block (check_refblocks),
// then the stored refcount of every cluster against the references counted in memory
// (compare_refcounts), fixing leaks and corruptions where the repair mode allows.

import { errnoText } from '../block-file.ts';
import { U64_HI_UNSAFE } from '../../format/bytes.ts';
import { getRefcount } from '../../format/refcount.ts';
import type { CheckRun } from './run.ts';
import { FIX_ERRORS, FIX_LEAKS, MAX_REPAIR_GROWTH_CLUSTERS } from './types.ts';

/**
 * check_refblocks: alignment and reserved bits of each refcount table entry, and each
 * block's own reference (it must be exactly 1). A block past the end of the file is a
 * corruption; `-r all` grows the file to take it in, as QEMU does (within
 * MAX_REPAIR_GROWTH_CLUSTERS; beyond that the refcount structure is rebuilt instead).
 */
export async function checkRefblocks(run: CheckRun, fix: number): Promise<void> {
  const stored = run.stored;
  const fixing = (fix & FIX_ERRORS) !== 0;
  for (let i = 0; i < stored.entries; i++) {
    const { offset, hi, lo, reservedBits } = stored.blockOffset(i);
    if (reservedBits) {
      run.emit(`ERROR refcount table entry ${i} has reserved bits set`);
      run.res.corruptions++;
      run.rebuild = true;
      continue;
    }
    if (lo % run.clusterSize !== 0) {
      run.emit(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      run.res.corruptions++;
      run.rebuild = true;
      continue;
    }
    const cluster = Math.floor(offset / run.clusterSize);
    if (hi >= U64_HI_UNSAFE || cluster >= run.imrt.size) {
      run.res.corruptions++;
      run.emit(`${fixing ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
      if (fixing) await growFileForRefblock(run, offset, hi);
      continue;
    }
    if (offset === 0) continue;
    run.addReferences(offset, run.clusterSize);
    if (run.imrt.get(cluster) !== 1) {
      run.emit(`ERROR refcount block ${i} refcount=${run.imrt.get(cluster)}`);
      run.res.corruptions++;
      run.rebuild = true;
    }
  }
}

/** The `-r all` repair of a refcount block past the end of the file: the file grows to hold it (zeros). */
async function growFileForRefblock(run: CheckRun, blockOffset: number, hi: number): Promise<void> {
  const cluster = Math.floor(blockOffset / run.clusterSize);
  if (hi >= U64_HI_UNSAFE || cluster >= run.imrt.size + MAX_REPAIR_GROWTH_CLUSTERS) {
    run.rebuild = true;
    run.emit('ERROR could not resize image: File too large');
    return;
  }
  try {
    await run.clearAutoclearBits();
    await run.target.file.truncate(blockOffset + run.clusterSize);
  } catch (err) {
    run.rebuild = true;
    run.emit(`ERROR could not resize image: ${errnoText(err) ?? 'Input/output error'}`);
    return;
  }
  run.fileSize = await run.target.file.size();
  run.imrt.grow(Math.ceil(run.fileSize / run.clusterSize));
  run.res.corruptions--;
  run.res.corruptionsFixed++;
  run.addReferences(blockOffset, run.clusterSize); // a fresh zeroed cluster: its count is exactly 1
}

/**
 * compare_refcounts: stored refcount against counted references, cluster by cluster.
 * A stored 0 where there are references needs a rebuild; other mismatches are fixed
 * here when `fix` allows (leaks down, corruptions up).
 */
export async function compareRefcounts(run: CheckRun, fix: number): Promise<void> {
  const order = run.header.refcountOrder;
  const per = run.blockEntries;
  run.highestCluster = 0;
  for (let start = 0; start < run.imrt.size; start += per) {
    const t = start / per;
    const block = await run.stored.block(t);
    const end = Math.min(start + per, run.imrt.size);
    for (let i = start; i < end; i++) {
      if (block === undefined) {
        run.emit(`Can't get refcount for cluster ${i}: Input/output error`);
        run.res.checkErrors++;
        continue;
      }
      const refcount = block ? getRefcount(block, i - start, order) : 0;
      const references = run.imrt.get(i);
      if (refcount > 0 || references > 0) run.highestCluster = i;
      if (refcount === references) continue;
      let fixed: 'leaksFixed' | 'corruptionsFixed' | null = null;
      if (refcount === 0) run.rebuild = true;
      else if (refcount > references && fix & FIX_LEAKS) fixed = 'leaksFixed';
      else if (refcount < references && fix & FIX_ERRORS) fixed = 'corruptionsFixed';
      run.emit(`${fixed ? 'Repairing' : refcount < references ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${refcount} reference=${references}`);
      if (fixed && (await run.stored.set(i, references))) {
        run.res[fixed]++;
        continue;
      }
      if (refcount < references) run.res.corruptions++;
      else run.res.leaks++;
    }
  }
}
