// What a guest range reads from — a QCOW2 image (./image.ts) or a raw file (RawImage) — and
// the probe that tells them apart, for backing files and convert's sources.

import { QCOW_MAGIC } from '../format/header.ts';
import { NodeFile, readvFrom, type BlockFile } from './block-file.ts';
import type { LockRequest } from './image-lock.ts';

/** What a guest range reads from: a QCOW2 image or a raw file. */
export interface GuestReader {
  readonly size: number;
  /** Reads guest bytes; ranges past `size` read as zeros. */
  readGuest(guestOffset: number, length: number): Promise<Buffer>;
  /**
   * readGuest() into dst[dstStart…], whatever it held; with `zeros`, ranges known to be
   * zero without I/O are left as they are and listed there (see Image.readRange).
   */
  readGuestInto?(dst: Buffer, dstStart: number, guestOffset: number, length: number, zeros?: number[]): Promise<void>;
  close(): Promise<void>;
}

/** Zero-fills dst[start, end), or (with `zeros`) lists the range there instead, merged with its predecessor. */
export function zeroRange(dst: Buffer, start: number, end: number, zeros: number[] | undefined): void {
  if (start >= end) return;
  if (!zeros) {
    dst.fill(0, start, end);
    return;
  }
  if (zeros.length && zeros[zeros.length - 1] === start) zeros[zeros.length - 1] = end;
  else zeros.push(start, end);
}

/** A raw file used as a backing image: guest offset = file offset. */
export class RawImage implements GuestReader {
  private constructor(
    private readonly file: BlockFile,
    readonly size: number,
  ) {}

  static async open(path: string, lock?: LockRequest): Promise<RawImage> {
    const file = await NodeFile.open(path, false, lock);
    return new RawImage(file, await file.size());
  }

  async readGuest(guestOffset: number, length: number): Promise<Buffer> {
    const inside = Math.max(0, Math.min(length, this.size - guestOffset));
    if (inside === length) return this.file.read(guestOffset, length);
    const out = Buffer.alloc(length);
    if (inside > 0) (await this.file.read(guestOffset, inside)).copy(out);
    return out;
  }

  async readGuestInto(dst: Buffer, dstStart: number, guestOffset: number, length: number, zeros?: number[]): Promise<void> {
    const inside = Math.max(0, Math.min(length, this.size - guestOffset));
    if (inside > 0) await readvFrom(this.file, guestOffset, [dst.subarray(dstStart, dstStart + inside)]);
    zeroRange(dst, dstStart + inside, dstStart + length, zeros);
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}

/** 'qcow2' when the file starts with the QCOW2 magic, else 'raw' (QEMU's probe, reduced to two formats). */
export async function probeFormat(path: string): Promise<string> {
  const file = await NodeFile.open(path, false);
  try {
    const magic = await file.read(0, 4);
    return magic.readUInt32BE(0) === QCOW_MAGIC ? 'qcow2' : 'raw';
  } finally {
    await file.close();
  }
}
