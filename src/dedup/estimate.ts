// `estimate`: what inline deduplication would save on raw or qcow2 images, without writing
// anything — the dry run of ZFS's `zdb -S`. Reads the guest view of each input once, in
// 8 MiB chunks (chunk k+1 hashed on a worker and k+2 read while k is counted), hashes every
// cluster with SHA-256 at each cluster size asked for, and counts distinct contents in a
// bounded FingerprintTable per size (./fingerprint-table.ts).
//
// Its figures are those of the write path (./dedup.ts writeClusters) importing the same
// bytes into one image: an all-zero cluster becomes a zero cluster (neither stored nor
// deduplicated), every other cluster is stored once per distinct content, and a content
// referenced more than the refcount cap allows gets one more copy per `perCopy`
// references. Each input counts from a cluster boundary, its partial last cluster padded
// with zeros (as a write of it at offset 0 into a fresh image is).
//
// Compression (./compression-sample.ts): a hash-picked sample of the distinct clusters is
// deflated as a compressed import would store them, and its ratio scales the allocated bytes.

import { stat } from 'node:fs/promises';
import { maxRefcount } from '../format/refcount.ts';
import { InternalError, IoError, UsageError } from '../errors.ts';
import { Image } from '../image/image.ts';
import { RawImage, probeFormat, type GuestReader } from '../image/guest-reader.ts';
import type { LockRequest } from '../image/image-lock.ts';
import { ChunkHasher, type ChunkDigest } from './chunk-hasher.ts';
import { CompressionSample, compressionSampleLimit, type CompressionFigures } from './compression-sample.ts';
import { FingerprintTable, maxSlotsFor, type BucketCounts } from './fingerprint-table.ts';

export const DEFAULT_CLUSTER_SIZE = 4096;
export const DEFAULT_MAX_MEMORY = 1024 * 1024 * 1024;
export const DEFAULT_REFCOUNT_BITS = 16;
export const MIN_CLUSTER_SIZE = 512;
export const MAX_CLUSTER_SIZE = 2 * 1024 * 1024;
/** Guest bytes read and hashed per step (a multiple of the largest cluster size). */
const CHUNK_BYTES = 8 * 1024 * 1024;

export type InputFormat = 'auto' | 'raw' | 'qcow2';

export interface EstimateOptions {
  /** Cluster sizes to estimate for (powers of two, 512 B–2 MiB); default [4096]. */
  clusterSizes?: number[];
  /** Format of every input; 'auto' (the default) probes each one. */
  format?: InputFormat;
  /** QEMU's image locks to hold on each input (the CLI: LOCK_READ, or force-shared with -U). */
  lock?: LockRequest;
  /** Count only 1 in `sample` contents from the start (a power of two); default 1. */
  sample?: number;
  /** Bytes all the tables together may use; past it they sample (default 1 GiB). */
  maxMemory?: number;
  /** Refcount width of the image imported into (its cap limits references per copy); default 16. */
  refcountBits?: number;
  /** Bytes of distinct clusters compressed per cluster size for the compression figures (./compression-sample.ts); default 16 MiB, at most 4096 clusters. */
  compressionSample?: number;
  /** Called after each chunk with the guest bytes done and the total. */
  progress?: (done: number, total: number) => void;
}

/** One reference-count bucket of the histogram (`zdb -S`'s rows). */
export interface HistogramRow {
  /** The bucket: contents referenced refcnt to 2 refcnt − 1 times. */
  refcnt: number;
  'allocated-blocks': number;
  'allocated-bytes': number;
  'referenced-blocks': number;
  'referenced-bytes': number;
}

/** The figures of one cluster size (docs/COMMANDS.md "estimate" documents every key). */
export interface ClusterSizeEstimate extends CompressionFigures {
  'cluster-size': number;
  /** Clusters of all inputs, each input rounded up to whole clusters. */
  'guest-clusters': number;
  /** All-zero clusters: zero clusters in the image, neither stored nor deduplicated. */
  'zero-clusters': number;
  /** The other clusters: what the guest references. */
  'referenced-clusters': number;
  /** Data clusters the import stores (distinct contents, plus the refcount cap's copies). */
  'allocated-clusters': number;
  /** referenced / allocated, rounded to 4 decimals (1 when nothing is allocated). */
  'dedup-ratio': number;
  /** (referenced − allocated) × cluster size. */
  'bytes-saved': number;
  /** Copies the refcount cap adds (included in allocated-clusters). */
  'cap-copies': number;
  // Then the CompressionFigures: compression-ratio, compressed-allocated-bytes, combined-ratio, compression-sample.
  /** 1: every content counted. N: 1 in N contents counted and the allocated figures scaled by N. */
  sample: number;
  /** With sample > 1: the relative standard error of allocated-clusters. */
  'sample-error'?: number;
  /** Memory of the fingerprint table at the end. */
  'table-bytes': number;
  histogram: HistogramRow[];
}

