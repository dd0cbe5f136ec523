// `qdedup write`: writes a pattern, an input's bytes or zeroes at a guest offset, like
// qemu-io's `write`, and makes them durable before it exits 0. The input (a file or any
// stream, ../input.ts) is opened and the write prepared (src/dedup/guest-write.ts) before
// the image is opened for writing; ../format-write.ts reports it. SIGINT/SIGTERM/SIGHUP
// (../interrupt.ts) end the write after the chunk in flight; the image is then committed and
// closed and an InterruptedError reports how much was written. Choices where qemu-io has no
// equivalent are in docs/COMMANDS.md "write".

import type { Argv } from 'yargs';
import { UsageError } from '../../errors.ts';
import { prepareGuestWrite, type GuestWriteResult, type WriteData } from '../../dedup/guest-write.ts';
import { checkFormat, refuseForceShare, withFormatOption, withQuietOption } from '../common.ts';
import { parsePattern, parseSize } from '../parse.ts';
import type { Output } from '../output.ts';
import { lazyProgress } from '../progress.ts';
import { openInput } from '../input.ts';
import { catchInterrupts } from '../interrupt.ts';
import { reportWrite } from '../format-write.ts';

export interface WriteArgs {
  file: string;
  offset: number;
  length?: number;
  pattern?: number;
  input?: string;
  zero: boolean;
  quiet: boolean;
  progress: boolean;
  /** -c: whole clusters stored compressed (a plain image). */
  compress: boolean;
}

export async function runWrite(a: WriteArgs, io: Output): Promise<number> {
  const sources = [a.pattern !== undefined, a.input !== undefined, a.zero].filter(Boolean).length;
  if (sources !== 1) throw new UsageError('give exactly one of -P PATTERN, -i INPUT or -z');
  if (a.input === undefined && a.length === undefined) throw new UsageError('LENGTH is needed with -P and -z');

  // The input is opened and validated before the image is touched (a FIFO waits here for
  // its writer, with the image not yet open), so a bad input leaves the image as it was.
  const input = a.input !== undefined ? await openInput(a.input) : undefined;
  try {
    const data: WriteData = input
      ? { kind: 'source', source: input, length: a.length }
      : a.zero
        ? { kind: 'zeroes', length: a.length! }
        : { kind: 'pattern', byte: a.pattern!, length: a.length! };
    const write = await prepareGuestWrite(a.file, a.offset, data, { compress: a.compress });
    const interrupts = catchInterrupts();
    const bar = a.progress && !a.quiet ? lazyProgress(io) : undefined;
    let r: GuestWriteResult;
    try {
      r = await write.run({ signal: interrupts.signal, progress: bar?.update });
    } finally {
      bar?.stop();
      interrupts.dispose();
    }
    await reportWrite(a.file, a.offset, r, interrupts, a.quiet, io);
    return 0;
  } finally {
    await input?.close();
  }
}

export function builder(y: Argv) {
  return withQuietOption(withFormatOption(y))
    .positional('file', { type: 'string', describe: 'image file' })
    .positional('offset', { type: 'string', describe: 'guest byte offset (size syntax: 1M, 0x100000, …)' })
    .positional('length', { type: 'string', describe: 'bytes to write (default with -i: the whole input)' })
    .option('P', { type: 'string', describe: 'fill with this byte (decimal or 0x hex)', requiresArg: true })
    .option('i', {
      type: 'string',
      describe: "write the bytes of this file or stream ('-' for standard input; pipes, FIFOs and <(…) are read to their end or LENGTH)",
      requiresArg: true,
    })
    .option('z', { type: 'boolean', describe: 'write zeroes (zero clusters where whole clusters)', default: false })
    .option('c', { type: 'boolean', describe: 'store whole clusters compressed, as qemu-io write -c (in a dedup image: the unique ones)', default: false })
    .option('p', { type: 'boolean', describe: 'show a progress bar on stderr (a terminal only)', default: true })
    .option('U', { type: 'boolean', hidden: true }) // refused below, with qemu-io's reason
    .example('$0 write -P 0xab disk.qcow2 0 64k', '64 KiB of 0xab at offset 0')
    .example('$0 write -i data.bin disk.qcow2 1M', 'the bytes of data.bin at 1 MiB')
    .example('zcat disk.raw.gz | $0 write -i - disk.qcow2 0', 'a stream, to its end (exit 1 if it is empty or ends before LENGTH)')
    .example('$0 write -z disk.qcow2 0 1G', 'zero the first GiB')
    .example('$0 write -c -i data.bin plain.qcow2 0', 'the bytes of data.bin, compressed')
    .epilogue(
      'Exit codes: 0 written and synced; 1 failed (an input that ends before LENGTH or is empty, a stream longer than the disk: what was written is ' +
        'committed); 130, 143, 129 interrupted by SIGINT, SIGTERM, SIGHUP after committing what was written.',
    );
}

export function toArgs(argv: Record<string, unknown>): WriteArgs {
  checkFormat(argv.f);
  refuseForceShare(argv.U, 'with write');
  return {
    file: String(argv.file),
    offset: parseSize(String(argv.offset), 'offset'),
    length: argv.length === undefined ? undefined : parseSize(String(argv.length), 'length'),
    pattern: argv.P === undefined ? undefined : parsePattern(String(argv.P)),
    input: argv.i === undefined ? undefined : String(argv.i),
    zero: Boolean(argv.z),
    quiet: Boolean(argv.quiet),
    progress: Boolean(argv.p),
    compress: Boolean(argv.c),
  };
}
export const run = runWrite;
