// Read-only inspection of an image's dedup state, for `dedup-stats`, `info` and `check`: the
// dedup header extension, whether the store is trusted (the rules of Dedup.attach) and why
// not, the store replayed in memory, the holder snapshot and the clusters it holds, the
// clusters the store owns, the guest's use of data clusters, and the index verification of
// `check` (every live entry names a held, allocated cluster; with `deep`, one whose bytes
// hash to the entry's hash). Never writes: the store is only read (DedupStore.open reads),
// the holder gets an allocator that throws. Layouts: docs/FORMAT.md §5–9.
//
// Memory stays bounded by the file, not by fields read from it: cluster sets are bitmaps over
// the file's clusters (a hostile offset past the end goes to a small overflow set), holder and
// L2 tables are streamed one at a time, incarnation tables are read in 1 MiB chunks.

import { CorruptImageError, QdedupError, hex } from '../errors.ts';
import {
  AUTOCLEAR_DEDUP, EXT_DEDUP, decodeDedupConfig, decodeDedupExtension, type DedupConfig, type DedupExtension,
} from '../format/dedup-ext.ts';
import { HASH_ENTRY_BYTES } from '../format/hash-entry.ts';
import { BUCKET_SLOTS, SLOT_USED, candidateBuckets, decodeIncarnationSlot, incarnationLayout, tagOf } from '../format/incarnation.ts';
import { INCOMPAT_DIRTY, MAX_HOST_OFFSET } from '../format/header.ts';
import { compressedClusterSpan, decodeL1Entry, decodeL2Entry } from '../format/l1l2.ts';
import type { CheckExtension, ExtensionReport } from '../image/check-image.ts';
import type { Image } from '../image/image.ts';
import { Refcounts } from '../image/refcounts.ts';
import { createHasher, hashAlgorithmName, type Hasher } from './hasher.ts';
import { HOLDER_NAME, Holder, type HolderHost } from './holder.ts';
import { replayJournal } from './journal.ts';
import { DedupStore, geometryOf, replayDamage, type StoreGeometry } from './store.ts';

/** One area of the file the dedup store owns. */
export interface StoreArea {
  offset: number;
  bytes: number;
  what: string;
}

export interface DedupInspection {
  /** The decoded extension; null for a plain image (or when it does not decode: see extError). */
  ext: DedupExtension | null;
  /** The extension is there but does not decode (only with `tolerant`; otherwise thrown). */
  extError: CorruptImageError | null;
  /** Hash algorithm name ("skein" included), or "off" for a plain image. */
  algorithm: string;
  /** True when qdedup's write path would use the store as it stands on disk. */
  trusted: boolean;
  /** Why the store is not trusted; null when it is (or for a plain image). */
  reason: string | null;
  /** The configuration area, decoded, when trusted. */
  config: DedupConfig | null;
  /** The store replayed in memory, when trusted and asked for (`store: true`). */
  store: DedupStore | null;
  /** The holder snapshot of a dedup image, when it has one. */
  holder: Holder | null;
  /** What the store owns: configuration area, journals, incarnations, limbo. Empty when untrusted. */
  areas: StoreArea[];
  /** Host clusters of `areas`, each counted once. */
  metadataClusters: number;
}

export interface InspectOptions {
  /** Replay the journals into log stores and load the filters (default true). False: judge trust only. */
  store?: boolean;
  /** A dedup extension that does not decode makes the store untrusted instead of throwing (default false). */
  tolerant?: boolean;
}

/** The reason the write path gives when autoclear bit 60 is clear. */
const REASON_AUTOCLEAR = 'dedup autoclear bit 60 is clear (another program opened the image for writing, or check -r all dropped the index)';
const REASON_DIRTY = 'the image was not closed cleanly (dedup dirty flag set)';
/** A read-write open rebuilds the refcounts first (src/image/image.ts) and that drops the index. */
const REASON_QCOW2_DIRTY = 'the QCOW2 dirty bit is set (lazy refcounts not written back): the next read-write open rebuilds the refcounts, which drops the dedup index';