export interface EstimateInputInfo {
  filename: string;
  format: 'raw' | 'qcow2';
  'virtual-size': number;
}

export interface Estimate {
  inputs: EstimateInputInfo[];
  /** Guest bytes read: the sum of the inputs' virtual sizes. */
  'input-bytes': number;
  'refcount-bits': number;
  /** The references one physical copy may take before the write path starts another. */
  'references-per-copy': number;
  'cluster-sizes': ClusterSizeEstimate[];
}

/** Most guest references one host cluster takes under the write path's cap (half the refcount maximum, one reference the holder snapshot's). */
export function referencesPerCopy(refcountBits: number): number {
  return Math.floor(maxRefcount(Math.log2(refcountBits)) / 2) - 1;
}

/** The histogram's Total row: allocated and referenced blocks over all its buckets. */
export function histogramTotals(s: ClusterSizeEstimate): { allocated: number; referenced: number } {
  let allocated = 0;
  let referenced = 0;
  for (const r of s.histogram) {
    allocated += r['allocated-blocks'];
    referenced += r['referenced-blocks'];
  }
  return { allocated, referenced };
}

/** Refuses a cluster size the image format does not have (UsageError). */
export function checkClusterSize(n: number): void {
  if (!Number.isSafeInteger(n) || n < MIN_CLUSTER_SIZE || n > MAX_CLUSTER_SIZE || (n & (n - 1)) !== 0) {
    throw new UsageError(`invalid cluster size ${n}: a power of two from 512 to 2M`);
  }
}

interface Input extends EstimateInputInfo {
  reader: GuestReader & Required<Pick<GuestReader, 'readGuestInto'>>;
}

/** Opens one input read-only, as `format` says or as probed. Throws the open errors. */
async function openInput(path: string, format: InputFormat, lock?: LockRequest): Promise<Input> {
  const st = await stat(path).catch(() => null);
  if (st?.isDirectory()) throw new IoError('cannot open: Is a directory', { path }, 'EISDIR');
  // A pipe or character device has no size to read up to (it would estimate as empty).
  if (st && !st.isFile() && !st.isBlockDevice())
    throw new IoError('not a regular file or block device (estimate reads images whole, by size)', { path }, 'EINVAL');
  // probeFormat reads 4 bytes: a shorter file is raw.
  const kind = format !== 'auto' ? format : st?.isFile() && st.size < 4 ? 'raw' : await probeFormat(path);
  if (kind === 'qcow2') {
    const image = await Image.open(path, { lock });
    return { filename: path, format: 'qcow2', 'virtual-size': image.size, reader: image };
  }
  const raw = await RawImage.open(path, lock);
  return { filename: path, format: 'raw', 'virtual-size': raw.size, reader: raw };
}

/** One size's running figures. */
interface SizeState {
  cs: number;
  table: FingerprintTable;
  hasher: ChunkHasher;
  compression: CompressionSample;
  guest: number;
  zero: number;
  referenced: number;
}

/** Step `k` of the pass over all inputs: CHUNK_BYTES of an input (less at its end). Computed, not listed: a hostile virtual size must not cost memory. */
function chunkAt(inputs: Input[], k: number): { input: Input; offset: number; length: number } {
  for (const input of inputs) {
    const n = Math.ceil(input['virtual-size'] / CHUNK_BYTES);
    if (k < n) return { input, offset: k * CHUNK_BYTES, length: Math.min(CHUNK_BYTES, input['virtual-size'] - k * CHUNK_BYTES) };
    k -= n;
  }
  throw new InternalError(`estimate: no chunk ${k}`);
}

