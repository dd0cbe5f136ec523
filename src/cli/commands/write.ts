// `qdedup write`: writes a pattern, a file's bytes or zeroes at a guest offset, like
// qemu-io's `write`, and makes them durable before it exits 0.

import type { Argv } from 'yargs';
import { open } from 'node:fs/promises';
import { UsageError } from '../../errors.ts';
import { ioError } from '../../image/block-file.ts';
import { Image } from '../../image/image.ts';
import { checkFormat, pastTheEnd, refuseForceShare, withFormatOption, withQuietOption } from '../common.ts';
import { LOCK_WRITE } from '../../image/image-lock.ts';
import { parsePattern, parseSize } from '../parse.ts';
import type { Output } from '../output.ts';
import { startProgress } from '../progress.ts';

/** Bytes of input read and written per step of a long write. */
const CHUNK_BYTES = 8 * 1024 * 1024;

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

  // Find the input's length first, so a write past the disk fails before anything is written.
  let stdinData: Buffer | undefined;
  let length = a.length;
  if (a.input === '-') {
    stdinData = await readStdin(length);
    if (length === undefined) length = stdinData.length;
    else if (stdinData.length < length) throw new UsageError(`standard input ended after ${stdinData.length} of ${length} bytes`);
  } else if (a.input !== undefined) {
    let inputSize: number;
    try {
      const fh = await open(a.input, 'r');
      inputSize = (await fh.stat()).size;
      await fh.close();
    } catch (err) {
      throw ioError(err, a.input, 'cannot read input');
    }
    if (length === undefined) length = inputSize;
    else if (inputSize < length) throw new UsageError(`input '${a.input}' has only ${inputSize} bytes, fewer than LENGTH ${length}`);
  }
  const total = length!;

  // The range is checked on a read-only open first: a read-write open may already rewrite
  // the header (clearing foreign autoclear bits), and a refused write must leave the file
  // unchanged. Like qemu-io ("write failed: Input/output error"), this is not a usage error.
  // Both opens take the writer's locks (QEMU's image locks), so another holder is refused
  // here, with qemu-io's words, before anything is written (BRIEF I6).
  const probe = await Image.open(a.file, { backing: false, lock: LOCK_WRITE });
  const virtualSize = probe.size;
  await probe.close();
  if (a.offset + total > virtualSize) throw pastTheEnd(a.file, a.offset, total, virtualSize);
  const image = await Image.open(a.file, { writable: true, lock: LOCK_WRITE });
  try {
    if (a.zero) {
      await image.writeZeroes(a.offset, total);
    } else if (a.pattern !== undefined) {
      const chunk = Buffer.alloc(Math.min(total, CHUNK_BYTES), a.pattern);
      for (let done = 0; done < total; done += chunk.length) {
        await image.write(a.offset + done, chunk.subarray(0, Math.min(chunk.length, total - done)));
      }
    } else if (stdinData) {
      await image.write(a.offset, stdinData.subarray(0, total));
    } else {
      const progress = a.progress && !a.quiet ? startProgress(io, total) : null;
      let fh;
      try {
        fh = await open(a.input!, 'r');
      } catch (err) {
        throw ioError(err, a.input!, 'cannot read input');
      }
      try {
        // Two buffers: the next chunk is read from the input while the current one is written.
        const buffers = [Buffer.alloc(Math.min(total, CHUNK_BYTES)), Buffer.alloc(Math.min(total, CHUNK_BYTES))];
        const readChunk = async (index: number, pos: number): Promise<Buffer> => {
          const buf = buffers[index % 2];
          const want = Math.min(buf.length, total - pos);
          let got = 0;
          while (got < want) {
            const { bytesRead } = await fh!.read(buf, got, want - got, pos + got).catch((err) => { throw ioError(err, a.input!, 'cannot read input'); });
            if (bytesRead === 0) throw new UsageError(`input '${a.input}' ended early, after ${pos + got} bytes`);
            got += bytesRead;
          }
          return buf.subarray(0, want);
        };
        let next = readChunk(0, 0);
        for (let index = 0, done = 0; done < total; index++) {
          const chunk = await next;
          if (done + chunk.length < total) {
            next = readChunk(index + 1, done + chunk.length);
            next.catch(() => {}); // a failed read surfaces at the await above, not as an unhandled rejection
          }
          await image.write(a.offset + done, chunk);
          done += chunk.length;
          progress?.update(done);
        }
      } finally {
        progress?.stop();
        await fh.close();
      }
    }
    await image.close(); // commits metadata and syncs: durable before exit 0 (I3)
  } catch (err) {
    await image.abandon();
    throw err;
  }
  // After the write, so that a write that fails says one line, its error.
  if (image.dedup?.notice) io.err(`qdedup: ${a.file}: ${image.dedup.notice}`);
  const mismatches = image.dedup?.counters.mismatches ?? 0;
  if (mismatches) {
    // Compared hits whose cluster held other bytes: written anew, but the index lies (src/dedup/slot-bits.ts).
    io.err(`qdedup: ${a.file}: warning: ${mismatches} dedup index ${mismatches === 1 ? 'entry names a cluster' : 'entries name clusters'} holding other content; not used (a damaged index: 'qdedup check --deep' lists such entries)`);
  }
  if (!a.quiet) await io.out(`wrote ${total}/${total} bytes at offset ${a.offset}\n`);
  return 0;
}

/** Reads standard input to its end (or `limit` bytes). */
async function readStdin(limit?: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of process.stdin) {
    chunks.push(chunk as Buffer);
    size += (chunk as Buffer).length;
    if (limit !== undefined && size >= limit) break;
  }
  return Buffer.concat(chunks);
}

export const command = 'write <file> <offset> [length]';
export const describe = 'write a pattern, a file or zeroes into an image (like qemu-io write)';

export function builder(y: Argv) {
  return withQuietOption(withFormatOption(y))
    .positional('file', { type: 'string', describe: 'image file' })
    .positional('offset', { type: 'string', describe: 'guest byte offset (size syntax: 1M, 0x100000, …)' })
    .positional('length', { type: 'string', describe: 'bytes to write (default with -i: the whole input)' })
    .option('P', { type: 'string', describe: 'fill with this byte (decimal or 0x hex)', requiresArg: true })
    .option('i', { type: 'string', describe: "write the bytes of this file ('-' for standard input)", requiresArg: true })
    .option('z', { type: 'boolean', describe: 'write zeroes (zero clusters where whole clusters)', default: false })
    .option('p', { type: 'boolean', describe: 'show a progress bar on stderr (a terminal only)', default: true })
    .option('U', { type: 'boolean', hidden: true }) // refused below, with qemu-io's reason
    .example('$0 write -P 0xab disk.qcow2 0 64k', '64 KiB of 0xab at offset 0')
    .example('$0 write -i data.bin disk.qcow2 1M', 'the bytes of data.bin at 1 MiB')
    .example('$0 write -z disk.qcow2 0 1G', 'zero the first GiB');
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
