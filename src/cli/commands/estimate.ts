// `qdedup estimate`: what dedup would save on raw or qcow2 images, read-only (a dry run
// like ZFS's `zdb -S`). Parses the options, runs src/dedup/estimate.ts, prints its figures
// as zdb's histogram table or as JSON (keys documented in docs/COMMANDS.md "estimate").

import type { Argv } from 'yargs';
import { UsageError } from '../../errors.ts';
import { estimate, DEFAULT_MAX_MEMORY, type ClusterSizeEstimate, type Estimate, type EstimateOptions, type InputFormat } from '../../dedup/estimate.ts';
import { LOCK_READ } from '../../image/image-lock.ts';
import { outputFormat, readOnlyLock, withForceShareOption, withOutputOption, type OutputFormat } from '../common.ts';
import { humanSize, parseSize } from '../parse.ts';
import { toJson, type Output } from '../output.ts';
import { startProgress } from '../progress.ts';

export interface EstimateArgs extends EstimateOptions {
  files: string[];
  output: OutputFormat;
  quiet: boolean;
  progressBar: boolean;
}

/** zdb's nicenum for a count: 512, 1K, 32K, 1M. */
const nice = (n: number) => (n < 1024 ? String(n) : n < 1024 ** 2 ? `${n / 1024}K` : `${n / 1024 ** 2}M`);

/** One cluster size as `zdb -S` prints its simulated DDT: the bucket table, then the headline. */
export function sizeHuman(s: ClusterSizeEstimate): string {
  const row = (a: string, b: string, c: string, d: string, e: string) =>
    `${a.padStart(6)}   ${b.padStart(10)} ${c.padStart(11)}   ${d.padStart(10)} ${e.padStart(11)}\n`;
  let t = `Simulated dedup table, cluster size ${s['cluster-size']}:\n\n`;
  t += 'bucket              allocated                  referenced\n';
  t += '______   ______________________   ______________________\n';
  t += row('refcnt', 'blocks', 'size', 'blocks', 'size') + row('------', '------', '----', '------', '----');
  for (const r of s.histogram)
    t += row(nice(r.refcnt), String(r['allocated-blocks']), humanSize(r['allocated-bytes']), String(r['referenced-blocks']), humanSize(r['referenced-bytes']));
  const sum = (k: 'allocated-blocks' | 'referenced-blocks') => s.histogram.reduce((a, r) => a + r[k], 0);
  const [alloc, ref] = [sum('allocated-blocks'), sum('referenced-blocks')];
  t += row('Total', String(alloc), humanSize(alloc * s['cluster-size']), String(ref), humanSize(ref * s['cluster-size'])) + '\n';
  t += `dedup = ${s['dedup-ratio'].toFixed(2)}, saved = ${humanSize(s['bytes-saved'])} (${s['bytes-saved']} bytes), zero clusters = ${s['zero-clusters']} of ${s['guest-clusters']}\n`;
  t += `compress = ${s['compression-ratio'].toFixed(2)}, dedup * compress = ${s['combined-ratio'].toFixed(2)}, stored compressed = ${humanSize(s['compressed-allocated-bytes'])} (${s['compressed-allocated-bytes']} bytes)\n`;
  const c = s['compression-sample'];
  if (c.clusters)
    t += `compressed ${c.sample > 1 ? `1 in ${c.sample}` : 'all'} distinct clusters: ${c.clusters} (${humanSize(c['input-bytes'])} into ${humanSize(c['stored-bytes'])}), ${c['plain-clusters']} stored plain\n`;
  if (s['cap-copies']) t += `refcount cap: ${s['cap-copies']} extra copies (included above)\n`;
  if (s.sample > 1)
    t += `sampled: 1 in ${s.sample} contents counted, allocated figures scaled up (relative standard error ${(s['sample-error']! * 100).toFixed(2)} %)\n`;
  return t;
}

export function estimateHuman(e: Estimate): string {
  const head = e.inputs.map((i) => `${i.filename}: ${i.format}, ${humanSize(i['virtual-size'])} (${i['virtual-size']} bytes)\n`).join('');
  return head + e['cluster-sizes'].map((s) => '\n' + sizeHuman(s)).join('');
}

export async function runEstimate(a: EstimateArgs, io: Output): Promise<number> {
  let bar: ReturnType<typeof startProgress> | undefined; // null: no bar (not a terminal)
  const progress =
    a.progressBar && !a.quiet ? (done: number, total: number) => (bar === undefined ? (bar = startProgress(io, total)) : bar)?.update(done) : undefined;
  const e = await estimate(a.files, { ...a, progress }).finally(() => bar?.stop());
  for (const s of e['cluster-sizes']) {
    if (s.sample > (a.sample ?? 1) && !a.quiet)
      io.err(
        `qdedup: note: the table for cluster size ${s['cluster-size']} would exceed --max-memory ${humanSize(a.maxMemory ?? DEFAULT_MAX_MEMORY)}: sampled 1 in ${s.sample} contents`,
      );
  }
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
