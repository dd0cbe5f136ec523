// `qdedup estimate`'s output: the figures of src/dedup/estimate.ts as `zdb -S` prints its
// simulated dedup table (a bucket histogram and a headline per cluster size), and the notes
// for the cluster sizes whose table had to sample to stay within --max-memory.

import { DEFAULT_MAX_MEMORY, histogramTotals, type ClusterSizeEstimate, type Estimate } from '../dedup/estimate.ts';
import { humanSize } from './parse.ts';

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
  const { allocated: alloc, referenced: ref } = histogramTotals(s);
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

/** One note per cluster size sampled more sparsely than `sample` asked: its table would have exceeded `maxMemory`. */
export function samplingNotes(e: Estimate, sample = 1, maxMemory = DEFAULT_MAX_MEMORY): string[] {
  return e['cluster-sizes']
    .filter((s) => s.sample > sample)
    .map(
      (s) =>
        `qdedup: note: the table for cluster size ${s['cluster-size']} would exceed --max-memory ${humanSize(maxMemory)}: sampled 1 in ${s.sample} contents`,
    );
}