/** A HolderHost for reading: any allocation is a bug (inspection never writes). */
function readOnlyHost(image: Image): HolderHost {
  return {
    file: image.file,
    clusterBits: image.clusterBits,
    allocate: async () => {
      throw new QdedupError('internal: dedup inspection tried to allocate a cluster', 'EINTERNAL');
    },
    markMetadata: () => {},
    freeUnreferenced: () => {
      throw new QdedupError('internal: dedup inspection tried to free a cluster', 'EINTERNAL');
    },
    reserveL1Move: async () => {
      throw new QdedupError('internal: dedup inspection tried to move the holder', 'EINTERNAL');
    },
    moveL1: async () => {
      throw new QdedupError('internal: dedup inspection tried to move the holder', 'EINTERNAL');
    },
  };
}

/**
 * Inspects the dedup state of `image` (open read-only or not; nothing is written). Throws
 * CorruptImageError for a malformed dedup extension unless `tolerant`, and the I/O errors of
 * the reads. A store that does not pass the write path's trust rules is reported untrusted
 * with its reason, never thrown.
 */
export async function inspectDedup(image: Image, options: InspectOptions = {}): Promise<DedupInspection> {
  const out: DedupInspection = {
    ext: null, extError: null, algorithm: 'off', trusted: false, reason: null, config: null, store: null, holder: null, areas: [], metadataClusters: 0,
  };
  const raw = image.header.extensions.find((e) => e.type === EXT_DEDUP);
  if (!raw) return out;
  let ext: DedupExtension;
  try {
    ext = decodeDedupExtension(raw.data, image.clusterSize);
  } catch (err) {
    if (!(err instanceof CorruptImageError) || !options.tolerant) {
      if (err instanceof CorruptImageError) err.details.offset = undefined;
      throw err;
    }
    out.extError = err;
    out.algorithm = 'unknown';
    out.reason = err.message;
    return out;
  }
  out.ext = ext;
  try {
    out.algorithm = hashAlgorithmName(ext.hashAlgorithm);
  } catch {
    out.algorithm = `unknown (${ext.hashAlgorithm})`;
  }
  if (image.header.nbSnapshots > 0 && image.snapshots.length === 0) await image.loadSnapshots();
  const snap = image.snapshots.find((s) => s.name === HOLDER_NAME);
  if (snap) out.holder = await Holder.load(readOnlyHost(image), snap.l1TableOffset, snap.l1Size);

  // The trust rules of Dedup.attach, in its order (the algorithm first: attach refuses it).
  try {
    createHasher(ext.hashAlgorithm);
  } catch (err) {
    if (!(err instanceof QdedupError)) throw err;
    out.reason = err.message;
    return out;
  }
  // The order of Dedup.attach's open: a QCOW2 dirty bit is acted on (refcounts rebuilt, bit
  // 60 cleared) before the store is looked at, so `info` gives the verdict the next write reaches.
  if ((image.header.incompatibleFeatures & INCOMPAT_DIRTY) || image.refcountsRebuilt) out.reason = REASON_QCOW2_DIRTY;
  else if (!(image.header.autoclearFeatures & AUTOCLEAR_DEDUP)) out.reason = REASON_AUTOCLEAR;
  else if (ext.dirty) out.reason = REASON_DIRTY;
  if (out.reason) return out;
  let config: DedupConfig;
  try {
    config = decodeDedupConfig(await image.file.read(ext.configOffset, ext.configBytes), ext.configOffset, image.clusterSize);
  } catch (err) {
    if (!(err instanceof CorruptImageError)) throw err;
    out.reason = err.message;
    return out;
  }
  const geometry = geometryOf(ext, image.clusterSize);
  // The write path's verdict on the replay (src/dedup/store.ts replayDamage): a damaged block,
  // or replay stopping short of the blocks the configuration says were written.
  let damage: string | null;
  if (options.store === false) {
    // Replays the journals without building log stores (info needs the verdict, not the entries).
    const stops = [];
    for (const desc of config.journals) stops.push((await replayJournal(image.file, desc, ext.journalBlockSize)).stop);
    damage = replayDamage(stops, config.journals);
  } else {
    let store: DedupStore;
    try {
      store = await DedupStore.open(image.file, geometry, config);
    } catch (err) {
      if (!(err instanceof CorruptImageError)) throw err;
      out.reason = err.message;
      return out;
    }
    damage = store.replayDamage();
    if (!damage) out.store = store;
  }
  if (damage) {
    out.reason = damage;
    return out;
  }
  const areas = storeAreas(ext, config, geometry);
  const misplaced = await misplacedArea(image, areas, out.holder);
  if (misplaced) {
    out.store = null;
    out.reason = misplaced;
    return out;
  }
  out.trusted = true;
  out.config = config;
  out.areas = areas;
  const clusters = new Set<number>();
  for (const a of out.areas) {
    const first = Math.floor(a.offset / image.clusterSize);
    const last = Math.floor((a.offset + Math.max(a.bytes, 1) - 1) / image.clusterSize);
    for (let c = first; c <= last; c++) clusters.add(c);
  }
  out.metadataClusters = clusters.size;
  return out;
}

