// Shared by the crash-point enumerations (plain and dedup): a workload is a list of steps,
// each one open / operations / close; a step is acknowledged when its close returns.

import { Image } from '../../src/image/image.ts';
import { MemFile } from '../doubles/mem-file.ts';
import { CrashError, type FaultyFile } from '../doubles/faulty-file.ts';
import { openForWrite } from '../../src/dedup/open.ts';
import { ChunkReader, bufferSource, writeChunks } from '../../src/image/write-pipeline.ts';

export type Op =
  | { kind: 'write'; offset: number; data: Buffer }
  | { kind: 'zero'; offset: number; length: number }
  /** `data` through the write pipeline in chunks of `chunk` bytes: chunks hashed ahead, data runs written behind. */
  | { kind: 'stream'; offset: number; data: Buffer; chunk: number };

/** Applies an operation to a raw shadow of the guest disk. */
export function applyOp(shadow: Buffer, op: Op): void {
  if (op.kind !== 'zero') op.data.copy(shadow, op.offset);
  else shadow.fill(0, op.offset, op.offset + op.length);
}

/** The shadow after each acknowledged step: index k is the disk once k steps are acknowledged. */
export function shadowsOf(size: number, steps: Op[][]): Buffer[] {
  const shadows = [Buffer.alloc(size)];
  for (const step of steps) {
    const next = Buffer.from(shadows[shadows.length - 1]);
    for (const op of step) applyOp(next, op);
    shadows.push(next);
  }
  return shadows;
}

/** Writes `data` at `offset` through the write pipeline, in chunks of `chunk` bytes. */
export async function stream(image: Image, offset: number, data: Buffer, chunk: number): Promise<void> {
  const reader = new ChunkReader(bufferSource(data), data.length, chunk);
  const first = await reader.next();
  const r = await writeChunks(image, offset, reader, first, { room: image.size - offset });
  if (r.written !== data.length) throw new Error(`stream wrote ${r.written} of ${data.length} bytes`);
}

/** Runs the workload on `file` until it finishes or crashes; returns the steps acknowledged. `compress`: opened for compressed writes (-c). */
export async function runSteps(path: string, file: FaultyFile, steps: Op[][], compress = false): Promise<number> {
  let done = 0;
  try {
    for (const step of steps) {
      const image = await openForWrite(path, { file, compress });
      for (const op of step) {
        if (op.kind === 'write') await image.write(op.offset, op.data);
        else if (op.kind === 'stream') await stream(image, op.offset, op.data, op.chunk);
        else await image.writeZeroes(op.offset, op.length);
      }
      await image.close(); // flush + sync: the step is acknowledged when this returns
      done++;
    }
  } catch (err) {
    if (!(err instanceof CrashError)) throw err;
  }
  return done;
}

/**
 * The compressed entries of the image in `bytes` (`path` names it): how many guest clusters
 * name each stream, and how many streams cross a cluster boundary — so that a compressed
 * workload can show it is not vacuous.
 */
export async function compressedUse(path: string, bytes: Buffer): Promise<{ copies: Map<number, number>; crossing: number }> {
  const image = await Image.open(path, { file: new MemFile(path, bytes) });
  const cs = image.clusterSize;
  const copies = new Map<number, number>();
  let crossing = 0;
  try {
    for (let g = 0; g < image.size / cs; g++) {
      const e = await image.entry(g);
      if (e.kind !== 'compressed') continue;
      copies.set(e.compressedOffset, (copies.get(e.compressedOffset) ?? 0) + 1);
      if (Math.floor(e.compressedOffset / cs) !== Math.floor((e.compressedOffset + e.compressedLength - 1) / cs)) crossing++;
    }
  } finally {
    await image.close();
  }
  return { copies, crossing };
}
