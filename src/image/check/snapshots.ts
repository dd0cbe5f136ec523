// Snapshots in the check: reading the snapshot table (qcow2_check_read_snapshot_table,
// through the engine's table walk, ../snapshot-table.ts, with qemu-img check's wording and
// its extra check of incomplete v3 entries), and grouping the snapshots' L1 tables for
// ./l1-l2.ts (snapshots sharing one L1 table are walked once, counted with their number).

import { IoError, QdedupError } from '../../errors.ts';
import { MAX_L1_BYTES } from '../../format/header.ts';
import { SNAPSHOT_V3_EXTRA_BYTES, SnapshotExtraDataError } from '../../format/snapshot.ts';
import { SnapshotTableTooBigError, snapshotTableEntries } from '../snapshot-table.ts';
import type { L1Group } from './l1-l2.ts';
import type { CheckRun } from './run.ts';
import { CheckAborted, sharpHex, type CheckCounts } from './types.ts';

/**
 * Reads the snapshot table into run.snapshots and run.snapshotsSize. A table that cannot be
 * read is a check error that ends the pass; a v3 entry without the mandatory extra data is
 * a corruption (counted in `res`).
 */
export async function readSnapshots(run: CheckRun, res: CheckCounts): Promise<void> {
  const h = run.header;
  run.overlapIndex = null;
  run.snapshots = [];
  run.snapshotsSize = 0;
  if (h.nbSnapshots === 0) return;
  const fail = (why: string, reason: string): never => {
    res.checkErrors++;
    run.emit(`ERROR failed to read the snapshot table: ${why}`);
    run.snapshots = [];
    run.snapshotsSize = 0;
    throw new CheckAborted(reason);
  };
  const incomplete: number[] = [];
  try {
    for await (const { entry, tableBytes } of snapshotTableEntries((o, n) => run.readClipped(o, n), h.snapshotsOffset, h.nbSnapshots)) {
      if (h.version === 3 && entry.extraDataBytes < SNAPSHOT_V3_EXTRA_BYTES) incomplete.push(run.snapshots.length);
      run.snapshots.push(entry);
      run.snapshotsSize = tableBytes;
    }
  } catch (err) {
    if (err instanceof SnapshotExtraDataError) fail(`Too much extra metadata in snapshot table entry ${run.snapshots.length}`, 'File too large');
    if (err instanceof SnapshotTableTooBigError) fail('Snapshot table is too big', 'File too large');
    if (err instanceof QdedupError && !(err instanceof IoError)) fail(err.message, 'Invalid argument');
    throw err;
  }
  run.overlapIndex = null;
  // A v3 entry must carry at least the 64-bit VM state size and the disk size (16 bytes).
  for (const i of incomplete) {
    res.corruptions++;
    run.emit(`ERROR snapshot table entry ${i} is incomplete`);
  }
}

/**
 * The snapshots' L1 tables as groups to walk: one per distinct (offset, size), counted with
 * the number of snapshots naming it. An unaligned or oversized L1 table is a corruption of
 * its snapshot table entry and is not walked.
 */
export function snapshotL1Groups(run: CheckRun): L1Group[] {
  const groups: L1Group[] = [];
  for (const sn of run.snapshots) {
    if (sn.l1TableOffset % run.clusterSize !== 0) {
      run.emit(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=${sharpHex(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
      run.res.corruptions++;
      continue;
    }
    if (sn.l1Size > MAX_L1_BYTES / 8) {
      run.emit(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=${sharpHex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
      run.res.corruptions++;
      continue;
    }
    const same = groups.find((g) => g.offset === sn.l1TableOffset && g.size === sn.l1Size);
    if (same) same.times++;
    else groups.push({ offset: sn.l1TableOffset, size: sn.l1Size, times: 1 });
  }
  return groups;
}
