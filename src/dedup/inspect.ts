// The dedup store's part of `check`: every entry a lookup can return (liveEntries), their
// verification (each names a held, allocated cluster; with `deep`, one whose bytes hash to
// the entry's hash), and the CheckExtension that src/image/check.ts calls. Whether the store
// is trusted at all is judgeStore()'s verdict (./judge-store.ts). Reads only.
//
// Memory stays bounded by the file, not by fields read from it: cluster sets are bitmaps over
// the file's clusters, incarnation tables are read in 1 MiB chunks, and whether a younger
// incarnation shadows a slot is asked of the hash store's own lookup (its filters, and its
// slot cache of at most 16 MiB).

import { CorruptImageError, hex } from '../errors.ts';
import { AUTOCLEAR_DEDUP } from '../format/dedup-ext.ts';
import { HASH_ENTRY_BYTES, isStreamEntry, streamLengthOf } from '../format/hash-entry.ts';
import { STREAM_HEADER_BYTES, framedStreamsTouching } from '../format/stream-header.ts';
import { inflateCluster } from '../format/deflate.ts';
import { compressedReadLength } from '../format/l1l2.ts';
import { BUCKET_SLOTS, SLOT_USED, bucketMask, decodeIncarnationSlot, firstBucket, secondBucket, tagOf } from '../format/incarnation.ts';
import type { CheckExtension, ExtensionReport } from '../image/check-image.ts';
import type { Image } from '../image/image.ts';
import type { Refcounts } from '../image/refcounts.ts';
import { ClusterSet, clusterSetFor, clusterSpan, heldClusters, storedRefcounts } from './clusters.ts';
import { createHasher, type Hasher } from './hasher.ts';
import { judgeStore, type StoreArea, type StoreVerdict } from './judge-store.ts';
import type { DedupStore } from './store.ts';

/** Incarnation table bytes read at once by a verification. */
const TABLE_READ_BYTES = 1024 * 1024;

// ---------------------------------------------------------------- the index

/** One entry a lookup can return, and where it lives. */
export interface LiveEntry {
  hash: Buffer;
  hostOffset: number;
  /** The guest offset field (a stream entry's length in its low bits: ../format/hash-entry.ts). */
  guestField: number;
  /** "current log store", "frozen log store" or "incarnation K slot S". */
  where: string;
}

/**
 * Every entry a lookup can return: used slots of the current log store; of the frozen one,
 * those the current one does not shadow; of each incarnation (youngest first), the used
 * slots a lookup reaches (right bucket, right tag) that no younger layer shadows. Deleted
 * hashes (tombstones) and shadowed stale entries are not entries: a lookup never returns them.
 */
export async function* liveEntries(image: Image, store: DedupStore): AsyncGenerator<LiveEntry> {
  const logs = store.logStores();
  const names = ['current log store', 'frozen log store'];
  for (let k = 0; k < logs.length; k++) {
    const ls = logs[k];
    for (let s = 0; s < ls.slots; s++) {
      if (ls.states[s] !== SLOT_USED) continue;
      const hash = ls.hashAt(s);
      if (logs.slice(0, k).some((younger) => younger.find(hash) >= 0)) continue;
      yield { hash: Buffer.from(hash), hostOffset: ls.hostOffsets[s], guestField: ls.guestOffsets[s], where: names[k] };
    }
  }
  const hs = store.hashStore;
  const { slots, tableOffset } = hs.layout;
  const perChunk = Math.max(1, Math.floor(TABLE_READ_BYTES / HASH_ENTRY_BYTES));
  const mask = bucketMask(hs.order);
  for (let k = 0; k < hs.incarnations.length; k++) {
    const inc = hs.incarnations[k];
    for (let first = 0; first < slots; first += perChunk) {
      const n = Math.min(perChunk, slots - first);
      let chunk: Buffer | null = null;
      for (let i = 0; i < n; i++) {
        const s = first + i;
        if (hs.tagAt(k, s) === 0) continue;
        chunk ??= await image.file.read(inc.record.offset + tableOffset + first * HASH_ENTRY_BYTES, n * HASH_ENTRY_BYTES);
        const slot = decodeIncarnationSlot(chunk, i * HASH_ENTRY_BYTES);
        if (slot.tombstone) continue;
        const bucket = Math.floor(s / BUCKET_SLOTS);
        const b1 = firstBucket(slot.hash, mask);
        if ((bucket !== b1 && bucket !== secondBucket(slot.hash, mask, b1)) || hs.tagAt(k, s) !== tagOf(slot.hash)) continue; // never reached by a lookup
        if (logs.some((ls) => ls.find(slot.hash) >= 0)) continue;
        if (hs.youngestHolding(slot.hash) < k) continue; // shadowed by a younger incarnation (an entry or a tombstone)
        yield { hash: slot.hash, hostOffset: slot.hostOffset, guestField: slot.firstGuestOffset, where: `incarnation ${k} slot ${s}` };
      }
    }
  }
}

