// Hash benchmark: MB/s (10^6 B/s) hashing random 4 KiB clusters with each candidate
// implementation, median of 3 timed runs after a short warm-up. Runs disturbed by other
// processes (this 2-vCPU machine is shared) are detected from /proc/stat and repeated. Figures back the choices
// in src/dedup/hasher.ts (its header comment) and docs/PERFORMANCE.md's "Hashing" section.
//
// Usage: npm run bench:hash [-- --mib N] [--batch-mib M] [--only SUBSTRING]
//   --mib N        data hashed per run (default 256)
//   --batch-mib M  batch size of the batch rows (default 8)
//   --only S       run only the rows whose label contains S
//
// "per cluster" rows make one call per 4 KiB cluster. "batch" rows hash M MiB batches held
// through src/dedup/hasher.ts on the main thread, or through the write pipeline's chunk
// hasher (src/dedup/chunk-hasher.ts): a worker hashing batches in shared memory in place,
// one message per batch (zero-cluster test included).

import crypto from 'node:crypto';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import { parseArgs } from 'node:util';
import { sha256 as nobleSha256 } from '@noble/hashes/sha2.js';
import { sha3_256 as nobleSha3 } from '@noble/hashes/sha3.js';
import { blake3 as nobleBlake3 } from '@noble/hashes/blake3.js';
import { clustersInto, createHasher, type SupportedHashAlgorithm } from '../src/dedup/hasher.ts';
import { ChunkHasher } from '../src/dedup/chunk-hasher.ts';
import { nativeSha256 } from '../src/dedup/native-sha256.ts';

const { values } = parseArgs({
  options: {
    mib: { type: 'string', default: '256' },
    'batch-mib': { type: 'string', default: '8' },
    only: { type: 'string' },
  },
});
const CLUSTER = 4096;
const MAX_ATTEMPTS = 8;
const TOTAL = Number(values.mib) * 1024 * 1024;
const BATCH = Number(values['batch-mib']) * 1024 * 1024;
if (!(TOTAL >= BATCH && BATCH >= CLUSTER && TOTAL % BATCH === 0 && BATCH % CLUSTER === 0)) {
  console.error('bench-hash: --mib must be a multiple of --batch-mib, both at least 4 KiB');
  process.exit(1);
}

interface Row {
  label: string;
  /** Hashes data[0, TOTAL) once. */
  run: (data: Buffer) => void | Promise<void>;
  /** Given the data in shared memory (as the write pipeline's chunks are). */
  shared?: boolean;
}

function perCluster(label: string, f: (cluster: Buffer) => unknown): Row {
  return {
    label,
    run: (data) => {
      for (let at = 0; at < data.length; at += CLUSTER) f(data.subarray(at, at + CLUSTER));
    },
  };
}

function batches(label: string, f: (batch: Buffer) => unknown): Row {
  return {
    label,
    run: async (data) => {
      for (let at = 0; at < data.length; at += BATCH) await f(data.subarray(at, at + BATCH));
    },
  };
}

const sync = {
  sha256: createHasher('sha256'),
  'sha3-256': createHasher('sha3-256'),
  blake3: createHasher('blake3'),
};
const workers: ChunkHasher[] = [];
/** A chunk hasher whose worker hashes batches in place: the data is copied into shared memory once, before timing. */
function worker(alg: SupportedHashAlgorithm): ChunkHasher {
  const h = new ChunkHasher(alg, CLUSTER);
  workers.push(h);
  return h;
}

const native = nativeSha256();
const nativeOut = Buffer.alloc(32);
const batchLabel = `${values['batch-mib']} MiB batches`;
const rows: Row[] = [
  perCluster('sha256    node:crypto crypto.hash()', (b) => crypto.hash('sha256', b, 'buffer')),
  perCluster('sha256    node:crypto createHash()', (b) => crypto.createHash('sha256').update(b).digest()),
  perCluster('sha256    @noble/hashes', (b) => nobleSha256(b)),
  ...(native ? [perCluster('sha256    OpenSSL SHA256_* via koffi, one at a time', (b) => native(b, 0, b.length, 1, nativeOut, 0))] : []),
  perCluster('sha3-256  node:crypto crypto.hash()', (b) => crypto.hash('sha3-256', b, 'buffer')),
  perCluster('sha3-256  node:crypto createHash()', (b) => crypto.createHash('sha3-256').update(b).digest()),
  perCluster('sha3-256  @noble/hashes', (b) => nobleSha3(b)),
  perCluster('blake3    @noble/hashes', (b) => nobleBlake3(b)),
  perCluster('blake3    qdedup (hasher.ts)', (b) => sync.blake3.hash(b)),
];
for (const alg of ['sha256', 'sha3-256', 'blake3'] as const) {
  const name = alg.padEnd(9);
  const into = clustersInto(alg);
  rows.push(
    batches(`${name} clustersInto, main thread, ${batchLabel}`, (b) => {
      const out = Buffer.allocUnsafe((b.length / CLUSTER) * 32);
      into(b, 0, CLUSTER, b.length / CLUSTER, out, 0);
      return out;
    }),
  );
  const w = worker(alg);
  rows.push({ ...batches(`${name} ChunkHasher worker, shared memory, ${batchLabel}`, (b) => w.digest(b, 0, b.length / CLUSTER)), shared: true });
}

