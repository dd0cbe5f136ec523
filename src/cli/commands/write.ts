// `qdedup write`: writes a pattern, an input's bytes or zeroes at a guest offset, like
// qemu-io's `write`, and makes them durable before it exits 0. The input (a file or any
// stream, ../input.ts) is opened and checked before the image is opened for writing, then
// written through the engine's write pipeline (src/image/write-pipeline.ts). SIGINT/SIGTERM/SIGHUP (../interrupt.ts) end the loop after the
// chunk in flight; the image is then committed and closed and an InterruptedError reports
// how much was written. Choices where qemu-io has no equivalent are in docs/COMMANDS.md "write".

import type { Argv } from 'yargs';
import { InterruptedError, IoError, QdedupError, UsageError, printable } from '../../errors.ts';
import { Image } from '../../image/image.ts';
import { checkFormat, refuseForceShare, withFormatOption, withQuietOption } from '../common.ts';
import { pastTheEnd } from '../../image/guest-range.ts';
import { LOCK_WRITE } from '../../image/image-lock.ts';
import { parsePattern, parseSize } from '../parse.ts';
import type { Output } from '../output.ts';
import { startProgress } from '../progress.ts';
import { openInput, type Input } from '../input.ts';
import { catchInterrupts } from '../interrupt.ts';
import { CHUNK_BYTES, ChunkReader, writeChunks } from '../../image/write-pipeline.ts';
import { openForWrite, dedupOf } from '../../dedup/open.ts';

export interface WriteArgs {
  file: string;
  offset: number;
  length?: number;
  pattern?: number;
  input?: string;
  zero: boolean;
  quiet: boolean;
  progress: boolean;
}

export async function runWrite(a: WriteArgs, io: Output): Promise<number> {
  const sources = [a.pattern !== undefined, a.input !== undefined, a.zero].filter(Boolean).length;
  if (sources !== 1) throw new UsageError('give exactly one of -P PATTERN, -i INPUT or -z');
  if (a.input === undefined && a.length === undefined) throw new UsageError('LENGTH is needed with -P and -z');

  // The input is opened and validated before the image is touched (a FIFO waits here for
  // its writer, with the image not yet open), so a bad input leaves the image as it was.
  const input = a.input !== undefined ? await openInput(a.input) : undefined;
  try {
    return await writeFrom(a, input, io);
  } finally {
    await input?.close();
  }
}

