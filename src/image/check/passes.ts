// One pass of the check (QEMU's qcow2_co_check_locked and qcow2_check_refcounts): the
// order of the other files' passes. Every reference the metadata makes is counted in the
// in-memory refcount table (calculate_refcounts: header, L1/L2 walk, snapshot table,
// refcount table, bitmaps, refcount blocks, the extension's areas), compared with the
// stored refcounts, repaired or rebuilt as the repair mode allows, then COPIED is checked
// against the (now fixed) stored refcounts.

import { IoError } from '../../errors.ts';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../../format/header.ts';
import { checkBitmaps } from './bitmaps.ts';
import { checkOflagCopied } from './copied.ts';
import { countExtension, inspectExtension } from './extension.ts';
import { checkL1Group } from './l1-l2.ts';
import { RefcountArray } from './refcount-array.ts';
import { checkRefblocks, compareRefcounts } from './refcount-blocks.ts';
import { rebuildRefcountStructure } from './rebuild.ts';
import type { CheckRun } from './run.ts';
import { readSnapshots, snapshotL1Groups } from './snapshots.ts';
import { CheckAborted, FIX_ERRORS, FIX_LEAKS, addCounts, zeroCounts, type CheckCounts } from './types.ts';

/** QEMU's limit on the clusters of a checked file (INT_MAX): it bounds the IMRT. */
const MAX_CHECK_CLUSTERS = 0x7fff_ffff;
/** Byte offset of the header's incompatible_features field. */
const INCOMPATIBLE_FIELD_OFFSET = 72;

/**
 * One check of the image. Returns the counts, and the reason when the check could not be
 * completed. Repairs what `fix` allows (FIX_LEAKS, FIX_ERRORS).
 */
export async function runPass(run: CheckRun, fix: number): Promise<{ res: CheckCounts; failure?: string }> {
  run.fix = fix;
  run.res = zeroCounts();
  run.rebuild = false;
  const snapshotRes = zeroCounts();
  try {
    run.fileSize = await run.target.file.size();
    await inspectExtension(run, fix);
    await readSnapshots(run, snapshotRes);
    await checkRefcounts(run, fix);
    addCounts(run.res, snapshotRes);
    if (fix && run.res.checkErrors === 0 && run.res.corruptions === 0) await markCleanAndConsistent(run);
    return { res: run.res };
  } catch (err) {
    addCounts(run.res, snapshotRes);
    if (err instanceof CheckAborted) return { res: run.res, failure: err.reason };
    if (err instanceof IoError) {
      run.emit(`ERROR: ${err.message}`);
      run.res.checkErrors++;
      return { res: run.res, failure: 'Input/output error' };
    }
    throw err;
  } finally {
    run.fix = 0;
  }
}

/** qcow2_mark_clean + qcow2_mark_consistent: clears the dirty and corrupt bits once all is on disk. */
async function markCleanAndConsistent(run: CheckRun): Promise<void> {
  const h = run.header;
  const bits = h.incompatibleFeatures & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
  if (!bits) return;
  await run.sync(); // I3: every repair durable before the header says the image is clean
  h.incompatibleFeatures &= ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
  const field = Buffer.alloc(8);
  field.writeBigUInt64BE(h.incompatibleFeatures);
  await run.write(INCOMPATIBLE_FIELD_OFFSET, field);
  await run.sync();
}

/** qcow2_check_refcounts: count, compare, repair or rebuild, then COPIED. */
async function checkRefcounts(run: CheckRun, fix: number): Promise<void> {
  const h = run.header;
  const nbClusters = Math.ceil(run.fileSize / run.clusterSize);
  if (nbClusters > MAX_CHECK_CLUSTERS) {
    run.res.checkErrors++;
    throw new CheckAborted('File too large');
  }
  run.res.totalClusters = Math.ceil((Math.floor(h.size / 512) * 512) / run.clusterSize);
  run.imrt = new RefcountArray(h.refcountOrder, nbClusters);
  run.stored = run.storedRefcounts(h.refcountTableOffset, await run.readClipped(h.refcountTableOffset, h.refcountTableClusters * run.clusterSize));
  run.overlapIndex = null;

  await calculateRefcounts(run, fix);

  // With a repair that needs no rebuild, the comparison is redone with fixing on, from these counts.
  const preCompare = { ...run.res };
  await compareRefcounts(run, 0);

  if (run.rebuild && fix & FIX_ERRORS) {
    const old = { ...run.res };
    run.emit('Rebuilding refcount structure');
    await rebuildRefcountStructure(run);
    run.res.corruptions = 0;
    run.res.leaks = 0;
    // The old structure was exchanged for a new one: count the references again.
    run.rebuild = false;
    run.imrt.clear();
    run.res.allocatedClusters = 0;
    run.res.fragmentedClusters = 0;
    run.res.compressedClusters = 0;
    await calculateRefcounts(run, 0);
    let freshLeaks = 0;
    if (fix & FIX_LEAKS) {
      // The old refcount structure is now leaked; those leaks come from the rebuild, not from the image.
      const saved = { ...run.res };
      run.res = zeroCounts();
      await compareRefcounts(run, FIX_LEAKS);
      if (run.rebuild) run.emit('ERROR rebuilt refcount structure is still broken');
      freshLeaks = run.res.leaks;
      run.res = saved;
    }
    if (run.res.corruptions < old.corruptions) run.res.corruptionsFixed += old.corruptions - run.res.corruptions;
    if (run.res.leaks < old.leaks) run.res.leaksFixed += old.leaks - run.res.leaks;
    run.res.leaks += freshLeaks;
  } else if (fix) {
    if (run.rebuild) {
      run.emit('ERROR need to rebuild refcount structures');
      run.res.checkErrors++;
      throw new CheckAborted('Input/output error');
    }
    if (run.res.leaks || run.res.corruptions) {
      run.res = preCompare;
      await compareRefcounts(run, fix);
    }
  }
  await run.stored.flush();
  await run.sync(); // I3: refcounts fixed on disk before COPIED flags are set from them

  await checkOflagCopied(run, fix);
  await run.sync();
  run.res.imageEndOffset = (run.highestCluster + 1) * run.clusterSize;
}

/** calculate_refcounts: fills the IMRT from every structure the header reaches. */
async function calculateRefcounts(run: CheckRun, fix: number): Promise<void> {
  const h = run.header;
  run.addReferences(0, run.clusterSize); // header
  await checkL1Group(run, [{ offset: h.l1TableOffset, size: h.l1Size, times: 1 }], true, fix);
  await checkL1Group(run, snapshotL1Groups(run), false, fix);
  run.addReferences(h.snapshotsOffset, run.snapshotsSize);
  run.addReferences(h.refcountTableOffset, run.stored.entries * 8);
  await checkBitmaps(run);
  await checkRefblocks(run, fix);
  await countExtension(run, fix);
}
