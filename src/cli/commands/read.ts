// `qdedup read`: guest bytes to stdout, or verified against a pattern, or as a hexdump,
// like qemu-io's `read`. Streams: chunk k+1 is read while chunk k is written, with two
// buffers reused throughout; raw output into a regular file is sparse (../raw-output.ts).

import type { Argv } from 'yargs';
import { UsageError } from '../../errors.ts';
import { Image } from '../../image/image.ts';
import { checkFormat, pastTheEnd, readOnlyLock, withForceShareOption, withFormatOption, withQuietOption } from '../common.ts';
import { LOCK_READ } from '../../image/image-lock.ts';
import { parsePattern, parseSize } from '../parse.ts';
import type { Output } from '../output.ts';
import { rawSink } from '../raw-output.ts';

/** Guest bytes read per step; two such buffers are held (bounded memory whatever the length). */
const RAW_CHUNK_BYTES = 8 * 1024 * 1024;
const HEXDUMP_CHUNK_BYTES = 1024 * 1024;
/** Bytes of the expected pattern (-P) compared at a time. */
const PATTERN_BYTES = 64 * 1024;

export interface ReadArgs {
  file: string;
  offset: number;
  length?: number;
  pattern?: number;
  verbose: boolean;
  quiet: boolean;
  /** -U: read even while another process writes the image. */
  forceShare?: boolean;
}

/** qemu-io's dump_buffer: offset, 16 hex bytes, then the alphanumerics (others as '.'). */
export function hexdumpLines(data: Buffer, baseOffset: number): string {
  let out = '';
  for (let i = 0; i < data.length; i += 16) {
    const row = data.subarray(i, Math.min(i + 16, data.length));
    let hexPart = '';
    let text = '';
    for (const b of row) {
      hexPart += b.toString(16).padStart(2, '0') + ' ';
      text += (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a) ? String.fromCharCode(b) : '.';
    }
    out += `${(baseOffset + i).toString(16).padStart(8, '0')}:  ${hexPart} ${text}\n`;
  }
  return out;
}

/** Index of the first byte of `data` that is not `pattern`, or -1 (compared a block at a time). */
function firstMismatch(data: Buffer, pattern: number, expected: Buffer): number {
  for (let at = 0; at < data.length; at += expected.length) {
    const n = Math.min(expected.length, data.length - at);
    if (data.compare(expected, 0, n, at, at + n) === 0) continue;
    for (let i = at; i < at + n; i++) if (data[i] !== pattern) return i;
  }
  return -1;
}

export async function runRead(a: ReadArgs, io: Output): Promise<number> {
  const image = await Image.open(a.file, { lock: readOnlyLock(LOCK_READ, a.forceShare) });
  try {
    const length = a.length ?? Math.max(0, image.size - a.offset);
    if (a.offset + length > image.size) throw pastTheEnd(a.file, a.offset, length, image.size);
    const raw = a.pattern === undefined && !a.verbose;
    if (raw && io.stdoutIsTTY) throw new UsageError('refusing to write raw disk bytes to a terminal: redirect stdout, or use -v (hexdump) or -P (verify)');
    const sink = raw ? rawSink(io) : null;
    const expected = a.pattern === undefined ? null : Buffer.alloc(PATTERN_BYTES, a.pattern);
    let mismatch = -1;
    // Two buffers: the next chunk is read while this one is written (or checked). A hexdump
    // takes ~4.3 characters a byte: smaller steps keep its strings small.
    const chunkStep = a.verbose ? HEXDUMP_CHUNK_BYTES : RAW_CHUNK_BYTES;
    const chunkBytes = Math.min(chunkStep, length);
    const buffers = [Buffer.allocUnsafe(chunkBytes), Buffer.allocUnsafe(chunkBytes)];
    const zeroLists: number[][] = [[], []];
    const readChunk = (k: number): Promise<void> => {
      const done = k * chunkStep;
      const n = Math.min(chunkStep, length - done);
      const zeros = sink?.sparse ? zeroLists[k % 2] : undefined;
      if (zeros) zeros.length = 0;
      return image.readRange(buffers[k % 2], 0, a.offset + done, n, zeros);
    };
    const chunks = Math.ceil(length / chunkStep);
    let pending = chunks > 0 ? readChunk(0) : null;
    for (let k = 0; k < chunks; k++) {
      await pending;
      // Started before this chunk is written; a failure is seen at the next await.
      pending = k + 1 < chunks ? readChunk(k + 1) : null;
      pending?.catch(() => {});
      const done = k * chunkStep;
      const data = buffers[k % 2].subarray(0, Math.min(chunkStep, length - done));
      if (sink) await sink.write(done, data, sink.sparse ? zeroLists[k % 2] : undefined);
      if (a.verbose && !a.quiet) await io.out(hexdumpLines(data, a.offset + done));
      if (expected && mismatch < 0) {
        const at = firstMismatch(data, a.pattern!, expected);
        if (at >= 0) mismatch = a.offset + done + at;
      }
    }
    if (sink) {
      await sink.finish(length);
      return 0;
    }
    if (mismatch >= 0) {
      await io.out(`Pattern verification failed at offset ${a.offset}, ${length} bytes\n`);
      io.err(`qdedup: first byte that differs from 0x${a.pattern!.toString(16)} is at offset ${mismatch}`);
    }
    if (!a.quiet) await io.out(`read ${length}/${length} bytes at offset ${a.offset}\n`);
    return mismatch >= 0 ? 1 : 0;
  } finally {
    await image.close();
  }
}

export function builder(y: Argv) {
  return withForceShareOption(withQuietOption(withFormatOption(y)))
    .positional('file', { type: 'string', describe: 'image file' })
    .positional('offset', { type: 'string', describe: 'guest byte offset (default 0)' })
    .positional('length', { type: 'string', describe: 'bytes to read (default: to the end of the disk)' })
    .option('P', { type: 'string', describe: 'verify that every byte equals this pattern byte', requiresArg: true })
    .option('v', { type: 'boolean', describe: 'print a hexdump (qemu-io style)', default: false })
    .example('$0 read disk.qcow2 > disk.raw', 'the whole disk as raw bytes')
    .example('$0 read -P 0xab disk.qcow2 0 64k', 'check 64 KiB of 0xab')
    .example('$0 read -v disk.qcow2 0 512 | head', 'hexdump of the first sector');
}

export function toArgs(argv: Record<string, unknown>): ReadArgs {
  checkFormat(argv.f);
  return {
    file: String(argv.file),
    offset: argv.offset === undefined ? 0 : parseSize(String(argv.offset), 'offset'),
    length: argv.length === undefined ? undefined : parseSize(String(argv.length), 'length'),
    pattern: argv.P === undefined ? undefined : parsePattern(String(argv.P)),
    verbose: Boolean(argv.v),
    quiet: Boolean(argv.quiet),
    forceShare: Boolean(argv.U),
  };
}
export const run = runRead;
