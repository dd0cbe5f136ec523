// `estimate`'s compression figures: what storing each distinct cluster as one raw deflate
// stream (QEMU's compressed clusters, ../format/deflate.ts) would add to dedup. Compressing
// every distinct cluster would cost far more than hashing it (deflate runs at tens of MB/s,
// SHA-256 at hundreds), so a bounded sample of the distinct contents is compressed and its
// ratio applied to all of them.
//
// The sample is chosen by hash, so it is deterministic and the same whatever the order or
// the repeats of the contents: a content is in it when its SHA-256's bytes 8–11 (a
// little-endian word, independent of the fingerprint table's sampling word, bytes 0–3) are
// ≡ 0 mod `sample`. `sample` starts at 1 (every distinct content) and doubles, dropping the
// contents that leave the sample, whenever more than `limit` contents are held — as the
// fingerprint table samples. So the sample is exact when the distinct data is small, and
// else holds limit/2 to limit contents.
//
// The sampled clusters are copied as they are read (the chunk's buffer is refilled next)
// and compressed only at the end: a content dropped when the sample doubles costs a copy,
// not a compression, so the work is at most `limit` compressions (memory: `limit`
// clusters) whatever the size of the input.

import { UsageError } from '../errors.ts';
import { compressCluster } from '../format/deflate.ts';
import type { ChunkDigest } from './chunk-hasher.ts';

/** Default bytes of distinct clusters compressed per cluster size. */
export const DEFAULT_COMPRESSION_SAMPLE = 16 * 1024 * 1024;
/** Most clusters the default sample holds: each compression costs a zlib stream's setup, which dominates at small clusters. */
export const DEFAULT_COMPRESSION_SAMPLE_CLUSTERS = 4096;
/** Offset in a cluster's SHA-256 of the word that picks the sample. */
const PICK_WORD = 8;

/** The sampled clusters' figures (JSON `compression-sample`). */
export interface CompressionSampleFigures {
  /** 1: every distinct content compressed. N: 1 in N, picked by hash. */
  sample: number;
  /** Distinct clusters compressed. */
  clusters: number;
  /** Their bytes: clusters × cluster size. */
  'input-bytes': number;
  /** What storing them takes: each one's deflate stream, or the cluster size for one that does not shrink. */
  'stored-bytes': number;
  /** Those stored plain (deflate did not make them smaller). */
  'plain-clusters': number;
}

/** The compression figures of one cluster size (keys of ClusterSizeEstimate). */
export interface CompressionFigures {
  /** input-bytes / stored-bytes of the sample, 4 decimals (1 when nothing was sampled). */
  'compression-ratio': number;
  /** allocated-clusters × cluster size, scaled by the sample's stored / input bytes: what a compressed import stores. */
  'compressed-allocated-bytes': number;
  /** Referenced (non-zero guest) bytes / compressed-allocated-bytes: dedup and compression together, 4 decimals. */
  'combined-ratio': number;
  'compression-sample': CompressionSampleFigures;
}

/** Contents the sample holds at most for `bytes` (undefined: the default) at cluster size `cs`. Throws UsageError for a bad `bytes`. */
export function compressionSampleLimit(cs: number, bytes?: number): number {
  if (bytes === undefined) return Math.min(DEFAULT_COMPRESSION_SAMPLE_CLUSTERS, DEFAULT_COMPRESSION_SAMPLE / cs);
  if (!Number.isSafeInteger(bytes) || bytes < 1) throw new UsageError(`invalid compression sample size ${bytes}: 1 byte or more`);
  return Math.max(1, Math.floor(bytes / cs));
}

/** The compression sample of one cluster size. */
export class CompressionSample {
  /** Keep contents whose pick word ≡ 0 mod sample (a power of two). */
  sample = 1;
  /** Copies of the held contents' clusters, by their hash's first 16 bytes. */
  private readonly held = new Map<string, { word: number; data: Buffer }>();
  /** Copies of dropped contents, reused: the copies never take more than limit + 1 clusters. */
  private readonly free: Buffer[] = [];

  /** `limit`: the most contents held (compressionSampleLimit). */
  constructor(
    readonly cs: number,
    readonly limit: number,
  ) {}

  /** Takes in the new sampled contents of a digest of the clusters of `buf` from byte `start` (copies: `buf` is refilled after). */
  pick(buf: Buffer, start: number, digest: ChunkDigest): void {
    const { hashes, zero } = digest;
    for (let i = 0; i < digest.count; i++) {
      if (zero[i]) continue;
      const word = hashes.readUInt32LE(i * 32 + PICK_WORD);
      if (word % this.sample !== 0) continue;
      const key = hashes.toString('latin1', i * 32, i * 32 + 16);
      if (this.held.has(key)) continue;
      const at = start + i * this.cs;
      const data = this.free.pop() ?? Buffer.allocUnsafeSlow(this.cs);
      buf.copy(data, 0, at, at + this.cs);
      this.held.set(key, { word, data });
      // (Past 2^32 only word 0 is kept: more contents than the limit may then stay.)
      while (this.held.size > this.limit && this.sample < 2 ** 32) this.halve();
    }
  }

  /**
   * Compresses the sample and returns the figures for `allocated` stored and `referenced`
   * non-zero guest clusters. Call once, at the end.
   */
  figures(allocated: number, referenced: number): CompressionFigures {
    let stored = 0;
    let plain = 0;
    for (const { data } of this.held.values()) {
      const out = compressCluster(data);
      stored += out ? out.length : this.cs;
      if (!out) plain++;
    }
    const input = this.held.size * this.cs;
    const bytes = input ? Math.round((allocated * this.cs * stored) / input) : allocated * this.cs;
    return {
      'compression-ratio': stored ? round4(input / stored) : 1,
      'compressed-allocated-bytes': bytes,
      'combined-ratio': bytes ? round4((referenced * this.cs) / bytes) : 1,
      'compression-sample': { sample: this.sample, clusters: this.held.size, 'input-bytes': input, 'stored-bytes': stored, 'plain-clusters': plain },
    };
  }

  /** Doubles the sample, dropping the contents that leave it. */
  private halve(): void {
    this.sample *= 2;
    for (const [key, h] of this.held) {
      if (h.word % this.sample === 0) continue;
      this.held.delete(key);
      this.free.push(h.data);
    }
  }
}

const round4 = (x: number) => Math.round(x * 10000) / 10000;
