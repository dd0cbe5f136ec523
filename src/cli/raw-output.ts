// Where `qdedup read` puts raw guest bytes. A regular file gets positional writes that skip
// the ranges the image maps as zeros, so the output is sparse as `qemu-img convert -O raw`
// output is; anything else — a pipe, a terminal, a device, a file opened with O_APPEND
// (`>>`: the kernel appends every pwrite) — gets every byte in order through Output.out.
//
// Positions are relative to where stdout's file offset stood when the command started
// (`{ echo head; qdedup read …; } > f` works), and the offset is left just past the bytes
// written, as a sequential writer leaves it. Only the part of the output that lies past
// the file's end at start is left as holes: bytes already there are overwritten with zeros.
// Node has no lseek: it comes from src/image/libc.ts (koffi, loaded by the image locks
// anyway); where libc cannot be loaded, the output is written in order.

import { fstatSync, ftruncateSync, readFileSync, write } from 'node:fs';
import { libc } from '../image/libc.ts';
import { stdoutError, type Output } from './output.ts';

const SEEK_SET = 0;
const SEEK_CUR = 1;
/** O_APPEND in the octal flags of /proc/self/fdinfo (asm-generic/fcntl.h; x86_64 and aarch64). */
const O_APPEND = 0o2000;

export interface RawSink {
  /** true: zero ranges may be left unfilled in the chunks given to write() (they are listed instead). */
  readonly sparse: boolean;
  /**
   * Outputs `data`, the bytes at `outputOffset` from the start of the output. `zeros` (sparse
   * sinks only) lists [start, end) ranges of `data` that are zeros but were not filled.
   * `data` may be reused once the promise settles.
   */
  write(outputOffset: number, data: Buffer, zeros?: number[]): Promise<void>;
  /** Called once, after the last write: `byteLength` bytes in all. */
  finish(byteLength: number): Promise<void>;
}

/** A sink that writes every byte through `io.out`, in order. */
function streamSink(io: Output): RawSink {
  return {
    sparse: false,
    write: (_outputOffset, data) => io.out(data),
    finish: async () => {},
  };
}

/** The open flags of descriptor `fd` from /proc/self/fdinfo, or undefined where that cannot be read. */
function openFlags(fd: number): number | undefined {
  try {
    const m = /^flags:\s+([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
    return m ? Number.parseInt(m[1], 8) : undefined;
  } catch {
    return undefined;
  }
}

/** The sink for `io`'s stdout: sparse positional writes when it is a regular file we can seek, else in order. */
export function rawSink(io: Output): RawSink {
  const fd = io.stdoutFd;
  if (fd === undefined) return streamSink(io);
  let initialSize: number;
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) return streamSink(io);
    initialSize = st.size;
  } catch {
    return streamSink(io);
  }
  const flags = openFlags(fd);
  if (flags === undefined || flags & O_APPEND) return streamSink(io);
  const c = libc();
  const start = c ? c.lseek(fd, 0, SEEK_CUR) : -1;
  if (!c || !Number.isSafeInteger(start) || start < 0) return streamSink(io);

  /**
   * pwrite of data[from, to) at output offset `at`, in the thread pool: the next chunk's
   * reads run on the main thread meanwhile.
   */
  const put = async (data: Buffer, from: number, to: number, at: number): Promise<void> => {
    for (let done = from; done < to; ) {
      done += await new Promise<number>((resolve, reject) => {
        write(fd, data, done, to - done, start + at + (done - from), (err, n) => (err ? reject(stdoutError(err)) : resolve(n)));
      });
    }
  };
  return {
    sparse: true,
    async write(outputOffset, data, zeros = []) {
      // Zero ranges inside the file as it was are overwritten (filled, then written with their
      // neighbours); those past its end are skipped and read back as holes.
      const keepFrom = initialSize - start - outputOffset; // data offsets below this existed before
      let from = 0; // start of the pending run of bytes to write
      const writes: Promise<void>[] = [];
      for (let i = 0; i < zeros.length; i += 2) {
        const [zStart, zEnd] = [zeros[i], zeros[i + 1]];
        const fillTo = Math.min(zEnd, Math.max(zStart, keepFrom));
        if (fillTo > zStart) data.fill(0, zStart, fillTo);
        if (fillTo === zEnd) continue; // all of it is written with the run
        writes.push(put(data, from, fillTo, outputOffset + from));
        from = zEnd;
      }
      writes.push(put(data, from, data.length, outputOffset + from));
      const results = await Promise.allSettled(writes);
      for (const r of results) if (r.status === 'rejected') throw r.reason;
    },
    async finish(byteLength) {
      const end = start + byteLength;
      try {
        if (fstatSync(fd).size < end) ftruncateSync(fd, end); // trailing holes
      } catch (err) {
        throw stdoutError(err);
      }
      c.lseek(fd, end, SEEK_SET);
    },
  };
}
