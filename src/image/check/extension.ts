// The extension hook in a pass: the structures a layer above the engine keeps in the image
// (CheckExtension, ./types.ts; the dedup store plugs in from src/dedup/inspect.ts). Their
// problems are corruptions; while trusted, their areas count as referenced; `-r all` drops
// them by clearing their autoclear bits, durably, before anything else is written or freed.

import type { CheckRun } from './run.ts';
import { FIX_ERRORS, MAX_REPAIR_GROWTH_CLUSTERS } from './types.ts';

/** Asks the extension for its report on the image as it is now and decides which autoclear bits a repair keeps. */
export async function inspectExtension(run: CheckRun, fix: number): Promise<void> {
  run.extReport = null;
  run.extOverlaps = 0;
  run.extCounted = false;
  run.extOwned = null;
  run.keepAutoclear = 0n;
  if (!run.extension) return;
  run.extReport = await run.extension.inspect();
  const r = run.extReport;
  // Trusted structures keep their bit through a repair, unless -r all is about to drop them.
  if (r?.trusted && !(r.problemCount && fix & FIX_ERRORS)) run.keepAutoclear = run.extension.autoclear;
}

/**
 * At the end of calculate_refcounts: reports the extension's problems (and areas that
 * overlap other structures or each other), drops the structures under `-r all` when there
 * are any, else counts their areas as referenced. A second call in the same pass (after a
 * refcount rebuild) counts again without reporting again.
 */
export async function countExtension(run: CheckRun, fix: number): Promise<void> {
  const r = run.extReport;
  const extension = run.extension;
  if (!r || !extension) return;
  const cs = run.clusterSize;
  const res = run.res;
  if (!run.extCounted) {
    run.extCounted = true;
    for (const line of r.unfixable) run.emit(line);
    res.corruptions += r.unfixable.length;
    for (const line of r.problems) run.emit(line);
    res.corruptions += r.problemCount;
    if (r.trusted && !run.extDropped) {
      // One bit per cluster the areas own; an area stops at its first cluster that another
      // structure (or an earlier area) already uses, so the work is bounded by the file.
      const limit = run.imrt.size + MAX_REPAIR_GROWTH_CLUSTERS;
      const owned = new Uint8Array(Math.ceil(limit / 8));
      const has = (c: number) => (owned[c >>> 3] & (1 << (c & 7))) !== 0;
      for (const a of r.areas) {
        const first = Math.floor(a.offset / cs);
        const last = Math.floor((a.offset + Math.max(a.bytes, 1) - 1) / cs);
        for (let c = first; c <= last; c++) {
          const why =
            c >= limit
              ? 'extends too far past the end of the file'
              : has(c) || run.imrt.get(c) > 0
                ? `shares cluster 0x${(c * cs).toString(16)} with another structure`
                : null;
          if (why) {
            run.emit(`ERROR ${a.what} at 0x${a.offset.toString(16)}: ${why}`);
            run.extOverlaps++;
            break;
          }
          owned[c >>> 3] |= 1 << (c & 7);
        }
      }
      run.extOwned = owned;
      res.corruptions += run.extOverlaps;
      const fixable = r.problemCount + run.extOverlaps;
      if (fixable && fix & FIX_ERRORS) {
        await dropExtension(run, extension.autoclear);
        const leaks = r.areas.length ? '; their clusters are now leaks' : '';
        run.emit(`Repairing ${extension.key}: structures dropped (autoclear bits 0x${extension.autoclear.toString(16)} cleared)${leaks}`);
        res.corruptions -= fixable;
        res.corruptionsFixed += fixable;
      }
    }
  } else {
    // Counted again after a rebuild: the same problems, not reported twice.
    res.corruptions += r.unfixable.length + (run.extDropped ? 0 : r.problemCount + run.extOverlaps);
  }
  if (!r.trusted || run.extDropped || !run.extOwned) return;
  // Not addReferences(): an area may end past the end of the file (allocated, not yet written).
  const owned = run.extOwned;
  for (let byte = 0; byte < owned.length; byte++) {
    if (!owned[byte]) continue;
    for (let bit = 0; bit < 8; bit++) {
      if (!(owned[byte] & (1 << bit))) continue;
      const c = byte * 8 + bit;
      if (c >= run.imrt.size) run.imrt.grow(c + 1);
      run.imrt.set(c, run.imrt.get(c) + 1);
    }
  }
}

/**
 * `-r all` on structures with problems: clears their autoclear bits, durably, before
 * anything else is written or freed (I3: once the bit is clear nobody trusts them, so
 * their areas may then be freed as the leaks they have become).
 */
async function dropExtension(run: CheckRun, bits: bigint): Promise<void> {
  run.requireRepair();
  run.keepAutoclear &= ~bits;
  run.extDropped = true;
  if (!(run.header.autoclearFeatures & bits)) return;
  await run.writeAutoclear(run.header.autoclearFeatures & ~bits);
}
