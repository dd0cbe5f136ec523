// `qdedup convert`: qemu-img convert's syntax and meaning. One or more sources (raw or QCOW2,
// concatenated) become a new image: a dedup QCOW2 by default (the options of `create`), or
// raw. The copy itself is src/image/convert.ts, into QCOW2 src/dedup/convert-image.ts; this
// file parses, calls and reports.

import type { Argv } from 'yargs';
import { UsageError } from '../../errors.ts';
import { LOCK_READ } from '../../image/image-lock.ts';
import { copyToRaw, openSources, totalSize } from '../../image/convert.ts';
import { convertIntoImage } from '../../dedup/convert-image.ts';
import { createOptionsHelp, resolveCreateOptions } from '../../dedup/create-options.ts';
import { readOnlyLock, withForceShareOption, withQuietOption } from '../common.ts';
import { parseBool, parseOptionList, parseSize } from '../parse.ts';
import type { Output } from '../output.ts';
import { startProgress } from '../progress.ts';
import { catchInterrupts, throwIfInterrupted } from '../interrupt.ts';

const FORMATS = ['qcow2', 'raw'];

export interface ConvertArgs {
  sources: string[];
  target: string;
  /** -f: the sources' format (probed when absent). */
  sourceFormat?: string;
  /** -O: the target's format. */
  targetFormat: string;
  options: string[];
  /** -n: write into an existing target instead of creating it. */
  noCreate: boolean;
  progress: boolean;
  quiet: boolean;
  forceShare: boolean;
  /** -c: whole clusters stored compressed (a plain target, for now). */
  compress: boolean;
}

export async function runConvert(a: ConvertArgs, io: Output): Promise<number> {
  const opts = parseOptionList(a.options);
  if (opts.has('help')) {
    await io.out(createOptionsHelp(opts));
    return 0;
  }
  if (a.targetFormat === 'raw' && opts.size > 0) throw new UsageError('-o options are for a qcow2 target (-O qcow2)');
  const sources = await openSources(a.sources, a.sourceFormat, readOnlyLock(LOCK_READ, a.forceShare));
  try {
    const total = totalSize(sources);
    const interrupts = catchInterrupts();
    const progress = a.progress && !a.quiet ? startProgress(io, total) : null;
    let copied: number;
    try {
      const o = { signal: interrupts.signal, progress: (n: number) => progress?.update(n) };
      if (a.targetFormat === 'raw') copied = await copyToRaw(a.target, sources, o);
      else {
        const request = { file: a.target, size: String(total), options: opts, force: true };
        const create = a.noCreate ? undefined : await resolveCreateOptions(request, { size: parseSize, bool: parseBool });
        copied = await convertIntoImage(a.target, sources, { ...o, create, compress: a.compress });
      }
    } finally {
      progress?.stop();
      interrupts.dispose();
    }
    throwIfInterrupted(interrupts, ` after copying ${copied} of ${total} bytes; the target is incomplete`, a.target);
    return 0;
  } finally {
    for (const s of sources) await s.close().catch(() => {});
  }
}

export function builder(y: Argv) {
  return withForceShareOption(withQuietOption(y))
    .positional('files', { type: 'string', array: true, describe: 'source images, then the target' })
    .option('f', { type: 'string', describe: 'source format: qcow2 or raw (default: probed)', requiresArg: true })
    .option('O', { type: 'string', describe: 'target format: qcow2 (default) or raw', default: 'qcow2', requiresArg: true })
    .option('o', {
      type: 'string',
      array: true,
      nargs: 1,
      describe: "options of the new image, as create's -o (default: a dedup image, sha256, 4 KiB clusters); -o help lists them",
      default: [],
      requiresArg: true,
    })
    .option('c', {
      type: 'boolean',
      describe: 'store clusters compressed (deflate, as qemu-img convert -c; in a dedup image, the unique ones)',
      default: false,
    })
    .option('n', { type: 'boolean', describe: 'do not create the target: write into an existing image', default: false })
    .option('p', { type: 'boolean', describe: 'show a progress bar on stderr (a terminal only)', default: false })
    .example('$0 convert disk.raw disk.qcow2', 'import a raw disk into a dedup image')
    .example('$0 convert -f qcow2 -o dedup=blake3 vm.qcow2 vm-dedup.qcow2', 'deduplicate a qcow2 image into a new one')
    .example('$0 convert -O raw disk.qcow2 disk.raw', 'export to a sparse raw file')
    .example('$0 convert a.raw b.raw both.qcow2', 'concatenate two sources')
    .example('$0 convert -c -o dedup=off disk.raw small.qcow2', 'a compressed image, as qemu-img convert -c makes')
    .epilogue(
      'Exit codes: 0 converted and synced; 1 failed; 130, 143, 129 interrupted by SIGINT, SIGTERM, SIGHUP (a qcow2 target is committed but ' + 'incomplete).',
    );
}

export function toArgs(argv: Record<string, unknown>): ConvertArgs {
  const files = ((argv.files as unknown[]) ?? []).map(String);
  if (files.length < 2) throw new UsageError('Expecting a source and a target file name');
  const sourceFormat = argv.f === undefined ? undefined : String(argv.f);
  if (sourceFormat !== undefined && !FORMATS.includes(sourceFormat)) throw new UsageError(`Unknown file format '${sourceFormat}' (qcow2 or raw)`);
  const targetFormat = String(argv.O);
  if (!FORMATS.includes(targetFormat)) throw new UsageError(`Unknown file format '${targetFormat}' (qcow2 or raw)`);
  if (targetFormat === 'raw' && argv.n) throw new UsageError('-n is for a qcow2 target');
  if (targetFormat === 'raw' && argv.c) throw new UsageError('-c is for a qcow2 target');
  return {
    sources: files.slice(0, -1),
    target: files[files.length - 1],
    sourceFormat,
    targetFormat,
    options: (argv.o as string[]) ?? [],
    noCreate: Boolean(argv.n),
    progress: Boolean(argv.p),
    quiet: Boolean(argv.quiet),
    forceShare: Boolean(argv.U),
    compress: Boolean(argv.c),
  };
}
export const run = runConvert;