/**
 * Estimates the dedup of `paths` imported into one image, at each cluster size. Reads
 * every input whole; writes nothing. Throws the open and read errors, UsageError for bad
 * options.
 */
export async function estimate(paths: string[], options: EstimateOptions = {}): Promise<Estimate> {
  const sizes = [...new Set(options.clusterSizes ?? [DEFAULT_CLUSTER_SIZE])].sort((a, b) => a - b);
  sizes.forEach(checkClusterSize);
  const sample = options.sample ?? 1;
  if (!Number.isSafeInteger(sample) || sample < 1 || sample > 2 ** 30 || (sample & (sample - 1)) !== 0)
    throw new UsageError(`invalid sample ${sample}: a power of two from 1 to 2^30`);
  const refcountBits = options.refcountBits ?? DEFAULT_REFCOUNT_BITS;
  if (![4, 8, 16, 32, 64].includes(refcountBits)) throw new UsageError(`invalid refcount width ${refcountBits}: 4, 8, 16, 32 or 64 (dedup needs 4 or more)`);
  const perCopy = referencesPerCopy(refcountBits);
  const maxSlots = maxSlotsFor((options.maxMemory ?? DEFAULT_MAX_MEMORY) / sizes.length);
  const maxCs = sizes[sizes.length - 1];
  const limits = sizes.map((cs) => compressionSampleLimit(cs, options.compressionSample));

  const inputs: Input[] = [];
  const states: SizeState[] = [];
  try {
    for (const p of paths) inputs.push(await openInput(p, options.format ?? 'auto', options.lock));
    for (const [i, cs] of sizes.entries()) {
      const compression = new CompressionSample(cs, limits[i]);
      states.push({ cs, table: new FingerprintTable(maxSlots, sample), hasher: new ChunkHasher('sha256', cs), compression, guest: 0, zero: 0, referenced: 0 });
    }
    const total = inputs.reduce((n, i) => n + i['virtual-size'], 0);
    const chunkCount = inputs.reduce((n, i) => n + Math.ceil(i['virtual-size'] / CHUNK_BYTES), 0);
    const buffers = [0, 1].map(() => Buffer.from(new SharedArrayBuffer(CHUNK_BYTES)));
    const zeroLists: number[][] = [[], []];
    const read = (k: number): Promise<void> | null => {
      if (k >= chunkCount) return null;
      const { input, offset, length } = chunkAt(inputs, k);
      zeroLists[k % 2].length = 0;
      // Whole clusters of the largest size: past the input they read as zeros (the padding).
      return input.reader.readGuestInto(buffers[k % 2], 0, offset, Math.ceil(length / maxCs) * maxCs, zeroLists[k % 2]);
    };
    const hash = (k: number) => hashChunk(states, buffers[k % 2], chunkAt(inputs, k).length, zeroLists[k % 2]);

    let done = 0;
    await read(0);
    let hashing = quiet(chunkCount ? hash(0) : null);
    let reading = quiet(read(1));
    for (let k = 0; k < chunkCount; k++) {
      // Chunk k's digests free its buffer: chunk k+1 goes to the worker and k+2 is read
      // into k's buffer while the main thread counts k.
      const digests = await hashing!;
      await reading;
      for (const d of digests) if (d.digest) d.state.compression.pick(buffers[k % 2], d.start, d.digest);
      hashing = quiet(k + 1 < chunkCount ? hash(k + 1) : null);
      reading = quiet(read(k + 2));
      count(states, digests);
      done += chunkAt(inputs, k).length;
      options.progress?.(done, total);
    }
    const result: Estimate = {
      inputs: inputs.map(({ filename, format, 'virtual-size': size }) => ({ filename, format, 'virtual-size': size })),
      'input-bytes': total,
      'refcount-bits': refcountBits,
      'references-per-copy': perCopy,
      'cluster-sizes': states.map((s) => figures(s, perCopy)),
    };
    return result;
  } finally {
    for (const s of states) await s.hasher.close();
    for (const i of inputs) await i.reader.close().catch(() => {});
  }
}

/** `p`, its rejection marked handled (it is awaited later, or dropped when an earlier step failed). */
function quiet<T>(p: Promise<T> | null): Promise<T> | null {
  p?.catch(() => {});
  return p;
}

