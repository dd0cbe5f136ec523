// The check's public entry: checking an image by path (checkImage) — it opens the image
// (read-only, or on a writable handle to repair) and runs the passes of ./check/ with the
// extension a layer above the engine supplies — and the check's public API, re-exported.
// Apart from ./check/ because it opens an Image: ./check/ never imports ./image.ts
// (image.ts runs the check's refcount rebuild on dirty images).

import { NodeFile } from './block-file.ts';
import { checkOpenImage } from './check/check-open-image.ts';
import type { CheckExtension, CheckOptions, ImageCheck } from './check/types.ts';
import { Image } from './image.ts';

export { checkOpenImage } from './check/check-open-image.ts';
export {
  checkExitCode,
  type CheckCounts,
  type CheckExtension,
  type CheckOptions,
  type CheckTarget,
  type ExtensionReport,
  type ImageCheck,
  type RepairMode,
} from './check/types.ts';

export interface CheckImageOptions extends CheckOptions {
  /**
   * Structures a layer above the engine keeps in the image (the dedup store:
   * src/dedup/inspect.ts dedupCheckExtension), made from the opened image; null when none.
   */
  extension?: (image: Image) => Promise<CheckExtension | null> | CheckExtension | null;
}

/**
 * Opens `path` and checks it (see checkOpenImage). The image is opened read-only, or on a
 * writable file handle when repairing (corrupt images included: repairing them is the point).
 * Throws the open errors: NotQcow2Error, CorruptImageError, UnsupportedError, IoError.
 */
export async function checkImage(path: string, options: CheckImageOptions = {}): Promise<ImageCheck> {
  const writable = options.repair !== undefined;
  const file = writable ? await NodeFile.open(path, true, options.lock) : undefined;
  const image = await Image.open(path, { file, lock: options.lock });
  try {
    const extension = options.extension ? await options.extension(image) : null;
    return await checkOpenImage({ path, file: image.file, header: image.header, l1: image.l1, writable }, options, extension);
  } finally {
    await image.close();
  }
}
