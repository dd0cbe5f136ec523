// `qdedup dedup-stats`: what deduplication saves on an image (guest clusters against the
// data clusters they use) and the state of its dedup store (trust, index size and RAM, log
// store, incarnations, limbo, journal). Read-only: the image is opened read-only and the
// store is replayed in memory (src/dedup/inspect.ts). Keys are documented in README.md.

import type { Argv } from 'yargs';
import { CorruptImageError } from '../../errors.ts';
import { BUCKET_SLOTS } from '../../format/incarnation.ts';
import { Image } from '../../image/image.ts';
import { guestUsage, heldClusters, inspectDedup, storedRefcounts } from '../../dedup/inspect.ts';
import { checkFormat, outputFormat, readOnlyLock, withForceShareOption, withFormatOption, withOutputOption, type OutputFormat } from '../common.ts';
import { LOCK_READ, type LockRequest } from '../../image/image-lock.ts';
import { humanSize } from '../parse.ts';
import type { ChalkInstance } from 'chalk';
import { toJson, type Output } from '../output.ts';

export interface DedupStatsArgs {
  file: string;
  output: OutputFormat;
  /** -U: read even while another process writes the image. */
  forceShare?: boolean;
}

/** The JSON document of `dedup-stats --output json` (README "dedup-stats"). */
export interface DedupStats {
  'virtual-size': number;
  'cluster-size': number;
  /** sha256, sha3-256, blake3 (skein if the image names it), or "off" for a plain image. */
  'hash-algorithm': string;
  trusted: boolean;
  /** Why the store is not trusted (dedup images only). */
  reason?: string;
  dirty: boolean;
  'guest-clusters': number;
  'data-clusters': number;
  'shared-clusters': number;
  'dedup-ratio': number;
  'bytes-saved': number;
  'metadata-clusters': number;
  'holder-clusters': number;
  'index-entries': number;
  'index-ram-bytes': number;
  'log-store': { entries: number; capacity: number };
  incarnations: { count: number; max: number };
  limbo: number;
  journal: { 'blocks-used': number; 'blocks-total': number };
}

/**
 * Computes the figures of `path` without writing to it, holding `lock` (QEMU's image locks;
 * the CLI: LOCK_READ). Throws the open and read errors.
 */
export async function dedupStats(path: string, lock?: LockRequest): Promise<DedupStats> {
  const image = await Image.open(path, { backing: false, lock });
  try {
    const insp = await inspectDedup(image);
    const held = insp.holder
      ? await heldClusters(image, insp.holder, (message, offset) => {
          throw new CorruptImageError(message, { path, offset, structure: 'dedup holder' });
        })
      : null;
    const usage = await guestUsage(image);
    const refcounts = await storedRefcounts(image);
    let shared = 0;
    for (const c of usage.dataClusters) {
      // References other than the holder's: the guest's, and snapshots'.
      if ((await refcounts.get(c)) - (held?.has(c) ? 1 : 0) > 1) shared++;
    }
    const guest = usage.guestClusters;
    const data = usage.dataClusters.size;
    const ext = insp.ext;
    const s = insp.store?.stats();
    const stats: DedupStats = {
      'virtual-size': image.size,
      'cluster-size': image.clusterSize,
      'hash-algorithm': insp.algorithm,
      trusted: insp.trusted,
      ...(ext && !insp.trusted ? { reason: insp.reason ?? 'not trusted' } : {}),
      dirty: ext?.dirty ?? false,
      'guest-clusters': guest,
      'data-clusters': data,
      'shared-clusters': shared,
      'dedup-ratio': data === 0 ? 1 : Math.round((guest / data) * 10000) / 10000,
      'bytes-saved': (guest - data) * image.clusterSize,
      'metadata-clusters': insp.metadataClusters,
      'holder-clusters': insp.holder?.tableClusters ?? 0,
      'index-entries': s?.indexEntries ?? 0,
      'index-ram-bytes': s?.ramBytes ?? 0,
      // Capacity and maximum are settings (the extension's), shown even for an untrusted store.
      'log-store': { entries: s?.logStore.entries ?? 0, capacity: ext ? 2 ** ext.order * BUCKET_SLOTS : 0 },
      incarnations: { count: s?.incarnations.count ?? 0, max: ext?.maxIncarnations ?? 0 },
      limbo: s?.limbo ?? 0,
      journal: { 'blocks-used': s?.journal.blocksUsed ?? 0, 'blocks-total': s?.journal.blocksTotal ?? 0 },
    };
    return stats;
  } finally {
    await image.close();
  }
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
    .example("$0 dedup-stats --output json disk.qcow2 | jq '.\"dedup-ratio\"'", 'one figure for a script');
}

export function toArgs(argv: Record<string, unknown>): DedupStatsArgs {
  checkFormat(argv.f);
  return { file: String(argv.file), output: outputFormat(argv.output), forceShare: Boolean(argv.U) };
}
export const run = runDedupStats;