/**
 * Why the store's areas cannot be the store's own clusters, or null. Each must lie inside
 * the file, on clusters of refcount 1 that the holder holds (that reference is the only one)
 * and that no other area and no table of the image uses: a configuration that says
 * otherwise would have the store's writes land on someone else's bytes (found by the
 * fuzzer: a journal over the L1 table). Guest data is never held with refcount 1.
 * Cost: one refcount lookup per store cluster.
 */
async function misplacedArea(image: Image, areas: StoreArea[], holder: Holder | null): Promise<string | null> {
  const cs = image.clusterSize;
  const fileClusters = Math.ceil((await image.file.size()) / cs);
  const tables = new Map<number, string>();
  const mark = (offset: number, bytes: number, what: string) => {
    for (let c = Math.floor(offset / cs); c <= Math.floor((offset + Math.max(bytes, 1) - 1) / cs); c++) tables.set(c, what);
  };
  const h = image.header;
  mark(0, cs, 'header');
  mark(h.refcountTableOffset, h.refcountTableClusters * cs, 'refcount table');
  if (h.l1Size) mark(h.l1TableOffset, h.l1Size * 8, 'active L1 table');
  for (let i = 0; i < h.l1Size; i++) {
    const l2 = decodeL1Entry(image.l1, i).l2Offset;
    if (l2) mark(l2, cs, 'an L2 table');
  }
  if (h.nbSnapshots) mark(h.snapshotsOffset, 1, 'snapshot table');
  for (const s of image.snapshots) if (s.l1Size) mark(s.l1TableOffset, s.l1Size * 8, 'a snapshot L1 table');
  const refcounts = await storedRefcounts(image);
  for (const b of refcounts.blockOffsets()) mark(b, cs, 'a refcount block');
  if (holder) for (const t of holder.tableOffsets()) mark(t, cs, 'a dedup holder L2 table');
  for (const a of areas) {
    const first = a.offset / cs;
    const last = Math.floor((a.offset + Math.max(a.bytes, 1) - 1) / cs);
    if (last >= fileClusters) return `${a.what} at ${hex(a.offset)} runs past the end of the file`;
    for (let c = first; c <= last; c++) {
      const other = tables.get(c);
      if (other) return `${a.what} at ${hex(a.offset)} overlaps ${other} (cluster ${hex(c * cs)})`;
      tables.set(c, a.what);
      if ((await refcounts.get(c)) !== 1) return `${a.what} at ${hex(a.offset)}: cluster ${hex(c * cs)} has refcount ${await refcounts.get(c)}, not 1`;
      // The holder holds every store cluster (its one reference): one it does not hold is not
      // the store's (or the image predates that rule: the index is rebuilt once, and those
      // clusters stay leaks for `check -r leaks`).
      if (!holder || !(await holder.isHeld(c).catch(() => false))) return `${a.what} at ${hex(a.offset)}: cluster ${hex(c * cs)} is not held by the dedup holder snapshot`;
    }
  }
  return null;
}

