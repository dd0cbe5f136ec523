// Gives the clusters no one references back to the file system, as QEMU's discard does: runs
// of free clusters (refcount 0) inside the file are punched out (fallocate PUNCH_HOLE; they
// then read as zeros and take no disk space) and free clusters at the end are cut off
// (truncate). Only after a commit: a cluster whose refcount is 0 on disk is referenced by
// nothing durable, so punching or cutting it, at any instant of a crash, loses nothing (I3).

import type { Image } from './image.ts';

export interface DiscardResult {
  /** Free clusters punched out of the file. */
  punched: number;
  /** Free clusters cut off its end. */
  truncated: number;
  /** False when the file system cannot punch holes (free clusters inside the file were left). */
  holesSupported: boolean;
}

/** Discards the free clusters of `image` (open for writing, just committed: Image.flush). */
export async function discardFreeClusters(image: Image): Promise<DiscardResult> {
  const refcounts = image.refcountState;
  if (!refcounts) return { punched: 0, truncated: 0, holesSupported: false };
  const cs = image.clusterSize;
  const clusters = Math.ceil((await image.file.size()) / cs);
  let lastUsed = -1;
  let runStart = -1; // first cluster of the current run of free clusters
  let punched = 0;
  let holesSupported = true;
  const punch = async (from: number, to: number) => {
    if (!holesSupported || to <= from) return;
    if (image.file.punchHole && (await image.file.punchHole(from * cs, (to - from) * cs))) punched += to - from;
    else holesSupported = false;
  };
  // One refcount block at a time (bounded memory, I5).
  const perBlock = refcounts.blockEntries;
  for (let first = 0; first < clusters; first += perBlock) {
    await refcounts.fetch([first]);
    const end = Math.min(clusters, first + perBlock);
    for (let c = first; c < end; c++) {
      if (refcounts.count(c) === 0) {
        if (runStart < 0) runStart = c;
        continue;
      }
      if (runStart >= 0) await punch(runStart, c);
      runStart = -1;
      lastUsed = c;
    }
  }
  const truncated = clusters - (lastUsed + 1);
  if (truncated > 0) await image.file.truncate((lastUsed + 1) * cs);
  return { punched, truncated, holesSupported };
}
