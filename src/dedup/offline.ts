// Offline deduplication of an existing QCOW2 image, in place (`qdedup dedup`): every cluster
// the image itself holds (data or compressed; a preallocated zero cluster too) is read and
// written back at the same guest offset through the dedup write path, so duplicates are
// linked to one indexed copy, all-zero clusters become zero clusters and each old cluster's
// reference goes. Then the clusters no one references any more are punched out of the file
// and cut off its end (src/image/discard.ts), so its disk usage drops by what was shared.
//
// Clusters are written back compressed with -c, and whenever the image already holds
// compressed clusters (or has compression=on): deduplicating never decompresses an image.
//
// A plain v3 image gets dedup turned on first (extension, store, holder snapshot, as create
// makes them); a dedup image whose index was dropped gets a fresh one, filled by this pass.
// Guest data never changes, and crash safety is the write path's: every step is a write
// through Image.write and a commit in the order of docs/DESIGN.md, so power lost at any
// point leaves the guest data readable and uncorrupted, at worst with leaked clusters.
// Unallocated clusters are not touched (they may read from a backing file).

import { stat } from 'node:fs/promises';
import { QdedupError, UnsupportedError } from '../errors.ts';
import { EXT_DEDUP } from '../format/dedup-ext.ts';
import type { Header } from '../format/header.ts';
import { checkOpenImage, type ImageCheck } from '../image/check-image.ts';
import { discardFreeClusters, type DiscardResult } from '../image/discard.ts';
import { Image, type OpenOptions } from '../image/image.ts';
import type { PreparedChunk } from '../image/write-policy.ts';
import { LOCK_READ, LOCK_WRITE } from '../image/image-lock.ts';
import { CHUNK_BYTES } from '../image/write-pipeline.ts';
import { type Dedup, MIN_DEDUP_REFCOUNT_ORDER, type DedupSettings } from './dedup.ts';
import { attachDedup, initializeDedup } from './attach.ts';
import { dedupAutoclear } from './open.ts';

export interface OfflineOptions {
  /** The dedup settings for an image that has dedup off, given its header and cluster size (not called for a dedup image). */
  settings: (header: Header, clusterSize: number) => DedupSettings;
  signal?: AbortSignal;
  /** Guest bytes passed so far, of the disk's virtual size. */
  progress?: (done: number, total: number) => void;
  /**
   * Store the clusters the pass writes compressed (`-c`). Without it they are compressed all
   * the same when the image already holds compressed clusters or has compression=on: a pass
   * never decompresses an image the user chose to compress.
   */
  compress?: boolean;
  /** Test hook: bytes per chunk (default CHUNK_BYTES), small to make many chunks. */
  chunkBytes?: number;
  /** Test hook: the file to open instead of the path. */
  file?: OpenOptions['file'];
}

export interface OfflineResult {
  /** True when this run turned dedup on (the image had none). */
  enabled: boolean;
  /** Why the old index was not used (null: it was, or dedup was just turned on). */
  notice: string | null;
  /** Clusters the image held, each read and written back. */
  clusters: number;
  /** Of those: linked to an indexed copy, written as the indexed copy, made zero clusters. */
  linked: number;
  stored: number;
  zero: number;
  discard: DiscardResult;
  /** Bytes the file took on the host before and after (st_blocks). */
  bytesBefore: number;
  bytesAfter: number;
  /** Bytes given back to the host: bytesBefore − bytesAfter, 0 when the file grew. */
  bytesReleased: number;
  /** True when a signal stopped the pass early (what was done is committed). */
  interrupted: boolean;
  /** True when the clusters written were stored compressed (-c, compressed clusters in the image, or compression=on). */
  compressed: boolean;
}

/** Buffers of the read/hash/write ring (the chunk written, the next being read and hashed, one spare). */
const RING = 3;

/** Deduplicates the image at `path` in place. Refuses an image `check` finds corrupt. */
export async function dedupInPlace(path: string, o: OfflineOptions): Promise<OfflineResult> {
  // Refcounts decide which clusters are free (to allocate, to punch): they must be right.
  const checked = await checkFirst(path, o);
  if (checked.corruptions > 0) {
    throw new QdedupError(
      `check finds ${checked.corruptions} corruption${checked.corruptions === 1 ? '' : 's'}; repair it first (qdedup check -r all)`,
      'ECORRUPT',
      1,
      { path },
    );
  }
  const bytesBefore = await allocatedBytes(path, o);
  let enabled = false;
  const image = await Image.open(path, {
    writable: true,
    lock: LOCK_WRITE,
    file: o.file,
    keepAutoclear: dedupAutoclear,
    policy: (img, writer) => {
      if (img.header.extensions.some((e) => e.type === EXT_DEDUP)) return attachDedup(img, writer);
      if (img.header.version !== 3 || img.header.refcountOrder < MIN_DEDUP_REFCOUNT_ORDER) {
        throw new UnsupportedError(
          `dedup needs a v3 image (compat=1.1) with refcount_bits of ${2 ** MIN_DEDUP_REFCOUNT_ORDER} or more; 'qdedup convert' makes one`,
          { path },
        );
      }
      enabled = true;
      return initializeDedup(img, writer, o.settings(img.header, img.clusterSize));
    },
  });
  try {
    const dedup = image.policy as Dedup;
    if (o.compress || checked.compressedClusters > 0) dedup.compressWrites();
    const before = { ...dedup.counters };
    const { clusters, interrupted } = await rewriteHeldClusters(image, o);
    await image.flush();
    const discard = await discardFreeClusters(image);
    await image.close();
    const c = dedup.counters;
    const bytesAfter = await allocatedBytes(path, o);
    return {
      enabled,
      notice: dedup.notice,
      clusters,
      interrupted,
      discard,
      linked: c.hits - before.hits,
      stored: c.misses - before.misses,
      zero: c.zeroClusters - before.zeroClusters,
      bytesBefore,
      bytesAfter,
      bytesReleased: Math.max(0, bytesBefore - bytesAfter),
      compressed: dedup.compressing,
    };
  } catch (err) {
    await image.abandon();
    throw err;
  }
}