/** The areas a configuration names (the same set as DedupStore.areas() plus the configuration area). */
function storeAreas(ext: DedupExtension, config: DedupConfig, g: StoreGeometry): StoreArea[] {
  const clusters = incarnationLayout(g.order, g.clusterSize).clusters;
  return [
    { offset: ext.configOffset, bytes: ext.configBytes, what: 'dedup configuration area' },
    ...config.journals.map((j, i) => ({ offset: j.offset, bytes: j.blocks * g.journalBlockSize, what: `dedup journal ${i}` })),
    ...config.incarnations.map((r, i) => ({ offset: r.offset, bytes: clusters * g.clusterSize, what: `dedup incarnation ${i}` })),
    ...config.limbo.map((l, i) => ({ offset: l.offset, bytes: l.clusters * g.clusterSize, what: `dedup limbo area ${i}` })),
  ];
}

// ---------------------------------------------------------------- cluster sets

/**
 * A set of host cluster indexes: a bitmap over the file's clusters (one bit each), plus an
 * overflow set for indexes past it (only hostile entries point there).
 */
export class ClusterSet {
  private readonly bits: Uint8Array;
  private readonly overflow = new Set<number>();
  size = 0;

  constructor(readonly limit: number) {
    this.bits = new Uint8Array(Math.ceil(limit / 8));
  }

  /** Adds `cluster`; returns true when it was not there yet. */
  add(cluster: number): boolean {
    if (cluster < this.limit) {
      const mask = 1 << (cluster & 7);
      if (this.bits[cluster >>> 3] & mask) return false;
      this.bits[cluster >>> 3] |= mask;
    } else {
      if (this.overflow.has(cluster)) return false;
      this.overflow.add(cluster);
    }
    this.size++;
    return true;
  }

  has(cluster: number): boolean {
    if (cluster < this.limit) return (this.bits[cluster >>> 3] & (1 << (cluster & 7))) !== 0;
    return this.overflow.has(cluster);
  }

  /** Every member, in increasing order. */
  *[Symbol.iterator](): Generator<number> {
    for (let byte = 0; byte < this.bits.length; byte++) {
      const b = this.bits[byte];
      if (!b) continue;
      for (let bit = 0; bit < 8; bit++) if (b & (1 << bit)) yield byte * 8 + bit;
    }
    yield* [...this.overflow].sort((a, b) => a - b);
  }
}

/** A ClusterSet sized for the clusters of `image`'s file. */
export async function clusterSetFor(image: Image): Promise<ClusterSet> {
  return new ClusterSet(Math.ceil((await image.file.size()) / image.clusterSize) + 1);
}

/**
 * The host clusters the holder holds, read table by table (its L2 tables map cluster P to
 * host cluster P). An entry that is not that identity is passed to `onBad` (which may
 * throw) and not counted.
 */
export async function heldClusters(image: Image, holder: Holder, onBad: (message: string, entryOffset: number) => void): Promise<ClusterSet> {
  const held = await clusterSetFor(image);
  const cs = image.clusterSize;
  const perTable = cs / 8;
  for (let i = 0; i < holder.l1Size; i++) {
    const l2Offset = decodeL1Entry(holder.l1, i).l2Offset;
    if (!l2Offset) continue;
    if (l2Offset % cs) {
      onBad(`dedup holder snapshot: L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${hex(i)})`, holder.l1Offset + i * 8);
      continue;
    }
    const table = await image.file.read(l2Offset, cs);
    for (let j = 0; j < perTable; j++) {
      const e = decodeL2Entry(table, j, image.clusterBits);
      if (e.kind === 'unallocated') continue;
      const cluster = i * perTable + j;
      if (e.kind === 'normal' && e.hostOffset === cluster * cs) held.add(cluster);
      else onBad(`dedup holder snapshot: entry for cluster ${hex(cluster * cs)} maps ${e.kind === 'compressed' ? 'a compressed cluster' : hex(e.hostOffset)}, not itself; delete the snapshot with 'qemu-img snapshot -d ${HOLDER_NAME}'`, l2Offset + j * 8);
    }
  }
  return held;
}