/** Problem lines kept by a verification (the count stays exact beyond it). */
export const MAX_PROBLEM_LINES = 10_000;

export interface IndexVerification {
  /** Live entries examined. */
  checked: number;
  /** Entries found bad. */
  bad: number;
  /** One line per bad entry, QEMU style ("ERROR dedup index: …"), at most MAX_PROBLEM_LINES. */
  lines: string[];
}

/**
 * Verifies every live index entry: its host offset is cluster aligned and inside the file,
 * the holder holds the cluster, its stored refcount is at least 1; with `deep`, the
 * cluster's bytes hash to the entry's hash. Reads only.
 */
export async function verifyIndex(
  image: Image,
  store: DedupStore,
  held: ClusterSet,
  refcounts: Refcounts,
  hasher: Hasher,
  deep: boolean,
  areas: StoreArea[] = [],
): Promise<IndexVerification> {
  const cs = image.clusterSize;
  const fileSize = await image.file.size();
  const out: IndexVerification = { checked: 0, bad: 0, lines: [] };
  // The store's own clusters are held too: an entry naming one must never be linked (I1).
  const storeClusters = await clusterSetFor(image);
  const areaOf = new Map<number, string>();
  for (const a of areas) {
    const [first, last] = clusterSpan(a.offset, a.bytes, cs);
    for (let c = first; c <= last; c++) {
      if (storeClusters.add(c) && areaOf.size < MAX_PROBLEM_LINES) areaOf.set(c, a.what);
    }
  }
  for await (const e of liveEntries(image, store)) {
    out.checked++;
    const c = Math.floor(e.hostOffset / cs); // (a compressed copy's: the cluster it starts in)
    const problem =
      Number.isSafeInteger(c) && storeClusters.has(c)
        ? `cluster belongs to the dedup store (${areaOf.get(c) ?? 'store area'}), not to guest data`
        : await entryProblem(e, { image, cs, fileSize, held, refcounts, hasher, deep });
    if (problem === null) continue;
    out.bad++;
    if (out.lines.length < MAX_PROBLEM_LINES)
      out.lines.push(`ERROR dedup index: hash ${e.hash.toString('hex')} (${e.where}) -> ${hex(e.hostOffset)}: ` + `${problem}`);
  }
  return out;
}

/** What an entry is checked against: the image, its held clusters and stored refcounts, the hasher; `deep` hashes contents. */
interface EntryContext {
  image: Image;
  cs: number;
  fileSize: number;
  held: ClusterSet;
  refcounts: Refcounts;
  hasher: Hasher;
  deep: boolean;
}

async function entryProblem(e: LiveEntry, x: EntryContext): Promise<string | null> {
  const { image, cs, fileSize, held, refcounts, hasher, deep } = x;
  if (isStreamEntry(e.hostOffset, cs)) return streamProblem(e, x);
  if (e.hostOffset === 0) return 'host offset is 0';
  if (e.hostOffset >= fileSize) return 'cluster is past the end of the file';
  const cluster = e.hostOffset / cs;
  if (!held.has(cluster)) return 'cluster is not held by the dedup holder snapshot';
  const refcount = await refcounts.get(cluster);
  if (refcount < 1) return 'cluster is not allocated (refcount 0)';
  if (deep) {
    const actual = hasher.hash(await image.file.read(e.hostOffset, cs));
    if (!actual.equals(e.hash)) return `cluster content hashes to ${actual.toString('hex')}`;
  }
  return null;
}

/**
 * What is wrong with a stream entry (a compressed copy): its frame (the header before it
 * names its length), its clusters (held, allocated) and, `deep`, its inflated content.
 */
