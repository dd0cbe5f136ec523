// `qdedup dedup`: offline deduplication of an existing image, in place (src/dedup/offline.ts).
// Parses, runs, reports what was shared and released (../format-dedup.ts).

import type { Argv } from 'yargs';
import { dedupInPlace, type OfflineResult } from '../../dedup/offline.ts';
import { checkOfflineKeys, offlineDedupSettings } from '../../dedup/create-options.ts';
import { checkFormat, outputFormat, withFormatOption, withOutputOption, withQuietOption, type OutputFormat } from '../common.ts';
import { reportOfflineDedup } from '../format-dedup.ts';
import { parseBool, parseOptionList, parseSize } from '../parse.ts';
import type { Output } from '../output.ts';
import { lazyProgress } from '../progress.ts';
import { catchInterrupts, throwIfInterrupted } from '../interrupt.ts';

export interface DedupArgs {
  file: string;
  options: string[];
  output: OutputFormat;
  progress: boolean;
  quiet: boolean;
  compress: boolean;
}

export async function runDedup(a: DedupArgs, io: Output): Promise<number> {
  const opts = parseOptionList(a.options);
  checkOfflineKeys(opts); // before the image is touched
  const interrupts = catchInterrupts();
  const bar = a.progress && !a.quiet && a.output === 'human' ? lazyProgress(io) : undefined;
  let r: OfflineResult;
  try {
    r = await dedupInPlace(a.file, {
      settings: (header, clusterSize) => offlineDedupSettings(opts, header, clusterSize, { size: parseSize, bool: parseBool }),
      compress: a.compress,
      signal: interrupts.signal,
      progress: bar?.update,
    });
  } finally {
    bar?.stop();
    interrupts.dispose();
  }
  await reportOfflineDedup(a.file, r, a.output, a.quiet, io);
  throwIfInterrupted(interrupts, ` after ${r.clusters} clusters; what was done is committed`, a.file);
  return 0;
}

export function builder(y: Argv) {
  return withQuietOption(withOutputOption(withFormatOption(y)))
    .positional('file', { type: 'string', describe: 'image file (qcow2 v3)' })
    .option('o', {
      type: 'string',
      array: true,
      nargs: 1,
      describe: 'dedup options when turning dedup on: dedup=ALG,dedup_verify=on,dedup_order=N,… (as create)',
      default: [],
      requiresArg: true,
    })
    .option('c', {
      type: 'boolean',
      describe: 'store the clusters written compressed (the default when the image holds compressed clusters or has compression=on)',
      default: false,
    })
    .option('p', { type: 'boolean', describe: 'show a progress bar on stderr (a terminal only)', default: true })
    .example('$0 dedup vm.qcow2', 'deduplicate an image QEMU made, in place')
    .example('$0 dedup -c vm.qcow2', 'deduplicate and compress it')
    .example('$0 dedup -o dedup=blake3 vm.qcow2', 'turn dedup on with blake3')
    .epilogue('Exit codes: 0 done and synced; 1 failed (the image corrupt, v2, in use, …); 130, 143, 129 interrupted (what was done is committed).');
}

export function toArgs(argv: Record<string, unknown>): DedupArgs {
  checkFormat(argv.f);
  return {
    file: String(argv.file),
    options: (argv.o as string[]) ?? [],
    output: outputFormat(argv.output),
    progress: Boolean(argv.p),
    quiet: Boolean(argv.quiet),
    compress: Boolean(argv.c),
  };
}
export const run = runDedup;