/** `check` of the image (read-only, locked as qemu-img check locks), before it is opened for writing. */
async function checkFirst(path: string, o: OfflineOptions): Promise<ImageCheck> {
  const image = await Image.open(path, { file: o.file, lock: o.file ? undefined : LOCK_READ });
  try {
    return await checkOpenImage({ path, file: image.file, header: image.header, l1: image.l1, writable: false }, { onMessage: () => {} });
  } finally {
    if (!o.file) await image.close();
  }
}

/** The file's st_blocks bytes (a test's in-memory file: its own count). */
async function allocatedBytes(path: string, o: OfflineOptions): Promise<number> {
  return o.file ? o.file.allocatedBytes() : (await stat(path)).blocks * 512;
}

/**
 * Reads each run of clusters the image holds (up to a chunk) and writes it back at the same
 * offset, as a pipeline: the next run is read and hashed while this one is written.
 */
async function rewriteHeldClusters(image: Image, o: OfflineOptions): Promise<{ clusters: number; interrupted: boolean }> {
  const cs = image.clusterSize;
  const chunk = o.chunkBytes ?? CHUNK_BYTES;
  const ring = Array.from({ length: RING }, () => Buffer.from(new SharedArrayBuffer(chunk - (chunk % cs) || cs)));
  const settled: Promise<void>[] = [];
  let clusters = 0;
  let k = 0;
  type Ready = { offset: number; data: Buffer; prepared: Promise<PreparedChunk> };
  let pending: Ready | null = null;
  const write = async (r: Ready) => {
    await image.write(r.offset, r.data, await r.prepared);
    const done = image.settled();
    done.catch(() => {});
    settled.push(done);
    o.progress?.(r.offset + r.data.length, image.size);
  };
  let pendingClusters = 0;
  for await (const run of heldRuns(image, ring[0].length / cs)) {
    if (o.signal?.aborted) break;
    // Buffer k % RING held the chunk RING runs ago: its writes behind must have ended.
    await settled[settled.length - (RING - 1)];
    const buf = ring[k++ % RING];
    const data = buf.subarray(0, Math.min(run.clusters * cs, image.size - run.first * cs));
    await image.readRange(data, 0, run.first * cs, data.length);
    const ready: Ready = { offset: run.first * cs, data, prepared: image.prepare(data, run.first * cs) };
    ready.prepared.catch(() => {});
    if (pending) {
      await write(pending);
      clusters += pendingClusters;
    }
    pending = ready;
    pendingClusters = run.clusters;
  }
  if (pending && !o.signal?.aborted) {
    await write(pending);
    clusters += pendingClusters;
  }
  await image.settled();
  return { clusters, interrupted: o.signal?.aborted ?? false };
}

/** Runs of consecutive guest clusters that hold a cluster of this image, at most `max` long, in guest order; one L2 table read at a time. */
async function* heldRuns(image: Image, max: number): AsyncGenerator<{ first: number; clusters: number }> {
  const total = Math.ceil(image.size / image.clusterSize);
  let first = -1;
  let n = 0;
  for (let l1Index = 0; l1Index * image.l2Entries < total; l1Index++) {
    const entryOf = await image.l2Reader(l1Index);
    if (!entryOf.allocated) {
      // No table: nothing held here (a sparse disk's empty stretches cost no loop).
      if (n > 0) yield { first, clusters: n };
      n = 0;
      continue;
    }
    const end = Math.min(total, (l1Index + 1) * image.l2Entries);
    for (let g = l1Index * image.l2Entries; g < end; g++) {
      const e = entryOf(g);
      const held = e.kind === 'normal' || e.kind === 'compressed' || (e.kind === 'zero' && e.hostOffset !== 0);
      if (held && n > 0 && first + n === g && n < max) {
        n++;
        continue;
      }
      if (n > 0) yield { first, clusters: n };
      n = 0;
      if (held) {
        first = g;
        n = 1;
      }
    }
  }
  if (n > 0) yield { first, clusters: n };
}
