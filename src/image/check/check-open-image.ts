// Consistency check and repair of an open QCOW2 image (checkOpenImage), and the refcount
// rebuild that a dirty image needs before its first write (rebuildRefcounts, run by
// ../image.ts). Modelled on QEMU's qcow2_co_check_locked and qcow2_check_refcounts
// (block/qcow2-refcount.c) and qemu-img's img_check; the messages use QEMU 7.2's wording
// so scripts and people can read both tools' output alike. Spec: docs/interop/qcow2.rst
// "Host cluster management".
//
// The check is split into passes, one file each (./passes.ts runs them in order): the
// refcount table in memory (refcount-array.ts), the L1/L2 walk (l1-l2.ts), snapshots
// (snapshots.ts), bitmaps (bitmaps.ts), the extension hook (extension.ts), the stored
// refcount blocks (stored-refcounts.ts, refcount-blocks.ts), COPIED (copied.ts), the
// rebuild (rebuild.ts) and the overlap guard of repairs (overlap.ts); run.ts holds what
// they share. None of them imports ../image.ts (which imports this file); the check of an
// image by path, with a layer's extension, is ../check-image.ts.
//
// Writes happen only when a repair mode is given. Their order keeps I3 (a crash leaves at
// worst leaks): fixed refcounts are synced before COPIED flags rely on them; a rebuilt
// refcount structure is written to clusters nobody references, synced, and only then does
// the header point at it; the dirty and corrupt bits are cleared last.
//
// Memory is bounded by the file size (the IMRT has one entry per host cluster of the file),
// never by a field read from disk.
//
// Differences from QEMU 7.2, on purpose: a refcount block whose table entry is unaligned or
// has reserved bits set is repaired by the rebuild (QEMU fails its overlap check there); the
// rebuild never places new blocks on clusters the old refcount structure still uses; a
// snapshot table with incomplete entries is reported but not rewritten; a refcount block far
// past the end of the file (beyond MAX_REPAIR_GROWTH_CLUSTERS) is handled by a rebuild rather
// than by growing the file to reach it; freed clusters are left as they are (QEMU punches holes).

import { CorruptImageError, InternalError } from '../../errors.ts';
import { INCOMPAT_DIRTY } from '../../format/header.ts';
import { runPass } from './passes.ts';
import { CheckRun } from './run.ts';
import { FIX_ERRORS, FIX_LEAKS, type CheckExtension, type CheckOptions, type CheckTarget, type ImageCheck } from './types.ts';

/**
 * Checks an open image like `qemu-img check` (img_check): one pass, repairing when
 * `options.repair` is set (the image must then be open on a writable file), and when that
 * pass fixed something, a second, read-only pass whose counts are reported, with the fixed
 * counts of the first. Never writes without `repair`. Throws only on internal errors;
 * a check that cannot complete is reported in `failure`.
 */
export async function checkOpenImage(target: CheckTarget, options: CheckOptions = {}, extension: CheckExtension | null = null): Promise<ImageCheck> {
  const fix = options.repair === 'all' ? FIX_LEAKS | FIX_ERRORS : options.repair === 'leaks' ? FIX_LEAKS : 0;
  if (fix && !target.writable) throw new InternalError('a repair needs the image file open for writing');
  const run = new CheckRun(target, options.onMessage, extension);
  const first = await runPass(run, fix);
  let final = first;
  let repaired: ImageCheck['repaired'];
  if (first.failure === undefined && (first.res.corruptionsFixed || first.res.leaksFixed)) {
    repaired = { leaksFixed: first.res.leaksFixed, corruptionsFixed: first.res.corruptionsFixed };
    final = await runPass(run, 0); // "Double checking the fixed image now..."
    final.res.leaksFixed = repaired.leaksFixed;
    final.res.corruptionsFixed = repaired.corruptionsFixed;
  }
  const result: ImageCheck = { ...final.res, filename: target.path, format: 'qcow2', repaired, failure: final.failure, messages: run.messages };
  if (extension && run.extReport) result.extension = { key: extension.key, summary: run.extReport.summary, dropped: run.extDropped };
  return result;
}

/**
 * Repairs a dirty image (incompatible bit 0) before its first write, as QEMU does on a
 * read-write open: a full check with `-r all` (rebuilding the refcount structure when
 * refcounts are missing), after which the dirty bit is cleared. The image's header and L1
 * in memory are updated with what changed. Messages go to `onMessage` (default: stderr).
 * Throws CorruptImageError when the image cannot be repaired (it stays dirty and unwritten
 * apart from the repairs).
 */
export async function rebuildRefcounts(
  image: Omit<CheckTarget, 'writable'>,
  onMessage: (line: string) => void = (line) => process.stderr.write(line + '\n'),
): Promise<void> {
  const result = await checkOpenImage({ path: image.path, file: image.file, header: image.header, l1: image.l1, writable: true }, { repair: 'all', onMessage });
  const where = { path: image.path, structure: 'refcount table', offset: image.header.refcountTableOffset };
  if (result.failure !== undefined || result.checkErrors) {
    throw new CorruptImageError(`could not repair dirty image: ${result.failure ?? 'check errors'}`, where);
  }
  if (image.header.incompatibleFeatures & INCOMPAT_DIRTY) {
    throw new CorruptImageError(`could not repair dirty image: ${result.corruptions} corruptions remain; see 'qdedup check'`, where);
  }
}
