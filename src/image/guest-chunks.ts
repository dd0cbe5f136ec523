// A guest range of an open image read in chunks with two buffers: chunk k+1 is read while
// the caller handles chunk k (writes it out, checks it), so reads and output overlap and
// memory stays two chunks whatever the range's length. `qdedup read` streams with it.

import type { Image } from './image.ts';

/** Guest bytes read per chunk by default; two such buffers are held. */
export const READ_CHUNK_BYTES = 8 * 1024 * 1024;

export interface GuestChunk {
  /** Where the chunk starts, in bytes from the start of the range. */
  at: number;
  /** The chunk's bytes: valid until the chunk after the next one is asked for. */
  data: Buffer;
  /** With `listZeros`: [start, end) ranges of `data` that are zeros but were not filled. */
  zeros?: number[];
}

/**
 * The `length` guest bytes of `image` from `offset`, `chunkBytes` at a time. With
 * `listZeros`, ranges the image maps as zeros are listed instead of filled.
 */
export async function* readGuestChunks(
  image: Image,
  offset: number,
  length: number,
  chunkBytes = READ_CHUNK_BYTES,
  listZeros = false,
): AsyncGenerator<GuestChunk> {
  const size = Math.min(chunkBytes, length);
  const buffers = [Buffer.allocUnsafe(size), Buffer.allocUnsafe(size)];
  const zeroLists: number[][] = [[], []];
  const readChunk = (k: number): Promise<void> => {
    const at = k * chunkBytes;
    const zeros = listZeros ? zeroLists[k % 2] : undefined;
    if (zeros) zeros.length = 0;
    return image.readRange(buffers[k % 2], 0, offset + at, Math.min(chunkBytes, length - at), zeros);
  };
  const chunks = Math.ceil(length / chunkBytes);
  let pending = chunks > 0 ? readChunk(0) : null;
  for (let k = 0; k < chunks; k++) {
    await pending;
    // Started before this chunk is handled; a failure is seen at the next await.
    pending = k + 1 < chunks ? readChunk(k + 1) : null;
    pending?.catch(() => {});
    const at = k * chunkBytes;
    yield { at, data: buffers[k % 2].subarray(0, Math.min(chunkBytes, length - at)), zeros: listZeros ? zeroLists[k % 2] : undefined };
  }
}
