// `qdedup estimate`: what dedup would save on raw or qcow2 images, read-only (a dry run
// like ZFS's `zdb -S`). Parses the options, runs src/dedup/estimate.ts, prints its figures
// as zdb's histogram table (../format-estimate.ts) or as JSON (keys documented in
// docs/COMMANDS.md "estimate").

import type { Argv } from 'yargs';
import { UsageError } from '../../errors.ts';
import { estimate, type EstimateOptions, type InputFormat } from '../../dedup/estimate.ts';
import { LOCK_READ } from '../../image/image-lock.ts';
import { outputFormat, readOnlyLock, withForceShareOption, withOutputOption, type OutputFormat } from '../common.ts';
import { estimateHuman, samplingNotes } from '../format-estimate.ts';
import { parseSize } from '../parse.ts';
import { toJson, type Output } from '../output.ts';
import { lazyProgress } from '../progress.ts';

export interface EstimateArgs extends EstimateOptions {
  files: string[];
  output: OutputFormat;
  quiet: boolean;
  progressBar: boolean;
}

export async function runEstimate(a: EstimateArgs, io: Output): Promise<number> {
  const bar = a.progressBar && !a.quiet ? lazyProgress(io) : undefined;
  const e = await estimate(a.files, { ...a, progress: bar?.update }).finally(() => bar?.stop());
  if (!a.quiet) for (const note of samplingNotes(e, a.sample, a.maxMemory)) io.err(note);
  await io.out(a.output === 'json' ? toJson(e) : estimateHuman(e));
  return 0;
}

export function builder(y: Argv) {
  return withForceShareOption(withOutputOption(y))
    .option('quiet', { alias: 'q', type: 'boolean', describe: 'no progress bar and no notes on stderr (the result is still printed)', default: false })
    .positional('files', { type: 'string', array: true, describe: 'raw or qcow2 images, estimated as if imported into one image' })
    .option('f', { type: 'string', describe: 'input format: raw or qcow2 (default: probed for each file)', requiresArg: true })
    .option('cluster-size', { type: 'string', describe: 'cluster sizes to estimate for, comma-separated (512 to 2M)', default: '4k', requiresArg: true })
    .option('sample', { type: 'string', describe: 'count only 1 in N contents (a power of two) and scale up', requiresArg: true })
    .option('max-memory', { type: 'string', describe: 'memory for the tables; past it they sample (default 1G)', requiresArg: true })
    .option('refcount-bits', {
      type: 'string',
      describe: 'refcount width of the target image (its cap limits references per copy)',
      default: '16',
      requiresArg: true,
    })
    .option('compression-sample', {
      type: 'string',
      describe: 'bytes of distinct clusters to compress for the compression ratio, per cluster size (default 16M, at most 4096 clusters)',
      requiresArg: true,
    })
    .option('p', { type: 'boolean', describe: 'show a progress bar on stderr (a terminal only)', default: true })
    .example('$0 estimate rootfs.img', 'dedup ratio and histogram at 4 KiB clusters')
    .example('$0 estimate --cluster-size 4k,64k --output json a.qcow2 b.raw', 'two images together, two cluster sizes');
}

export function toArgs(argv: Record<string, unknown>): EstimateArgs {
  const f = argv.f;
  if (f !== undefined && f !== 'raw' && f !== 'qcow2') throw new UsageError(`unsupported image format '${String(f)}' (estimate reads raw and qcow2)`);
  const whole = (v: unknown, what: string) =>
    (/^[0-9]+$/.test(String(v)) ? Number(v) : Number.NaN) ||
    (() => {
      throw new UsageError(`invalid ${what} '${String(v)}'`);
    })();
  return {
    files: (argv.files as unknown[]).map(String),
    format: (f ?? 'auto') as InputFormat,
    clusterSizes: String(argv['cluster-size'])
      .split(',')
      .map((t) => parseSize(t, 'cluster size')),
    sample: argv.sample === undefined ? undefined : whole(argv.sample, 'sample'),
    maxMemory: argv['max-memory'] === undefined ? undefined : parseSize(String(argv['max-memory']), 'memory size'),
    refcountBits: whole(argv['refcount-bits'], 'refcount width'),
    compressionSample: argv['compression-sample'] === undefined ? undefined : parseSize(String(argv['compression-sample']), 'compression sample size'),
    output: outputFormat(argv.output),
    quiet: Boolean(argv.quiet),
    progressBar: Boolean(argv.p),
    lock: readOnlyLock(LOCK_READ, argv.U),
  };
}
export const run = runEstimate;
