// The metadata overlap check of a repair's writes (qcow2_check_metadata_overlap with QEMU's
// default "cached" set of structures): a repair never writes over a structure it does not
// mean to change.

import { AUTOCLEAR_BITMAPS, EXT_BITMAPS } from '../../format/header.ts';
import { BITMAPS_EXT_BYTES, decodeBitmapsExtension } from '../../format/bitmaps.ts';
import { l2Offsets } from '../../format/l1l2.ts';
import type { CheckRun } from './run.ts';

/**
 * The name of the first structure that [hostOffset, +byteLength) touches, other than
 * `ignore`, or null. The active L2 tables and the refcount blocks are looked up in sorted
 * arrays of their offsets (run.overlapIndex, 8 bytes an entry), built at first use and
 * dropped when the structures move: a walk of the L1 and refcount tables per call made
 * repairs of many entries quadratic (fuzz seeds 12539 and 519418143).
 */
export function metadataOverlap(run: CheckRun, hostOffset: number, byteLength: number, ignore?: string): string | null {
  if (byteLength === 0) return null;
  const cs = run.clusterSize;
  if (hostOffset < cs) return 'qcow2_header';
  const start = Math.floor(hostOffset / cs) * cs;
  const end = Math.ceil((hostOffset + byteLength) / cs) * cs;
  const hits = (offset: number, length: number) => length > 0 && start < offset + length && offset < end;
  /** Whether a cluster-sized structure at one of the sorted `offsets` hits [start, end). */
  const hitsAny = (offsets: Float64Array) => {
    let lo = 0;
    let hi = offsets.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (offsets[mid] + cs <= start) lo = mid + 1;
      else hi = mid;
    }
    return lo < offsets.length && offsets[lo] < end;
  };
  const h = run.header;
  const index = (run.overlapIndex ??= indexMetadata(run));
  if (ignore !== 'active L1 table' && h.l1Size && hits(h.l1TableOffset, h.l1Size * 8)) return 'active L1 table';
  if (hits(run.stored.tableOffset, run.stored.entries * 8)) return 'refcount table';
  if (run.snapshotsSize && hits(h.snapshotsOffset, run.snapshotsSize)) return 'snapshot table';
  for (const sn of run.snapshots) if (sn.l1Size && hits(sn.l1TableOffset, sn.l1Size * 8)) return 'inactive L1 table';
  if (ignore !== 'active L2 table' && hitsAny(index.l2Tables)) return 'active L2 table';
  if (hitsAny(index.refcountBlocks)) return 'refcount block';
  const ext = h.autoclearFeatures & AUTOCLEAR_BITMAPS ? h.extensions.find((e) => e.type === EXT_BITMAPS) : undefined;
  if (ext && ext.data.length === BITMAPS_EXT_BYTES) {
    const bitmaps = decodeBitmapsExtension(ext.data);
    if (hits(Number(bitmaps.directoryOffset), Number(bitmaps.directorySize))) return 'bitmap directory';
  }
  return null;
}

/** The offsets of the active L2 tables and of the refcount blocks, sorted. */
function indexMetadata(run: CheckRun): { l2Tables: Float64Array; refcountBlocks: Float64Array } {
  const l1 = run.target.l1;
  const l2 = l2Offsets(l1, run.header.l1Size);
  const blocks: number[] = [];
  for (let i = 0; i < run.stored.entries; i++) {
    const { offset } = run.stored.blockOffset(i);
    if (offset) blocks.push(offset);
  }
  return { l2Tables: Float64Array.from(l2).sort(), refcountBlocks: Float64Array.from(blocks).sort() };
}