async function streamProblem(e: LiveEntry, x: EntryContext): Promise<string | null> {
  const { image, cs, fileSize, held, refcounts, hasher, deep } = x;
  const length = streamLengthOf(e.guestField, cs);
  if (length === 0 || e.hostOffset < STREAM_HEADER_BYTES) return 'host offset is not a multiple of the cluster size, and the entry gives no compressed length';
  if (e.hostOffset + length > fileSize) return 'compressed copy is past the end of the file';
  // With the rest of its last sector: a guest read of a descriptor naming the copy inflates that.
  const framed = await image.file.read(e.hostOffset - STREAM_HEADER_BYTES, STREAM_HEADER_BYTES + compressedReadLength(e.hostOffset, length));
  const base = e.hostOffset - STREAM_HEADER_BYTES;
  const found = framedStreamsTouching(framed.subarray(0, STREAM_HEADER_BYTES), base, cs, Math.floor(e.hostOffset / cs));
  if (found.length !== 1 || found[0].offset !== e.hostOffset || found[0].length !== length) return 'compressed copy has no frame header of its length';
  const [first, last] = [Math.floor(e.hostOffset / cs), Math.floor((e.hostOffset + length - 1) / cs)];
  for (let c = first; c <= last; c++) {
    if (!held.has(c)) return `cluster ${hex(c * cs)} of the compressed copy is not held by the dedup holder snapshot`;
    if ((await refcounts.get(c)) < 1) return `cluster ${hex(c * cs)} of the compressed copy is not allocated (refcount 0)`;
  }
  if (deep) {
    let data: Buffer;
    try {
      data = inflateCluster(framed.subarray(STREAM_HEADER_BYTES), cs);
    } catch (err) {
      return `compressed copy does not inflate: ${(err as Error).message}`;
    }
    if (data.length !== cs) return `compressed copy inflates to ${data.length} bytes, not ${cs}`;
    const actual = hasher.hash(data);
    if (!actual.equals(e.hash)) return `compressed copy's content hashes to ${actual.toString('hex')}`;
  }
  return null;
}

// ---------------------------------------------------------------- check

/** The JSON `dedup` object of `check --output json`. */
export interface DedupCheckSummary {
  trusted: boolean;
  reason?: string;
  deep: boolean;
  'entries-checked': number;
  'bad-entries': number;
  'index-dropped'?: boolean;
}

/**
 * The dedup store's part of `check` (src/image/check/extension.ts calls it at the start of every pass):
 * a trusted store's index is verified (its areas are referenced by the holder snapshot, which
 * check counts like any snapshot); an untrusted store owns nothing (the holder keeps its
 * clusters until the next write releases them). Bad entries are corruptions that
 * `-r all` repairs by dropping the index (autoclear bit 60 cleared); a broken holder snapshot
 * or dedup extension is a corruption it cannot repair.
 */
export function dedupCheckExtension(image: Image, deep: boolean): CheckExtension {
  return {
    key: 'dedup',
    autoclear: AUTOCLEAR_DEDUP,
    async inspect(): Promise<ExtensionReport | null> {
      const report: ExtensionReport = { trusted: false, areas: [], problems: [], problemCount: 0, unfixable: [], summary: {} };
      const summary: DedupCheckSummary = { trusted: false, deep, 'entries-checked': 0, 'bad-entries': 0 };
      report.summary = summary as unknown as Record<string, unknown>;
      let insp: StoreVerdict;
      try {
        insp = await judgeStore(image, { tolerant: true });
      } catch (err) {
        if (!(err instanceof CorruptImageError)) throw err;
        report.unfixable.push(`ERROR dedup: ${err.message}`);
        summary.reason = err.message;
        return report;
      }
      if (!insp.ext && !insp.extError) return null;
      if (insp.extError) report.unfixable.push(`ERROR ${insp.extError.message}`);
      let held: ClusterSet | null = null;
      if (insp.holder) {
        held = await heldClusters(image, insp.holder, (message) => {
          if (report.unfixable.length < MAX_PROBLEM_LINES) report.unfixable.push(`ERROR ${message}`);
        });
      }
      if (!insp.trusted || !insp.store) {
        summary.reason = insp.reason!;
        return report;
      }
      report.trusted = true;
      summary.trusted = true;
      // No areas to count: the holder snapshot references every store cluster, and check
      // counts it as it counts any snapshot (judgeStore refuses to trust an unheld area).
      report.areas = [];
      try {
        const refcounts = await storedRefcounts(image);
        const v = await verifyIndex(image, insp.store, held ?? new ClusterSet(0), refcounts, createHasher(insp.ext!.hashAlgorithm), deep, insp.areas);
        summary['entries-checked'] = v.checked;
        summary['bad-entries'] = v.bad;
        report.problems = v.lines;
        report.problemCount = v.bad;
      } catch (err) {
        // The index cannot be verified (say, the refcount table is broken): not to be trusted.
        if (!(err instanceof CorruptImageError)) throw err;
        report.problems = [`ERROR dedup index: cannot be verified: ${err.message}`];
        report.problemCount = 1;
        summary['bad-entries'] = 1;
      }
      return report;
    },
  };
}
