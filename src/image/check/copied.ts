// The COPIED check (check_oflag_copied): in the active L1 and L2 tables, bit 63 must be set
// exactly when the stored refcount of the cluster it points at is 1. `-r all` always
// repairs; `-r leaks` only when nothing else is wrong any more.

import { errnoText } from '../block-file.ts';
import { QCOW_OFLAG_COPIED_HI, decodeL1Entry, decodeL2Entry } from '../../format/l1l2.ts';
import { metadataOverlap } from './overlap.ts';
import type { CheckRun } from './run.ts';
import { CheckAborted, FIX_ERRORS, FIX_LEAKS, entryHex } from './types.ts';

export async function checkOflagCopied(run: CheckRun, fix: number): Promise<void> {
  const res = run.res;
  const repair = fix & FIX_ERRORS ? true : fix & FIX_LEAKS ? !res.checkErrors && !res.corruptions && !res.leaks : false;
  const l1 = run.target.l1;
  const l1Size = run.header.l1Size;
  // Several L1 entries pointing at one L2 table: check it once, count it for each.
  const visits = new Map<number, number>();
  for (let i = 0; i < l1Size; i++) {
    const { l2Offset } = decodeL1Entry(l1, i);
    if (l2Offset) visits.set(l2Offset, (visits.get(l2Offset) ?? 0) + 1);
  }
  const done = new Set<number>();
  for (let i = 0; i < l1Size; i++) {
    const { l2Offset, copied } = decodeL1Entry(l1, i);
    if (!l2Offset) continue;
    const refcount = await run.stored.get(Math.floor(l2Offset / run.clusterSize));
    if (refcount === undefined) continue; // already reported by the comparison
    if ((refcount === 1) !== copied) {
      res.corruptions++;
      run.emit(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${entryHex(l1, i)} refcount=${refcount}`);
      if (repair) {
        await writeL1Entry(run, i, refcount === 1);
        res.corruptions--;
        res.corruptionsFixed++;
      }
    }
    if (done.has(l2Offset)) continue;
    done.add(l2Offset);
    const times = visits.get(l2Offset) ?? 1;
    if (l2Offset >= run.fileSize) continue; // reads as zeros: no entries
    const table = await run.readClipped(l2Offset, run.clusterSize);
    let dirty = 0;
    for (let j = 0; j < run.l2Entries; j++) {
      const e = decodeL2Entry(table, j, run.clusterBits);
      if (e.kind === 'compressed' || !e.hostOffset) continue; // compressed, unallocated or plain zero cluster
      const dataRefcount = await run.stored.get(Math.floor(e.hostOffset / run.clusterSize));
      if (dataRefcount === undefined) continue;
      if ((dataRefcount === 1) !== e.copied) {
        res.corruptions += repair ? 1 : times;
        run.emit(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${entryHex(table, j)} refcount=${dataRefcount}`, repair ? 1 : times);
        if (repair) {
          setCopied(table, j, dataRefcount === 1);
          dirty++;
        }
      }
    }
    if (dirty > 0) {
      const overlap = metadataOverlap(run, l2Offset, run.clusterSize, 'active L2 table');
      if (overlap) {
        run.emit('ERROR: Could not write L2 table; metadata overlap check failed: Input/output error');
        res.checkErrors++;
        throw new CheckAborted('Input/output error');
      }
      try {
        await run.write(l2Offset, table);
      } catch (err) {
        run.emit(`ERROR: Could not write L2 table: ${errnoText(err) ?? 'Input/output error'}`);
        res.checkErrors++;
        throw new CheckAborted(errnoText(err) ?? 'Input/output error');
      }
      res.corruptions -= dirty;
      res.corruptionsFixed += dirty;
    }
  }
}

/** Sets or clears bit 63 of entry `index` of an L1 or L2 table, leaving its other bits as they are. */
function setCopied(table: Buffer, index: number, copied: boolean): void {
  const hi = table.readUInt32BE(index * 8);
  table.writeUInt32BE(copied ? (hi | QCOW_OFLAG_COPIED_HI) >>> 0 : (hi & ~QCOW_OFLAG_COPIED_HI) >>> 0, index * 8);
}

/** qcow2_write_l1_entry: sets COPIED of one active L1 entry as `copied` says, on disk and in memory. */
async function writeL1Entry(run: CheckRun, l1Index: number, copied: boolean): Promise<void> {
  const entryOffset = run.header.l1TableOffset + l1Index * 8;
  if (metadataOverlap(run, entryOffset, 8, 'active L1 table')) {
    run.res.checkErrors++;
    throw new CheckAborted('Input/output error');
  }
  const entry = Buffer.from(run.target.l1.subarray(l1Index * 8, l1Index * 8 + 8));
  setCopied(entry, 0, copied);
  try {
    await run.write(entryOffset, entry);
  } catch (err) {
    run.res.checkErrors++;
    throw new CheckAborted(errnoText(err) ?? 'Input/output error');
  }
  entry.copy(run.target.l1, l1Index * 8);
}
