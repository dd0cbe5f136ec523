// PLACEHOLDER — being written (consistency check, repair and refcount rebuild).
import type { Image } from './image.ts';
export async function rebuildRefcounts(image: Image): Promise<void> {
  throw new Error(`refcount rebuild not implemented yet for ${image.path}`);
}
