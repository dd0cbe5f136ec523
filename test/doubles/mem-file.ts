// An in-memory BlockFile for unit tests of code that does positional I/O (the dedup
// journal and hash store): same contract as NodeFile, reads past the end are zeros.

import type { BlockFile } from '../../src/image/block-file.ts';

export class MemFile implements BlockFile {
  readonly path: string;
  private data: Buffer;
  private length = 0;
  /** Counters a test can assert on. */
  reads = 0;
  writes = 0;
  syncs = 0;

  constructor(path = 'mem', initial?: Buffer) {
    this.path = path;
    this.data = Buffer.alloc(Math.max(initial?.length ?? 0, 4096));
    if (initial) {
      initial.copy(this.data);
      this.length = initial.length;
    }
  }

  /** A copy of the file's bytes. */
  bytes(): Buffer {
    return Buffer.from(this.data.subarray(0, this.length));
  }

  async read(pos: number, length: number): Promise<Buffer> {
    return this.readSync(pos, length);
  }

  readSync(pos: number, length: number): Buffer {
    this.reads++;
    const out = Buffer.alloc(length);
    if (pos < this.length) this.data.copy(out, 0, pos, Math.min(this.length, pos + length));
    return out;
  }

  async write(pos: number, data: Buffer): Promise<void> {
    this.writes++;
    this.ensure(pos + data.length);
    data.copy(this.data, pos);
    this.length = Math.max(this.length, pos + data.length);
  }

  /** Zeroes the range (within the file; its size is kept), as a punched hole reads. */
  async punchHole(pos: number, length: number): Promise<boolean> {
    const end = Math.min(this.length, pos + length);
    if (end > pos) this.data.fill(0, pos, end);
    return true;
  }

  async writev(pos: number, buffers: Buffer[]): Promise<void> {
    for (const b of buffers) {
      await this.write(pos, b);
      pos += b.length;
    }
  }

  async sync(): Promise<void> {
    this.syncs++;
  }

  async size(): Promise<number> {
    return this.length;
  }

  async allocatedBytes(): Promise<number> {
    return this.length;
  }

  async truncate(length: number): Promise<void> {
    this.ensure(length);
    if (length < this.length) this.data.fill(0, length, this.length);
    this.length = length;
  }

  async close(): Promise<void> {}

  private ensure(size: number): void {
    if (size <= this.data.length) return;
    const grown = Buffer.alloc(Math.max(size, this.data.length * 2));
    this.data.copy(grown);
    this.data = grown;
  }
}