/** The image's stored refcounts, read-only (Refcounts.get only reads). Throws CorruptImageError for a bad refcount table. */
export async function storedRefcounts(image: Image): Promise<Refcounts> {
  const h = image.header;
  return Refcounts.load(image.file, { clusterBits: image.clusterBits, refcountOrder: h.refcountOrder, tableOffset: h.refcountTableOffset, tableClusters: h.refcountTableClusters }, () => undefined);
}

// ---------------------------------------------------------------- guest usage

export interface GuestUsage {
  /** Active L2 entries that map to data (normal or compressed). */
  guestClusters: number;
  /** Distinct host clusters those entries use (every cluster a compressed stream touches). */
  dataClusters: ClusterSet;
}

/**
 * Walks the active L1/L2 tables once. Throws CorruptImageError for an unaligned L2 table or
 * data cluster offset (as a guest read would).
 */
export async function guestUsage(image: Image): Promise<GuestUsage> {
  const cs = image.clusterSize;
  const data = await clusterSetFor(image);
  let guestClusters = 0;
  for (let i = 0; i < image.header.l1Size; i++) {
    const l2Offset = decodeL1Entry(image.l1, i).l2Offset;
    if (!l2Offset) continue;
    if (l2Offset % cs) throw new CorruptImageError(`L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${hex(i)})`, { offset: image.header.l1TableOffset + i * 8, structure: 'L1 table' });
    const table = await image.file.read(l2Offset, cs);
    for (let j = 0; j < image.l2Entries; j++) {
      const e = decodeL2Entry(table, j, image.clusterBits);
      if (e.kind === 'normal') {
        if (e.hostOffset % cs) throw new CorruptImageError(`cluster allocation offset ${hex(e.hostOffset)} unaligned (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(j)})`, { offset: l2Offset + j * 8, structure: 'L2 table' });
        guestClusters++;
        data.add(e.hostOffset / cs);
      } else if (e.kind === 'compressed') {
        // As a guest read: an offset past 2^56 is corrupt (and past 2^53 the cluster loop below would never end).
        if (e.compressedOffset >= MAX_HOST_OFFSET) throw new CorruptImageError(`compressed cluster offset beyond the largest host offset (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(j)})`, { offset: l2Offset + j * 8, structure: 'L2 table' });
        guestClusters++;
        const [first, last] = compressedClusterSpan(e, image.clusterBits);
        for (let c = first; c <= last; c++) data.add(c);
      }
    }
  }
  return { guestClusters, dataClusters: data };
}

// ---------------------------------------------------------------- the index

/** One entry a lookup can return, and where it lives. */
export interface LiveEntry {
  hash: Buffer;
  hostOffset: number;
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
      yield { hash: Buffer.from(hash), hostOffset: ls.hostOffsets[s], where: names[k] };
    }
  }
  const hs = store.hashStore;
  const { slots, tableOffset } = hs.layout;
  const perChunk = Math.max(1, Math.floor((1024 * 1024) / HASH_ENTRY_BYTES));
  for (let k = 0; k < hs.incarnations.length; k++) {
    const inc = hs.incarnations[k];
    for (let first = 0; first < slots; first += perChunk) {
      const n = Math.min(perChunk, slots - first);
      let chunk: Buffer | null = null;
      for (let i = 0; i < n; i++) {
        const s = first + i;
        if (inc.tags[s] === 0) continue;
        chunk ??= await image.file.read(inc.record.offset + tableOffset + first * HASH_ENTRY_BYTES, n * HASH_ENTRY_BYTES);
        const slot = decodeIncarnationSlot(chunk, i * HASH_ENTRY_BYTES);
        if (slot.tombstone) continue;
        const bucket = Math.floor(s / BUCKET_SLOTS);
        const [b1, b2] = candidateBuckets(slot.hash, hs.order);
        if ((bucket !== b1 && bucket !== b2) || inc.tags[s] !== tagOf(slot.hash)) continue; // never reached by a lookup
        if (logs.some((ls) => ls.find(slot.hash) >= 0)) continue;
        if (await shadowedByYounger(image, store, k, slot.hash)) continue;
        yield { hash: slot.hash, hostOffset: slot.hostOffset, where: `incarnation ${k} slot ${s}` };
      }
    }
  }
}

