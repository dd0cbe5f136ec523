// The copy behind `qdedup convert`: the guest data of one or more sources (raw files or QCOW2
// images, read as any read sees them: compressed and zero clusters, backing chains
// flattened) goes into a target back to back, each source's size in turn, as qemu-img
// convert concatenates its sources. A QCOW2 target is written through the write pipeline
// (./write-pipeline.ts: with inline dedup, hashed on a worker and deduplicated), and zeros
// become zero clusters; a raw target gets only its bytes that are not zero, the rest left as
// holes.

import { NodeFile } from './block-file.ts';
import { isZero } from '../format/bytes.ts';
import { RawImage, probeFormat, type GuestReader } from './guest-reader.ts';
import { Image } from './image.ts';
import { LOCK_CREATE, type LockRequest } from './image-lock.ts';
import { CHUNK_BYTES, ChunkReader, positionalSource, writeChunks, type ChunkSource } from './write-pipeline.ts';

/** Zero detection step of a raw target: runs of this many zero bytes become holes (qemu-img convert -S 4k). */
const SPARSE_BYTES = 4096;

export interface CopyOptions {
  /** Stops after the chunk in flight. */
  signal?: AbortSignal;
  /** Called with the bytes copied so far. */
  progress?: (done: number) => void;
}

/**
 * Opens the sources read-only holding `lock`, each as `format` says (qcow2 or raw) or as
 * probed. Throws the first open error, with the sources opened before it closed again.
 */
export async function openSources(paths: string[], format: string | undefined, lock: LockRequest): Promise<GuestReader[]> {
  const sources: GuestReader[] = [];
  try {
    for (const path of paths) {
      const kind = format ?? (await probeFormat(path));
      sources.push(kind === 'qcow2' ? await Image.open(path, { lock }) : await RawImage.open(path, lock));
    }
    return sources;
  } catch (err) {
    for (const s of sources) await s.close().catch(() => {});
    throw err;
  }
}

/** The guest bytes of `sources` back to back, as a ChunkSource (positional: chunks are read at once). */
export function guestSource(sources: GuestReader[]): ChunkSource {
  const fillAt = async (buf: Buffer, at: number, want: number): Promise<number> => {
    let got = 0;
    let start = 0; // of sources[i] in the sequence
    for (const src of sources) {
      const pos = at + got - start;
      const n = Math.min(want - got, src.size - pos);
      if (pos >= 0 && n > 0) {
        if (src.readGuestInto) await src.readGuestInto(buf, got, pos, n);
        else (await src.readGuest(pos, n)).copy(buf, got);
        got += n;
      }
      if (got === want) break;
      start += src.size;
    }
    return got;
  };
  return positionalSource(fillAt);
}

/** Total guest bytes of `sources`. */
export function totalSize(sources: GuestReader[]): number {
  return sources.reduce((n, s) => n + s.size, 0);
}

/** Copies `sources` into `target` (open for writing, at least their total size) from guest offset 0. Returns the bytes copied. */
export async function copyToImage(target: Image, sources: GuestReader[], o: CopyOptions = {}): Promise<number> {
  const total = totalSize(sources);
  if (total === 0) return 0;
  const reader = new ChunkReader(guestSource(sources), total);
  const first = await reader.next();
  const r = await writeChunks(target, 0, reader, first, { room: target.size, signal: o.signal, progress: o.progress });
  return r.written;
}

/**
 * Writes `sources` as a new raw file at `path` (replacing one there, after taking the lock
 * qemu-img create takes): only bytes that are not zero are written, so zeros are holes.
 * Reading chunk k+1 overlaps writing chunk k. Returns the bytes copied (fewer on a signal).
 */
export async function copyToRaw(path: string, sources: GuestReader[], o: CopyOptions = {}): Promise<number> {
  const total = totalSize(sources);
  const file = await NodeFile.create(path, false, LOCK_CREATE);
  try {
    await file.truncate(0);
    const source = guestSource(sources);
    const size = Math.max(1, Math.min(total, CHUNK_BYTES));
    const buffers = [Buffer.allocUnsafe(size), Buffer.allocUnsafe(size)];
    let done = 0;
    let next = total > 0 ? source.fill(buffers[0], size) : Promise.resolve(0);
    for (let k = 0; done < total; k++) {
      const n = await next;
      if (n === 0) break;
      const data = buffers[k % 2].subarray(0, n);
      next = done + n < total ? source.fill(buffers[(k + 1) % 2], Math.min(size, total - done - n)) : Promise.resolve(0);
      next.catch(() => {}); // seen at its await
      for (let at = 0; at < n; ) {
        // A run of blocks that are not all zero, written with one call.
        while (at < n && isZero(data.subarray(at, Math.min(n, at + SPARSE_BYTES)))) at += SPARSE_BYTES;
        let end = at;
        while (end < n && !isZero(data.subarray(end, Math.min(n, end + SPARSE_BYTES)))) end += SPARSE_BYTES;
        end = Math.min(n, end);
        if (end > at) await file.write(done + at, data.subarray(at, end));
        at = end;
      }
      done += n;
      o.progress?.(done);
      if (o.signal?.aborted) break;
    }
    await next.catch(() => 0);
    await file.truncate(total); // trailing holes
    await file.sync();
    return done;
  } finally {
    await file.close();
  }
}
