// `qdedup convert` into a QCOW2 target: the image is created with the options given (or an
// existing one is used, if large enough), opened for writing with zero detection, filled with
// the sources' guest bytes (src/image/convert.ts: inline dedup when the target has it), then
// committed and synced; abandoned (its metadata not committed) when the copy fails.

import { UsageError } from '../errors.ts';
import { copyToImage, totalSize, type CopyOptions } from '../image/convert.ts';
import type { GuestReader } from '../image/guest-reader.ts';
import { LOCK_WRITE } from '../image/image-lock.ts';
import { createImage, openForWrite, type CreateOptions } from './open.ts';

export interface ConvertImageOptions extends CopyOptions {
  /** Create the target with these options first; absent: write into the existing image. */
  create?: CreateOptions;
  /** Whole clusters stored compressed (OpenOptions.compress; into a dedup image, its unique clusters). */
  compress?: boolean;
}

/** Copies `sources` into the QCOW2 image `target`; returns the bytes copied (fewer when `signal` stopped it). */
export async function convertIntoImage(target: string, sources: GuestReader[], o: ConvertImageOptions = {}): Promise<number> {
  const total = totalSize(sources);
  if (o.create) await createImage(target, o.create);
  const image = await openForWrite(target, { lock: LOCK_WRITE, detectZeroes: true, compress: o.compress });
  try {
    if (image.size < total) throw new UsageError(`the target's virtual size (${image.size}) is smaller than the sources' (${total})`);
    const copied = await copyToImage(image, sources, o);
    await image.close(); // commits and syncs (I3)
    return copied;
  } catch (err) {
    await image.abandon();
    throw err;
  }
}