/** What one size's hashing of a chunk found: its clusters, zeros known without hashing, and the digest of the rest (of the clusters from byte `start`). */
interface SizeDigest {
  state: SizeState;
  clusters: number;
  knownZero: number;
  start: number;
  digest: ChunkDigest | null;
}

/**
 * Starts hashing the `length` guest bytes of `buf` at every size. Clusters wholly inside
 * the ranges `zeros` lists (not filled by the read) are zero without hashing; the span from
 * the first to the last other cluster is hashed, after the listed ranges inside it are
 * zero-filled. A chunk all of whose clusters are known zeros costs no hashing at all.
 */
function hashChunk(states: SizeState[], buf: Buffer, length: number, zeros: number[]): Promise<SizeDigest[]> {
  const spans = states.map((state) => {
    const cs = state.cs;
    const clusters = Math.ceil(length / cs);
    const known = new Uint8Array(clusters);
    for (let z = 0; z < zeros.length; z += 2) {
      for (let c = Math.ceil(zeros[z] / cs); c < Math.min(clusters, Math.floor(zeros[z + 1] / cs)); c++) known[c] = 1;
    }
    let first = 0;
    let last = clusters - 1;
    while (first < clusters && known[first]) first++;
    while (last >= first && known[last]) last--;
    return { state, clusters, first, last };
  });
  const from = Math.min(...spans.map((s) => s.first * s.state.cs));
  const to = Math.max(...spans.map((s) => (s.last + 1) * s.state.cs));
  for (let z = 0; z < zeros.length; z += 2) {
    if (zeros[z + 1] > from && zeros[z] < to) buf.fill(0, Math.max(zeros[z], from), Math.min(zeros[z + 1], to));
  }
  return Promise.all(
    spans.map(async ({ state, clusters, first, last }) => {
      const count = last - first + 1;
      const digest = count > 0 ? await state.hasher.digest(buf, first * state.cs, count) : null;
      return { state, clusters, knownZero: clusters - count, start: first * state.cs, digest };
    }),
  );
}

/** Adds a chunk's digests to the tables and counters. */
function count(states: SizeState[], digests: SizeDigest[]): void {
  for (const { state, clusters, knownZero, digest } of digests) {
    state.guest += clusters;
    state.zero += knownZero;
    if (!digest) continue;
    let zero = 0;
    for (let i = 0; i < digest.count; i++) zero += digest.zero[i];
    state.zero += zero;
    state.referenced += digest.count - zero;
    const h = digest.hashes;
    state.table.addDigest(new Uint32Array(h.buffer, h.byteOffset, digest.count * 8), digest.zero, digest.count);
  }
}

/** One size's result; with sampling, the table's figures scaled up. */
function figures(s: SizeState, perCopy: number): ClusterSizeEstimate {
  const n = s.table.sample;
  const rows = s.table.histogram(perCopy);
  const sum = (f: (r: BucketCounts) => number) => rows.reduce((a, r) => a + f(r), 0);
  const allocated = sum((r) => r.copies) * n;
  const referenced = s.referenced;
  const cs = s.cs;
  return {
    'cluster-size': cs,
    'guest-clusters': s.guest,
    'zero-clusters': s.zero,
    'referenced-clusters': referenced,
    'allocated-clusters': allocated,
    'dedup-ratio': allocated === 0 ? 1 : Math.round((referenced / allocated) * 10000) / 10000,
    'bytes-saved': Math.max(0, referenced - allocated) * cs,
    'cap-copies': (sum((r) => r.copies) - sum((r) => r.contents)) * n,
    ...s.compression.figures(allocated, referenced),
    sample: n,
    // Bernoulli sampling of distinct contents with p = 1/n: Var(n·d) = n·D·(1 − p), so the
    // relative standard error of D̂ is √((n − 1) / D).
    ...(n > 1 ? { 'sample-error': allocated ? Math.round(Math.sqrt((n - 1) / allocated) * 1e4) / 1e4 : 0 } : {}),
    'table-bytes': s.table.bytes,
    histogram: rows.map((r) => ({
      refcnt: r.refcnt,
      'allocated-blocks': r.copies * n,
      'allocated-bytes': r.copies * n * cs,
      'referenced-blocks': r.references * n,
      'referenced-bytes': r.references * n * cs,
    })),
  };
}