/** True when an incarnation younger than `k` holds `hash` (as an entry or a tombstone). */
async function shadowedByYounger(image: Image, store: DedupStore, k: number, hash: Buffer): Promise<boolean> {
  const hs = store.hashStore;
  const tag = tagOf(hash);
  const [b1, b2] = candidateBuckets(hash, hs.order);
  for (let j = 0; j < k; j++) {
    const inc = hs.incarnations[j];
    for (const b of b1 === b2 ? [b1] : [b1, b2]) {
      for (let s = b * BUCKET_SLOTS; s < (b + 1) * BUCKET_SLOTS; s++) {
        if (inc.tags[s] !== tag) continue;
        const slot = decodeIncarnationSlot(await image.file.read(inc.record.offset + hs.layout.tableOffset + s * HASH_ENTRY_BYTES, HASH_ENTRY_BYTES));
        if (slot.hash.equals(hash)) return true;
      }
    }
  }
  return false;
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
export async function verifyIndex(image: Image, store: DedupStore, held: ClusterSet, refcounts: Refcounts, hasher: Hasher, deep: boolean, areas: StoreArea[] = []): Promise<IndexVerification> {
  const cs = image.clusterSize;
  const fileSize = await image.file.size();
  const out: IndexVerification = { checked: 0, bad: 0, lines: [] };
  // The store's own clusters are held too: an entry naming one must never be linked (I1).
  const storeClusters = await clusterSetFor(image);
  const areaOf = new Map<number, string>();
  for (const a of areas) {
    for (let c = Math.floor(a.offset / cs); c <= Math.floor((a.offset + Math.max(a.bytes, 1) - 1) / cs); c++) {
      if (storeClusters.add(c) && areaOf.size < MAX_PROBLEM_LINES) areaOf.set(c, a.what);
    }
  }
  for await (const e of liveEntries(image, store)) {
    out.checked++;
    const c = e.hostOffset / cs;
    const problem = Number.isSafeInteger(c) && storeClusters.has(c)
      ? `cluster belongs to the dedup store (${areaOf.get(c) ?? 'store area'}), not to guest data`
      : await entryProblem(image, e, cs, fileSize, held, refcounts, hasher, deep);
    if (problem === null) continue;
    out.bad++;
    if (out.lines.length < MAX_PROBLEM_LINES) out.lines.push(`ERROR dedup index: hash ${e.hash.toString('hex')} (${e.where}) -> ${hex(e.hostOffset)}: ${problem}`);
  }
  return out;
}

async function entryProblem(image: Image, e: LiveEntry, cs: number, fileSize: number, held: ClusterSet, refcounts: Refcounts, hasher: Hasher, deep: boolean): Promise<string | null> {
  if (e.hostOffset === 0 || e.hostOffset % cs) return 'host offset is not a non-zero multiple of the cluster size';
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
      let insp: DedupInspection;
      try {
        insp = await inspectDedup(image, { tolerant: true });
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
        summary.reason = insp.reason ?? 'not trusted';
        return report;
      }
      report.trusted = true;
      summary.trusted = true;
      // No areas to count: the holder snapshot references every store cluster, and check
      // counts it as it counts any snapshot (inspectDedup refuses to trust an unheld area).
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
