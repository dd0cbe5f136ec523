// A guest write into an image file, as `qdedup write` makes it: a byte pattern, zeroes, or
// the bytes of a source (a file or a stream) at a guest offset, committed and synced before
// it returns. Prepared first without writing anything — the source's length against LENGTH,
// the range against the disk on a read-only open, a stream's first chunk read — so a refused
// or empty input leaves the image as it was; then run through the engine's write pipeline
// (src/image/write-pipeline.ts), with inline dedup when the image has it.

import { IoError, QdedupError } from '../errors.ts';
import { pastTheEnd } from '../image/guest-range.ts';
import { Image } from '../image/image.ts';
import { LOCK_WRITE } from '../image/image-lock.ts';
import { CHUNK_BYTES, ChunkReader, writeChunks, type ChunkSource } from '../image/write-pipeline.ts';
import { dedupOf, openForWrite } from './open.ts';

/** Bytes from outside the image: a regular file (its size known) or a stream. */
export interface WriteSource extends ChunkSource {
  /** How messages name it: `input 'data.bin'`, `standard input`. */
  readonly label: string;
  /** The path it was opened by, for errors about the source itself. */
  readonly path: string;
  /** Bytes it holds, when known (a regular file); undefined for a stream. */
  readonly size: number | undefined;
}

/** What to write: `length` bytes of a pattern or of zeroes, or a source's bytes (to its end without `length`). */
export type WriteData =
  | { kind: 'pattern'; byte: number; length: number }
  | { kind: 'zeroes'; length: number }
  | { kind: 'source'; source: WriteSource; length?: number };

export interface GuestWriteOptions {
  /** Stops after the chunk in flight; what was written is still committed. */
  signal?: AbortSignal;
  /** A source whose length is known: bytes written so far, of `total`. */
  progress?: (written: number, total: number) => void;
}

export interface GuestWriteResult {
  /** Bytes written (and committed) from the offset. */
  written: number;
  /** The bytes to write: LENGTH or a file's size; undefined for a stream without LENGTH. */
  total: number | undefined;
  /** A stream longer than the room left on the disk: what fitted was written. */
  overflow?: QdedupError;
  /** A source that ended before `total` bytes: what it held was written. */
  short?: IoError;
  /** Why the dedup index was not used (src/dedup/dedup.ts), if it was not. */
  notice: string | null;
  /** Index entries that named a cluster holding other bytes (written anew; the index is damaged). */
  mismatches: number;
}

/** A write checked and ready: run() opens the image for writing. */
export interface GuestWrite {
  readonly total: number | undefined;
  run(o?: GuestWriteOptions): Promise<GuestWriteResult>;
}

/** Checks the write of `data` at guest `offset` of `file` and reads a stream's first chunk; writes nothing. */
export async function prepareGuestWrite(file: string, offset: number, data: WriteData, how: { compress?: boolean } = {}): Promise<GuestWrite> {
  const source = data.kind === 'source' ? data.source : undefined;
  // The number of bytes to write, when it is known before reading: LENGTH, or the size of
  // a regular file. A stream without LENGTH is written up to its end.
  let total = data.length;
  if (source?.size !== undefined) {
    if (total === undefined) total = source.size;
    else if (source.size < total)
      throw new IoError(`cannot read input: it has only ${source.size} bytes, fewer than LENGTH ${total}`, { path: source.path }, 'ESHORTINPUT');
    if (total === 0 && data.length === undefined) throw emptySource(source);
  }

  // The range is checked on a read-only open first: a read-write open may already rewrite
  // the header (clearing foreign autoclear bits), and a refused write must leave the file
  // unchanged. Like qemu-io ("write failed: Input/output error"), this is not a usage error.
  // Both opens take the writer's locks (QEMU's image locks), so another holder is refused
  // here, with qemu-io's words, before anything is written (I6, docs/DESIGN.md).
  const probe = await Image.open(file, { backing: false, lock: LOCK_WRITE });
  const virtualSize = probe.size;
  await probe.close();
  if (total !== undefined && offset + total > virtualSize) throw pastTheEnd(file, offset, total, virtualSize);
  if (offset > virtualSize) throw pastTheEnd(file, offset, 0, virtualSize);

  // A stream's first chunk is read before the image is opened for writing: an empty stream
  // (a producer that failed) leaves the image untouched.
  // At most `total` bytes when it is known, else one byte more than the room left on the disk:
  // that is how a stream too long for the disk is recognised without reading it all.
  const reader = source ? new ChunkReader(source, total ?? virtualSize - offset + 1) : undefined;
  let first: Buffer | undefined;
  if (source && reader && total !== 0) {
    first = await reader.next();
    if (first.length === 0) {
      if (total === undefined) throw emptySource(source);
      throw new IoError(`${source.label} ended after 0 of ${total} bytes; nothing was written`, { path: file }, 'ESHORTINPUT');
    }
    if (offset === virtualSize) throw tooLong(file, offset, source, virtualSize, 0);
  }

  const run = async (o: GuestWriteOptions = {}): Promise<GuestWriteResult> => {
    let written = 0;
    let overflow: QdedupError | undefined;
    let short: IoError | undefined;
    const image = await openForWrite(file, { lock: LOCK_WRITE, compress: how.compress });
    try {
      if (data.kind === 'zeroes') {
        await image.writeZeroes(offset, data.length);
        written = data.length;
      } else if (data.kind === 'pattern') {
        const chunk = Buffer.alloc(Math.min(data.length, CHUNK_BYTES), data.byte);
        while (written < data.length && !o.signal?.aborted) {
          const n = Math.min(chunk.length, data.length - written);
          await image.write(offset + written, chunk.subarray(0, n));
          written += n;
        }
      } else if (source && reader && first) {
        const progress = total !== undefined && o.progress ? (n: number) => o.progress!(n, total) : undefined;
        progress?.(0);
        const r = await writeChunks(image, offset, reader, first, { room: virtualSize - offset, signal: o.signal, progress });
        written = r.written;
        // Like dd onto a device: what fits is written (and committed below), the rest refused.
        if (r.overflow) overflow = tooLong(file, offset, source, virtualSize, written);
        if (!o.signal?.aborted && total !== undefined && written < total) {
          short = new IoError(
            `${source.label} ended after ${written} of ${total} bytes; wrote those ${written} bytes at offset ${offset}`,
            { path: file },
            'ESHORTINPUT',
          );
        }
      }
      await image.close(); // commits metadata and syncs: durable before exit 0 (I3)
    } catch (err) {
      await image.abandon();
      throw err;
    }
    const dedup = dedupOf(image);
    return { written, total, overflow, short, notice: dedup?.notice ?? null, mismatches: dedup?.counters.mismatches ?? 0 };
  };
  return { total, run };
}

/** A stream longer than the room left on the disk (found by reading one byte past it). */
function tooLong(file: string, offset: number, source: WriteSource, virtualSize: number, written: number): QdedupError {
  const room = virtualSize - offset;
  return new QdedupError(
    `${source.label} goes past the end of the disk (virtual size ${virtualSize}): ${room} bytes fit from offset ${offset}; ` +
      `${written ? `wrote those ${written} bytes, the rest of the input was not written` : 'nothing was written'}`,
    'ERANGE',
    1,
    { path: file },
  );
}

/** A source that gave no bytes when no LENGTH was asked for: most likely a producer that failed. */
function emptySource(source: WriteSource): IoError {
  return new IoError(`${source.label} is empty: nothing to write (give LENGTH 0 to write nothing)`, {}, 'EEMPTYINPUT'); // the CLI names the image
}