// CPU time used by other processes during a run (in % of one core), from /proc/stat minus
// our own process (all threads): this 2-vCPU machine is shared, and a busy second core
// makes the worker rows meaningless. Linux only; elsewhere the column shows '-'.
function systemBusyMs(): number | undefined {
  try {
    const f = readFileSync('/proc/stat', 'latin1').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal
    const busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    return (busy * 1000) / 100; // USER_HZ is 100 on Linux
  } catch {
    return undefined;
  }
}
function ownCpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

const selected = rows.filter((r) => !values.only || r.label.includes(values.only));
const cpu = os.cpus();
console.log(`hash benchmark: ${values.mib} MiB of random 4 KiB clusters per run, median of 3 after a warm-up`);
console.log(`Node ${process.version}, OpenSSL ${process.versions.openssl}, ${cpu.length} × ${cpu[0]?.model ?? '?'}`);
const plainData = Buffer.allocUnsafe(TOTAL);
for (let at = 0; at < TOTAL; at += 64 * 1024 * 1024) crypto.randomFillSync(plainData, at, Math.min(64 * 1024 * 1024, TOTAL - at));
const sharedData = selected.some((r) => r.shared) ? Buffer.from(new SharedArrayBuffer(TOTAL)) : plainData;
if (sharedData !== plainData) plainData.copy(sharedData);

const width = Math.max(...selected.map((r) => r.label.length));
console.log(`${'option'.padEnd(width)}  ${'MB/s'.padStart(7)}  ${'µs/4K'.padStart(7)}  ${'others'.padStart(6)}  runs (MB/s)`);
console.log(`${'-'.repeat(width)}  -------  -------  ------  -----------`);
let noisy = false;
for (const row of selected) {
  const data = row.shared ? sharedData : plainData;
  // Warm-up: a sixteenth of the data (at least one batch), untimed; lets the worker start.
  await row.run(data.subarray(0, Math.max(BATCH, Math.floor(TOTAL / 16 / BATCH) * BATCH)));
  // Median of 3 clean runs: a run during which other processes used more than 10 % of a
  // core is discarded and repeated, up to MAX_ATTEMPTS runs in all; then the 3 quietest.
  const runs: { mbs: number; others: number }[] = [];
  for (let attempt = 0; attempt < MAX_ATTEMPTS && runs.filter((r) => r.others <= 0.1).length < 3; attempt++) {
    const sys0 = systemBusyMs();
    const own0 = ownCpuMs();
    const t = performance.now();
    await row.run(data);
    const wall = performance.now() - t;
    const sys1 = systemBusyMs();
    const others = sys0 !== undefined && sys1 !== undefined ? Math.max(0, (sys1 - sys0 - (ownCpuMs() - own0)) / wall) : 0;
    runs.push({ mbs: TOTAL / (wall / 1000) / 1e6, others });
  }
  const kept = [...runs].sort((a, b) => a.others - b.others).slice(0, 3);
  const median = kept.map((r) => r.mbs).sort((a, b) => a - b)[1];
  const worst = Math.max(...kept.map((r) => r.others));
  const us = (CLUSTER / (median * 1e6)) * 1e6;
  const othersText = systemBusyMs() === undefined ? '-' : `${Math.round(worst * 100)}%${worst > 0.1 ? '*' : ''}`;
  if (worst > 0.1) noisy = true;
  console.log(
    `${row.label.padEnd(width)}  ${median.toFixed(1).padStart(7)}  ${us.toFixed(2).padStart(7)}  ${othersText.padStart(6)}  ${kept.map((r) => r.mbs.toFixed(0)).join(' ')}`,
  );
}
console.log('others: CPU time other processes used during the worst kept run, in % of one core (/proc/stat).');
if (noisy) console.log(`*: fewer than 3 quiet runs in ${MAX_ATTEMPTS}: the machine was busy, so these figures (the worker rows above all) are low.`);
await Promise.all(workers.map((w) => w.close()));
