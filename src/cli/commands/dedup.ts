// `qdedup dedup`: offline deduplication of an existing image, in place (src/dedup/offline.ts).
// Parses, runs, reports what was shared and released.

import type { Argv } from 'yargs';
import { InterruptedError } from '../../errors.ts';
import { dedupInPlace, type OfflineResult } from '../../dedup/offline.ts';
import { checkOfflineKeys, offlineDedupSettings } from '../../dedup/create-options.ts';
import { checkFormat, outputFormat, withFormatOption, withOutputOption, withQuietOption, type OutputFormat } from '../common.ts';
import { humanSize, parseBool, parseOptionList, parseSize } from '../parse.ts';
import { toJson, type Output } from '../output.ts';
import { startProgress, type Progress } from '../progress.ts';
import { catchInterrupts } from '../interrupt.ts';

export interface DedupArgs {
  file: string;
  options: string[];
  output: OutputFormat;
  progress: boolean;
  quiet: boolean;
}

export async function runDedup(a: DedupArgs, io: Output): Promise<number> {
  const opts = parseOptionList(a.options);
  checkOfflineKeys(opts); // before the image is touched
  const interrupts = catchInterrupts();
  const showProgress = a.progress && !a.quiet && a.output === 'human';
  let bar = null as Progress | null;
  let r: OfflineResult;
  try {
    r = await dedupInPlace(a.file, {
      settings: (header, clusterSize) => offlineDedupSettings(opts, header, clusterSize, { size: parseSize, bool: parseBool }),
      signal: interrupts.signal,
      progress: showProgress ? (done, total) => (bar ??= startProgress(io, total))?.update(done) : undefined,
    });
  } finally {
    bar?.stop();
    interrupts.dispose();
  }
  const released = Math.max(0, r.bytesBefore - r.bytesAfter);
  if (a.output === 'json') {
    await io.out(
      toJson({
        'dedup-enabled': r.enabled,
        'index-notice': r.notice,
        clusters: r.clusters,
        linked: r.linked,
        stored: r.stored,
        'zero-clusters': r.zero,
        'punched-clusters': r.discard.punched,
        'truncated-clusters': r.discard.truncated,
        'holes-supported': r.discard.holesSupported,
        'bytes-before': r.bytesBefore,
        'bytes-after': r.bytesAfter,
        'bytes-released': released,
        interrupted: r.interrupted,
      }),
    );
  } else if (!a.quiet) {
    if (r.enabled) await io.out(`Deduplication turned on for ${a.file}\n`);
    await io.out(`${r.clusters} clusters read: ${r.linked} linked to a copy, ${r.stored} stored as the indexed copy, ${r.zero} made zero clusters\n`);
    await io.out(
      `Released ${humanSize(released)}: the file takes ${humanSize(r.bytesAfter)} on disk (was ${humanSize(r.bytesBefore)}); ${r.discard.punched} free clusters punched, ${r.discard.truncated} cut off the end\n`,
    );
    if (!r.discard.holesSupported) io.err(`qdedup: ${a.file}: the file system cannot punch holes: free clusters inside the file were left in place`);
  }
  if (interrupts.received)
    throw new InterruptedError(interrupts.received, `interrupted (${interrupts.received}) after ${r.clusters} clusters; what was done is committed`, {
      path: a.file,
    });
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
    .option('p', { type: 'boolean', describe: 'show a progress bar on stderr (a terminal only)', default: true })
    .example('$0 dedup vm.qcow2', 'deduplicate an image QEMU made, in place')
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
  };
}
export const run = runDedup;