async function writeFrom(a: WriteArgs, input: Input | undefined, io: Output): Promise<number> {
  // The number of bytes to write, when it is known before reading: LENGTH, or the size of
  // a regular input file. A stream without LENGTH is written up to its end.
  let total = a.length;
  if (input?.size !== undefined) {
    if (total === undefined) total = input.size;
    else if (input.size < total)
      throw new IoError(`cannot read input: it has only ${input.size} bytes, fewer than LENGTH ${total}`, { path: input.path }, 'ESHORTINPUT');
    if (total === 0 && a.length === undefined) throw emptyInput(input);
  }

  // The range is checked on a read-only open first: a read-write open may already rewrite
  // the header (clearing foreign autoclear bits), and a refused write must leave the file
  // unchanged. Like qemu-io ("write failed: Input/output error"), this is not a usage error.
  // Both opens take the writer's locks (QEMU's image locks), so another holder is refused
  // here, with qemu-io's words, before anything is written (I6, docs/DESIGN.md).
  const probe = await Image.open(a.file, { backing: false, lock: LOCK_WRITE });
  const virtualSize = probe.size;
  await probe.close();
  if (total !== undefined && a.offset + total > virtualSize) throw pastTheEnd(a.file, a.offset, total, virtualSize);
  if (a.offset > virtualSize) throw pastTheEnd(a.file, a.offset, 0, virtualSize);

  // A stream's first chunk is read before the image is opened for writing: an empty stream
  // (a producer that failed) leaves the image untouched.
  // At most `total` bytes when it is known, else one byte more than the room left on the disk:
  // that is how a stream too long for the disk is recognised without reading it all.
  const reader = input ? new ChunkReader(input, total ?? virtualSize - a.offset + 1) : undefined;
  let first: Buffer | undefined;
  if (reader && total !== 0) {
    first = await reader.next();
    if (first.length === 0) {
      if (total === undefined) throw emptyInput(input!);
      throw new IoError(`${input!.label} ended after 0 of ${total} bytes; nothing was written`, { path: a.file }, 'ESHORTINPUT');
    }
    if (a.offset === virtualSize) throw tooLong(a, input!, virtualSize, 0);
  }

  const interrupts = catchInterrupts();
  let done = 0;
  let shortBy: IoError | undefined;
  let overflow: QdedupError | undefined;
  try {
    const image = await openForWrite(a.file, { lock: LOCK_WRITE });
    try {
      if (a.zero) {
        await image.writeZeroes(a.offset, total!);
        done = total!;
      } else if (a.pattern !== undefined) {
        const chunk = Buffer.alloc(Math.min(total!, CHUNK_BYTES), a.pattern);
        while (done < total! && !interrupts.signal.aborted) {
          const n = Math.min(chunk.length, total! - done);
          await image.write(a.offset + done, chunk.subarray(0, n));
          done += n;
        }
      } else if (reader && first) {
        const progress = a.progress && !a.quiet && total !== undefined ? startProgress(io, total) : null;
        try {
          const room = virtualSize - a.offset;
          const r = await writeChunks(image, a.offset, reader, first, {
            room,
            signal: interrupts.signal,
            progress: (n) => {
              done = n;
              progress?.update(n);
            },
          });
          done = r.written;
          // Like dd onto a device: what fits is written (and committed below), the rest refused.
          if (r.overflow) overflow = tooLong(a, input!, virtualSize, done);
        } finally {
          progress?.stop();
        }
        if (!interrupts.signal.aborted && total !== undefined && done < total) {
          shortBy = new IoError(
            `${input!.label} ended after ${done} of ${total} bytes; wrote those ${done} bytes at offset ${a.offset}`,
            { path: a.file },
            'ESHORTINPUT',
          );
        }
      }
      await image.close(); // commits metadata and syncs: durable before exit 0 (I3)
    } catch (err) {
      await image.abandon();
      throw err;
    }
    // After the write, so that a write that fails says one line, its error.
    if (dedupOf(image)?.notice && !a.quiet) io.err(`qdedup: ${printable(a.file)}: ${dedupOf(image)!.notice}`);
    const mismatches = dedupOf(image)?.counters.mismatches ?? 0;
    if (mismatches) {
      // Compared hits whose cluster held other bytes: written anew, but the index lies (src/dedup/slot-bits.ts).
      io.err(
        `qdedup: ${printable(a.file)}: warning: ${mismatches} dedup index ${mismatches === 1 ? 'entry names a cluster' : 'entries name clusters'} ` +
          `holding other content; not used (a damaged index: 'qdedup check --deep' lists such entries)`,
      );
    }
  } finally {
    interrupts.dispose();
  }
  const sig = interrupts.received;
  if (sig) {
    const of = total !== undefined ? `${done} of ${total} bytes` : `${done} bytes (of an input of unknown length)`;
    throw new InterruptedError(sig, `interrupted (${sig}) after writing ${of} at offset ${a.offset}; the data written is durable`, { path: a.file });
  }
  if (overflow) throw overflow;
  if (!a.quiet) await io.out(`wrote ${done}/${total ?? done} bytes at offset ${a.offset}\n`);
  if (shortBy) throw shortBy;
  return 0;
}

/** A stream longer than the room left on the disk (found by reading one byte past it). */
function tooLong(a: WriteArgs, input: Input, virtualSize: number, written: number): QdedupError {
  const room = virtualSize - a.offset;
  return new QdedupError(
    `${input.label} goes past the end of the disk (virtual size ${virtualSize}): ${room} bytes fit from offset ${a.offset}; ` +
      `${written ? `wrote those ${written} bytes, the rest of the input was not written` : 'nothing was written'}`,
    'ERANGE',
    1,
    { path: a.file },
  );
}

/** An input that gave no bytes when no LENGTH was asked for: most likely a producer that failed. */
function emptyInput(input: Input): IoError {
  return new IoError(`${input.label} is empty: nothing to write (give LENGTH 0 to write nothing)`, {}, 'EEMPTYINPUT'); // main.ts names the image
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
    .option('p', { type: 'boolean', describe: 'show a progress bar on stderr (a terminal only)', default: true })
    .option('U', { type: 'boolean', hidden: true }) // refused below, with qemu-io's reason
    .example('$0 write -P 0xab disk.qcow2 0 64k', '64 KiB of 0xab at offset 0')
    .example('$0 write -i data.bin disk.qcow2 1M', 'the bytes of data.bin at 1 MiB')
    .example('zcat disk.raw.gz | $0 write -i - disk.qcow2 0', 'a stream, to its end (exit 1 if it is empty or ends before LENGTH)')
    .example('$0 write -z disk.qcow2 0 1G', 'zero the first GiB')
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
  };
}
export const run = runWrite;
