// Read-write opens and creation of images with inline deduplication: the one place that
// attaches the dedup write policy (./dedup.ts) to the QCOW2 engine, which never imports this
// layer (docs/DESIGN.md "Layers"). Every writer goes through here: `write`, `create -o dedup`,
// the tests' writers.

import { AUTOCLEAR_DEDUP, findDedupExtension } from '../format/dedup-ext.ts';
import type { Header } from '../format/header.ts';
import { Image, type OpenOptions } from '../image/image.ts';
import { LOCK_WRITE } from '../image/image-lock.ts';
import { createImage as createPlainImage, type CreateOptions as PlainCreateOptions } from '../image/create.ts';
import { Dedup, type DedupSettings } from './dedup.ts';
import { attachDedup, initializeDedup } from './attach.ts';

export interface WriteOpenOptions extends Omit<OpenOptions, 'writable' | 'policy' | 'keepAutoclear'> {
  /** false: a read-write open that leaves the dedup store alone; writes then are not deduplicated (bit 60 is kept). */
  dedup?: boolean;
}

/** Autoclear bits a writer of this image maintains: bit 60 on a dedup image (its extension present). */
export function dedupAutoclear(header: Header): bigint {
  return findDedupExtension(header.extensions) ? AUTOCLEAR_DEDUP : 0n;
}

/**
 * Opens `path` for writing (Image.open's contract) with inline deduplication on a dedup
 * image: attachDedup sets the dirty flag (synced) before any other write and trusts or
 * replaces the store; with `compress`, its unique clusters are written as compressed copies.
 * A plain image opens as with Image.open (`compress`: compressed clusters without dedup).
 * Throws as Image.open does.
 */
export function openForWrite(path: string, options: WriteOpenOptions = {}): Promise<Image> {
  const { dedup, ...rest } = options;
  return Image.open(path, {
    ...rest,
    writable: true,
    keepAutoclear: dedupAutoclear,
    policy:
      dedup === false
        ? undefined
        : async (image, writer) => {
            const d = await attachDedup(image, writer);
            if (d && options.compress) d.compressWrites();
            return d;
          },
  });
}

/** The dedup layer of an image opened by openForWrite, or null (a plain image, or `dedup: false`). */
export function dedupOf(image: Image): Dedup | null {
  return image.policy instanceof Dedup ? image.policy : null;
}

export interface CreateOptions extends PlainCreateOptions {
  /** Inline deduplication settings (a v3 image), or undefined for a plain image. */
  dedup?: DedupSettings;
}

/**
 * Writes a new image (src/image/create.ts createImage's contract); with `dedup`, its dedup
 * structures (extension, store, holder snapshot) then go in through the engine, with the
 * same crash-safe ordering as any later change. Returns the header as written.
 */
export async function createImage(path: string, o: CreateOptions): Promise<Header> {
  const { dedup: settings, ...plain } = o;
  const header = await createPlainImage(path, plain);
  if (!settings) return header;
  const image = await Image.open(path, {
    writable: true,
    backing: false,
    lock: LOCK_WRITE,
    keepAutoclear: dedupAutoclear,
    policy: (img, writer) => initializeDedup(img, writer, settings),
  });
  try {
    await image.close();
  } catch (err) {
    await image.abandon();
    throw err;
  }
  return image.header;
}
