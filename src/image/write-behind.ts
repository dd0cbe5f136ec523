// A BlockFile that lets data runs be written behind: writeBehind() starts a write and returns
// at once, so the write pipeline decides the next chunk while the thread pool copies this
// one into the page cache. Every other operation keeps the order a caller sees: a read
// returns the bytes of writes still in flight (copied from their buffers, which the caller
// keeps unchanged until settled()), a write over an in-flight range waits for it, and sync(),
// truncate() and close() wait for them all. A failed write-behind is reported by the next
// operation, so no commit can name data that never reached the file (I3).

import { readvFrom, type BlockFile } from './block-file.ts';

interface InFlight {
  pos: number;
  end: number;
  buffers: Buffer[];
  done: Promise<void>;
}

export class WriteBehindFile implements BlockFile {
  private readonly inFlight = new Set<InFlight>();
  private failure: unknown = null;

  constructor(readonly inner: BlockFile) {}

  get path(): string {
    return this.inner.path;
  }

  /** Starts writing `buffers` back to back from `pos`; they must not change until settled(). */
  writeBehind(pos: number, buffers: Buffer[]): void {
    this.check();
    const end = pos + buffers.reduce((n, b) => n + b.length, 0);
    const w: InFlight = { pos, end, buffers, done: Promise.resolve() };
    w.done = this.after(pos, end)
      .then(() => this.inner.writev(pos, buffers))
      .catch((err) => {
        this.failure ??= err;
      })
      .finally(() => {
        this.inFlight.delete(w);
      });
    this.inFlight.add(w);
  }

  /** Resolves when every write started so far has ended; throws the first failure. */
  async settled(): Promise<void> {
    while (this.inFlight.size) await Promise.all([...this.inFlight].map((w) => w.done));
    this.check();
  }

  async read(pos: number, length: number): Promise<Buffer> {
    await this.after(pos, pos + length);
    return this.inner.read(pos, length);
  }

  readSync(pos: number, length: number): Buffer {
    const buf = this.inner.readSync(pos, length);
    this.overlay(pos, [buf]);
    return buf;
  }

  async readv(pos: number, buffers: Buffer[]): Promise<void> {
    await this.after(pos, pos + buffers.reduce((n, b) => n + b.length, 0));
    await readvFrom(this.inner, pos, buffers);
  }

  readvSync(pos: number, buffers: Buffer[]): void {
    if (!this.inner.readvSync) {
      let at = pos;
      for (const b of buffers) {
        this.inner.readSync(at, b.length).copy(b);
        at += b.length;
      }
    } else this.inner.readvSync(pos, buffers);
    this.overlay(pos, buffers);
  }

  async write(pos: number, data: Buffer): Promise<void> {
    this.check();
    await this.after(pos, pos + data.length);
    await this.inner.write(pos, data);
  }

  async writev(pos: number, buffers: Buffer[]): Promise<void> {
    this.check();
    await this.after(pos, pos + buffers.reduce((n, b) => n + b.length, 0));
    await this.inner.writev(pos, buffers);
  }

  async sync(): Promise<void> {
    await this.settled();
    await this.inner.sync();
  }

  async size(): Promise<number> {
    await this.settled();
    return this.inner.size();
  }

  allocatedBytes(): Promise<number> {
    return this.inner.allocatedBytes();
  }

  async punchHole(pos: number, length: number): Promise<boolean> {
    await this.settled();
    return this.inner.punchHole ? this.inner.punchHole(pos, length) : false;
  }

  async truncate(length: number): Promise<void> {
    await this.settled();
    await this.inner.truncate(length);
  }

  /** Closes after the writes in flight have ended (their failure is not reported: close is also the error path's). */
  async close(): Promise<void> {
    await Promise.all([...this.inFlight].map((w) => w.done));
    await this.inner.close();
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  /** Waits for the writes in flight that overlap [pos, end). */
  private async after(pos: number, end: number): Promise<void> {
    for (const w of this.inFlight) if (w.pos < end && pos < w.end) await w.done;
  }

  /**
   * Copies into `dst` (just read synchronously, back to back from `pos`) the bytes of the
   * in-flight writes they overlap, oldest first: the bytes a reader must see, whether or not
   * the write had reached the file when it was read.
   */
  private overlay(pos: number, dst: Buffer[]): void {
    if (!this.inFlight.size) return;
    for (const w of this.inFlight) {
      let d = pos; // file offset of dst[i]
      for (const b of dst) {
        const dEnd = d + b.length;
        if (d < w.end && w.pos < dEnd) {
          let s = w.pos; // file offset of w.buffers[j]
          for (const src of w.buffers) {
            const sEnd = s + src.length;
            const from = Math.max(d, s);
            const to = Math.min(dEnd, sEnd);
            if (from < to) src.copy(b, from - d, from - s, to - s);
            s = sEnd;
          }
        }
        d = dEnd;
      }
    }
  }
}
