// `qdedup dedup-stats`: what deduplication saves on an image (guest clusters against the
// data clusters they use) and the state of its dedup store (trust, index size and RAM, log
// store, incarnations, limbo, journal). The figures: src/dedup/stats.ts; this formats them.

import type { Argv } from 'yargs';
import { dedupStats, type DedupStats } from '../../dedup/stats.ts';
import { checkFormat, outputFormat, readOnlyLock, withForceShareOption, withFormatOption, withOutputOption, type OutputFormat } from '../common.ts';
import { LOCK_READ } from '../../image/image-lock.ts';
import { humanSize } from '../parse.ts';
import type { ChalkInstance } from 'chalk';
import { toJson, type Output } from '../output.ts';

export interface DedupStatsArgs {
  file: string;
  output: OutputFormat;
  /** -U: read even while another process writes the image. */
  forceShare?: boolean;
}

/** Human lines, "key: value" aligned on the values, in the order of the JSON keys. */
export function dedupStatsHuman(path: string, s: DedupStats, color?: ChalkInstance): string {
  const headline = (v: string) => (color ? color.green.bold(v) : v);
  const bytes = (n: number) => `${humanSize(n)} (${n} bytes)`;
  const rows: [string, string][] = [
    ['image', path],
    ['virtual size', bytes(s['virtual-size'])],
    ['cluster size', String(s['cluster-size'])],
    ['hash algorithm', s['hash-algorithm']],
    ['trusted', s.reason !== undefined ? `false (${s.reason})` : String(s.trusted)],
    ['dirty', String(s.dirty)],
    ['guest clusters', String(s['guest-clusters'])],
    ['data clusters', String(s['data-clusters'])],
    ['shared clusters', String(s['shared-clusters'])],
    ['dedup ratio', headline(s['dedup-ratio'].toFixed(2))],
    ['bytes saved', headline(bytes(s['bytes-saved']))],
    [
      'compressed',
      `${s.compressed.clusters} clusters in ${s.compressed.copies} copies, ${humanSize(s.compressed['bytes-before'])} stored in ${humanSize(s.compressed['bytes-after'])}`,
    ],
    ['metadata clusters', String(s['metadata-clusters'])],
    ['holder clusters', String(s['holder-clusters'])],
    ['index entries', String(s['index-entries'])],
    ['index RAM', bytes(s['index-ram-bytes'])],
    ['log store', `${s['log-store'].entries} of ${s['log-store'].capacity} slots`],
    ['incarnations', `${s.incarnations.count} (max: ${s.incarnations.max || 'unlimited'})`],
    ['limbo', `${s.limbo} areas`],
    ['journal', `${s.journal['blocks-used']} of ${s.journal['blocks-total']} blocks`],
  ];
  const width = Math.max(...rows.map(([k]) => k.length)) + 1;
  return rows.map(([k, v]) => `${(k + ':').padEnd(width)} ${v}`).join('\n') + '\n';
}

export async function runDedupStats(a: DedupStatsArgs, io: Output): Promise<number> {
  const s = await dedupStats(a.file, readOnlyLock(LOCK_READ, a.forceShare));
  await io.out(a.output === 'json' ? toJson(s) : dedupStatsHuman(a.file, s, io.outColor));
  return 0;
}

export function builder(y: Argv) {
  return withForceShareOption(withOutputOption(withFormatOption(y)))
    .positional('file', { type: 'string', describe: 'image file' })
    .example('$0 dedup-stats disk.qcow2', 'human-readable figures')
    .example('$0 dedup-stats --output json disk.qcow2 | jq \'."dedup-ratio"\'', 'one figure for a script');
}

export function toArgs(argv: Record<string, unknown>): DedupStatsArgs {
  checkFormat(argv.f);
  return { file: String(argv.file), output: outputFormat(argv.output), forceShare: Boolean(argv.U) };
}
export const run = runDedupStats;
