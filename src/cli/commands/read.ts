// `qdedup read`: guest bytes to stdout, or verified against a pattern, or as a hexdump,
// like qemu-io's `read`. Streams with two buffers (src/image/guest-chunks.ts): the next
// chunk is read while this one is written; raw output into a regular file is sparse
// (../raw-output.ts).

import type { Argv } from 'yargs';
import { UsageError } from '../../errors.ts';
import { Image } from '../../image/image.ts';
import { READ_CHUNK_BYTES, readGuestChunks } from '../../image/guest-chunks.ts';
import { pastTheEnd } from '../../image/guest-range.ts';
import { PatternCheck } from '../../image/pattern-check.ts';
import { checkFormat, readOnlyLock, withForceShareOption, withFormatOption, withQuietOption } from '../common.ts';
import { LOCK_READ } from '../../image/image-lock.ts';
import { HEXDUMP_CHUNK_BYTES, hexdumpLines } from '../hexdump.ts';
import { parsePattern, parseSize } from '../parse.ts';
import type { Output } from '../output.ts';
import { rawSink } from '../raw-output.ts';

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

export async function runRead(a: ReadArgs, io: Output): Promise<number> {
  const image = await Image.open(a.file, { lock: readOnlyLock(LOCK_READ, a.forceShare) });
  try {
    const length = a.length ?? Math.max(0, image.size - a.offset);
    if (a.offset + length > image.size) throw pastTheEnd(a.file, a.offset, length, image.size);
    const raw = a.pattern === undefined && !a.verbose;
    if (raw && io.stdoutIsTTY) throw new UsageError('refusing to write raw disk bytes to a terminal: redirect stdout, or use -v (hexdump) or -P (verify)');
    const sink = raw ? rawSink(io) : null;
    const verify = a.pattern === undefined ? null : new PatternCheck(a.pattern);
    const step = a.verbose ? HEXDUMP_CHUNK_BYTES : READ_CHUNK_BYTES;
    for await (const { at, data, zeros } of readGuestChunks(image, a.offset, length, step, sink?.sparse)) {
      if (sink) await sink.write(at, data, zeros);
      if (a.verbose && !a.quiet) await io.out(hexdumpLines(data, a.offset + at));
      verify?.check(data, a.offset + at);
    }
    if (sink) {
      await sink.finish(length);
      return 0;
    }
    const mismatch = verify?.firstMismatch ?? -1;
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
