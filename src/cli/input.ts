// The input of `qdedup write -i`: a regular file, `-` (standard input), or anything else
// the system can open for reading — a pipe, a FIFO, /dev/stdin, a process substitution
// (/dev/fd/N), a character device. openInput() opens and validates it before the image is
// opened for writing; fill() then reads it in caller-sized pieces, so memory stays bounded
// whatever the input's length.
//
// Regular files are read with positional reads and have a known size. Everything else is a
// stream of unknown length read to its end: pipes, FIFOs and sockets through a non-blocking
// libuv handle (net.Socket, as Node's own process.stdin), terminals through tty.ReadStream,
// other devices through fs.createReadStream. A blocking read() on a pipe would hold a
// thread-pool thread that even process.exit() waits for, so an interrupted write could not
// end while its producer is silent. The cost: a stream is read ahead by up to ~64 KiB, so
// bytes after LENGTH may be consumed from a pipe (as most readers of a pipe do).

import { close as closeFd, fstat, open as openFd, read as readFd, createReadStream, type Stats } from 'node:fs';
import { Socket } from 'node:net';
import { isatty, ReadStream as TtyReadStream } from 'node:tty';
import type { Readable } from 'node:stream';
import { IoError } from '../errors.ts';
import { ioError } from '../image/block-file.ts';

export interface Input {
  /** How messages name the input: `'data.bin'`, or `standard input` for `-`. */
  readonly label: string;
  /** The path given (`-` for standard input), for errors found while opening. */
  readonly path: string;
  /** Bytes the input holds, when known (a regular file); undefined for a stream. */
  readonly size: number | undefined;
  /**
   * Reads up to `want` bytes into `buf` from its start, returning fewer only at the end
   * of the input. Throws IoError naming the input. One call at a time.
   */
  fill(buf: Buffer, want: number): Promise<number>;
  /** The same from byte `pos`, for a regular file read from its start; calls may overlap. */
  fillAt?(buf: Buffer, pos: number, want: number): Promise<number>;
  /** Releases the input; a fill() in progress is abandoned (it never resolves). */
  close(): Promise<void>;
}

const promised = <T>(fn: (cb: (err: NodeJS.ErrnoException | null, value: T) => void) => void) =>
  new Promise<T>((resolve, reject) => fn((err, value) => (err ? reject(err) : resolve(value))));

/**
 * Opens `path` (`-` for standard input) for reading and checks that it can be read as
 * data: it exists, may be read and is not a directory. Opening a FIFO waits until a writer
 * opens it, as `cat` does. Throws IoError naming the input.
 */
export async function openInput(path: string): Promise<Input> {
  let stdin = path === '-';
  const label = stdin ? 'standard input' : `input '${path}'`;
  let fd: number;
  try {
    fd = stdin ? 0 : await promised<number>((cb) => openFd(path, 'r', cb));
  } catch (err) {
    // /dev/stdin on a socket (a standard input some process managers and Node's spawn give)
    // cannot be opened again (ENXIO): read the descriptor itself, as '-' does.
    if ((err as NodeJS.ErrnoException).code !== 'ENXIO' || (path !== '/dev/stdin' && path !== '/dev/fd/0')) throw ioError(err, path, 'cannot read input');
    stdin = true;
    fd = 0;
  }
  let st: Stats;
  try {
    st = await promised<Stats>((cb) => fstat(fd, cb));
  } catch (err) {
    if (!stdin) closeFd(fd, () => {});
    throw ioError(err, path, 'cannot read input');
  }
  if (st.isDirectory()) {
    if (!stdin) closeFd(fd, () => {});
    throw new IoError('cannot read input: Is a directory', { path }, 'EISDIR');
  }
  if (st.isFile()) return new FileInput(path, label, fd, st.size, stdin);
  let stream: Readable;
  if (st.isFIFO() || st.isSocket()) stream = new Socket({ fd, readable: true, writable: false });
  else if (isatty(fd)) stream = new TtyReadStream(fd);
  else stream = createReadStream('', { fd, highWaterMark: 1 << 20 });
  return new StreamInput(path, label, stream);
}

/** A regular file: positional reads from the start (from the current position for `-`). */
class FileInput implements Input {
  private pos = 0;
  private closed = false;
  readonly fillAt?: (buf: Buffer, pos: number, want: number) => Promise<number>;

  constructor(
    readonly path: string,
    readonly label: string,
    private readonly fd: number,
    readonly size: number,
    private readonly sequential: boolean,
  ) {
    if (!sequential) this.fillAt = (buf, pos, want) => this.read(buf, pos, want);
  }

  async fill(buf: Buffer, want: number): Promise<number> {
    const got = await this.read(buf, this.sequential ? null : this.pos, want);
    this.pos += got;
    return got;
  }

  /** Up to `want` bytes into `buf` from `pos` (null: the descriptor's position), fewer only at the end. */
  private async read(buf: Buffer, pos: number | null, want: number): Promise<number> {
    let got = 0;
    while (got < want) {
      let n: number;
      try {
        n = await promised<number>((cb) => readFd(this.fd, buf, got, want - got, pos === null ? null : pos + got, cb));
      } catch (err) {
        throw ioError(err, this.path, 'cannot read input');
      }
      if (n === 0) break;
      got += n;
    }
    return got;
  }

  async close(): Promise<void> {
    if (this.closed || this.sequential) return; // standard input stays open (it is not ours)
    this.closed = true;
    await promised<void>((cb) => closeFd(this.fd, (err) => cb(err, undefined))).catch(() => {});
  }
}

/** A stream of unknown length, pulled in paused mode (the stream buffers a bounded amount). */
class StreamInput implements Input {
  readonly size = undefined;
  private leftover: Buffer | null = null;
  private ended = false;
  private error: Error | null = null;
  private wake: (() => void) | null = null;

  constructor(
    readonly path: string,
    readonly label: string,
    private readonly stream: Readable,
  ) {
    const wakeUp = () => {
      const w = this.wake;
      this.wake = null;
      w?.();
    };
    stream.on('readable', wakeUp);
    stream.on('end', () => {
      this.ended = true;
      wakeUp();
    });
    stream.on('error', (err) => {
      this.error = err;
      wakeUp();
    });
  }

  async fill(buf: Buffer, want: number): Promise<number> {
    let got = 0;
    while (got < want) {
      if (this.leftover) {
        const n = this.leftover.copy(buf, got, 0, Math.min(this.leftover.length, want - got));
        got += n;
        this.leftover = n < this.leftover.length ? this.leftover.subarray(n) : null;
        continue;
      }
      if (this.error) throw ioError(this.error, this.path, 'cannot read input');
      const chunk = this.stream.read() as Buffer | null;
      if (chunk !== null) {
        this.leftover = chunk;
        continue;
      }
      if (this.ended || this.stream.readableEnded) break;
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
    return got;
  }

  async close(): Promise<void> {
    this.stream.destroy();
  }
}
