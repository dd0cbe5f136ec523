// The one rule that decides whether an image's dedup index may be used: judgeStore(). The
// write path (Dedup.attach), `info`, `dedup-stats`, `journal-dump` and `check` all ask it, so
// each says "trusted" exactly when the next write keeps the index, with the reason that write
// gives (I3, docs/DESIGN.md; docs/DESIGN.md "The trust verdict"). Reads only: the store is replayed in
// memory, the holder gets an allocator that throws. Layouts: docs/FORMAT.md §5–10.

import { CorruptImageError, InternalError, QdedupError, hex } from '../errors.ts';
import { AUTOCLEAR_DEDUP, decodeDedupConfig, decodeDedupExtension, findDedupExtension, type DedupConfig, type DedupExtension } from '../format/dedup-ext.ts';
import { incarnationLayout } from '../format/incarnation.ts';
import { INCOMPAT_DIRTY } from '../format/header.ts';
import { l2Offsets } from '../format/l1l2.ts';
import { refblockEntries } from '../format/refcount.ts';
import type { Image } from '../image/image.ts';
import { clusterSpan, storedRefcounts } from './clusters.ts';
import { hashAlgorithmName, supportedHashAlgorithm } from './hash-algorithms.ts';
import { HOLDER_NAME, Holder, type HolderHost } from './holder.ts';
import { replayJournal } from './journal.ts';
import { DedupStore, geometryOf, replayDamage, type StoreGeometry } from './store.ts';

/**
 * Why a store is not trusted: one stable name per rule, in the order the rules are applied
 * (the order of a read-write open, so the first that fails is the one the write reports).
 */
export const DISTRUST_REASONS = [
  'extension', // the dedup header extension does not decode
  'algorithm', // a hash algorithm qdedup refuses (skein) or does not know
  'qcow2-dirty', // the QCOW2 dirty bit: the open rebuilds the refcounts, which drops the index
  'autoclear', // autoclear bit 60 clear: another program wrote the image
  'dirty', // the dedup dirty flag: the image was not closed cleanly
  'configuration', // the configuration area does not decode
  'store', // the store named by the configuration cannot be loaded
  'journal', // a journal does not replay up to the blocks the configuration says were written
  'area', // a store area is not the store's own clusters
] as const;
export type DistrustReason = (typeof DISTRUST_REASONS)[number];

/** The fixed texts; the other reasons carry the message of what failed. */
const REASON_TEXT = {
  'qcow2-dirty': 'the QCOW2 dirty bit is set (lazy refcounts not written back): the next read-write open rebuilds the refcounts, which drops the dedup index',
  autoclear: 'dedup autoclear bit 60 is clear (another program opened the image for writing, or check -r all dropped the index)',
  dirty: 'the image was not closed cleanly (dedup dirty flag set)',
} as const;

/** One area of the file the dedup store owns. */
export interface StoreArea {
  offset: number;
  bytes: number;
  what: string;
}

export interface StoreVerdict {
  /** The decoded extension; null for a plain image (or when it does not decode: see extError). */
  ext: DedupExtension | null;
  /** The extension is there but does not decode (only with `tolerant`; otherwise thrown). */
  extError: CorruptImageError | null;
  /** Hash algorithm name ("skein" included), "unknown (N)", or "off" for a plain image. */
  algorithm: string;
  /** True when qdedup's write path uses the store as it stands on disk. */
  trusted: boolean;
  /** The rule the store fails; null when trusted (or for a plain image). */
  distrust: DistrustReason | null;
  /** Why the store is not trusted, in words; null when it is (or for a plain image). */
  reason: string | null;
  /** The error behind the verdict, when one was thrown (the write path rethrows an 'algorithm' refusal). */
  error: QdedupError | null;
  /** The configuration area, decoded, when it was read (every rule before it passed). */
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

export interface JudgeOptions {
  /** Replay the journals into log stores and load the filters (default true). False: the verdict only. */
  store?: boolean;
  /** A dedup extension that does not decode makes the store untrusted instead of throwing (default false). */
  tolerant?: boolean;
}

/** The dedup extension of an image, decoded, or null for a plain image. Throws CorruptImageError (without an offset: the payload's is not the file's). */
export function dedupExtensionOf(image: Image): DedupExtension | null {
  const payload = findDedupExtension(image.header.extensions);
  if (!payload) return null;
  try {
    return decodeDedupExtension(payload, image.clusterSize);
  } catch (err) {
    if (err instanceof CorruptImageError) err.details.offset = undefined;
    throw err;
  }
}

/**
 * Judges the dedup store of `image` (open read-only or not; nothing is written): every rule
 * of DISTRUST_REASONS in order, the first that fails gives the verdict. Throws
 * CorruptImageError for a malformed dedup extension unless `tolerant`, and the I/O errors of
 * the reads. A store that fails a rule is reported untrusted with its reason, never thrown.
 */
export async function judgeStore(image: Image, options: JudgeOptions = {}): Promise<StoreVerdict> {
  const out: StoreVerdict = {
    ext: null,
    extError: null,
    algorithm: 'off',
    trusted: false,
    distrust: null,
    reason: null,
    error: null,
    config: null,
    store: null,
    holder: null,
    areas: [],
    metadataClusters: 0,
  };
  const distrust = (why: DistrustReason, reason: string, error: QdedupError | null = null): StoreVerdict => {
    Object.assign(out, { distrust: why, reason, error, store: null });
    return out;
  };
  let ext: DedupExtension | null;
  try {
    ext = dedupExtensionOf(image);
  } catch (err) {
    if (!(err instanceof CorruptImageError) || !options.tolerant) throw err;
    out.extError = err;
    out.algorithm = 'unknown';
    return distrust('extension', err.message, err);
  }
  if (!ext) return out;
  out.ext = ext;
  try {
    out.algorithm = hashAlgorithmName(ext.hashAlgorithm);
  } catch {
    out.algorithm = `unknown (${ext.hashAlgorithm})`;
  }
  if (image.header.nbSnapshots > 0 && image.snapshots.length === 0) await image.loadSnapshots();
  const snap = image.snapshots.find((s) => s.name === HOLDER_NAME);
  if (snap) out.holder = await Holder.load(readOnlyHost(image), snap.l1TableOffset, snap.l1Size);

  try {
    supportedHashAlgorithm(ext.hashAlgorithm);
  } catch (err) {
    if (!(err instanceof QdedupError)) throw err;
    return distrust('algorithm', err.message, err);
  }
  // A read-write open acts on a QCOW2 dirty bit (refcounts rebuilt, bit 60 cleared) before the
  // store is looked at: the verdict is the one the next write reaches.
  if (image.header.incompatibleFeatures & INCOMPAT_DIRTY || image.refcountsRebuilt) return distrust('qcow2-dirty', REASON_TEXT['qcow2-dirty']);
  if (!(image.header.autoclearFeatures & AUTOCLEAR_DEDUP)) return distrust('autoclear', REASON_TEXT.autoclear);
  if (ext.dirty) return distrust('dirty', REASON_TEXT.dirty);
  try {
    out.config = decodeDedupConfig(await image.file.read(ext.configOffset, ext.configBytes), ext.configOffset, image.clusterSize);
  } catch (err) {
    if (!(err instanceof CorruptImageError)) throw err;
    return distrust('configuration', err.message, err);
  }
  const config = out.config;
  const geometry = geometryOf(ext, image.clusterSize);
  // The replay's verdict (src/dedup/store.ts replayDamage): a damaged block, or replay
  // stopping short of the blocks the configuration says were written.
  let damage: string | null;
  if (options.store === false) {
    // Replays the journals without building log stores (the verdict needs no entries).
    const stops = [];
    for (const desc of config.journals) stops.push((await replayJournal(image.file, desc, ext.journalBlockSize)).stop);
    damage = replayDamage(stops, config.journals);
  } else {
    try {
      out.store = await DedupStore.open(image.file, geometry, config);
    } catch (err) {
      if (!(err instanceof CorruptImageError)) throw err;
      return distrust('store', err.message, err);
    }
    damage = out.store.replayDamage();
  }
  if (damage) return distrust('journal', damage);
  const areas = storeAreas(ext, config, geometry);
  const misplaced = await misplacedArea(image, areas, out.holder);
  if (misplaced) return distrust('area', misplaced);
  out.trusted = true;
  out.areas = areas;
  const clusters = new Set<number>();
  for (const a of areas) {
    const [first, last] = clusterSpan(a.offset, a.bytes, image.clusterSize);
    for (let c = first; c <= last; c++) clusters.add(c);
  }
  out.metadataClusters = clusters.size;
  return out;
}

/** A HolderHost for reading: any allocation is a bug (judging never writes). */
function readOnlyHost(image: Image): HolderHost {
  const refuse = (what: string) => () => {
    throw new InternalError(`dedup inspection tried to ${what}`);
  };
  return {
    file: image.file,
    clusterBits: image.clusterBits,
    allocate: async () => refuse('allocate a cluster')(),
    markMetadata: () => {},
    freeUnreferenced: refuse('free a cluster'),
    reserveL1Move: async () => refuse('move the holder')(),
    moveL1: async () => refuse('move the holder')(),
  };
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
    const [first, last] = clusterSpan(offset, bytes, cs);
    for (let c = first; c <= last; c++) tables.set(c, what);
  };
  const h = image.header;
  mark(0, cs, 'header');
  mark(h.refcountTableOffset, h.refcountTableClusters * cs, 'refcount table');
  if (h.l1Size) mark(h.l1TableOffset, h.l1Size * 8, 'active L1 table');
  for (const l2 of l2Offsets(image.l1, h.l1Size)) mark(l2, cs, 'an L2 table');
  if (h.nbSnapshots) mark(h.snapshotsOffset, 1, 'snapshot table');
  for (const s of image.snapshots) if (s.l1Size) mark(s.l1TableOffset, s.l1Size * 8, 'a snapshot L1 table');
  const refcounts = await storedRefcounts(image);
  for (const b of refcounts.blockOffsets()) mark(b, cs, 'a refcount block');
  if (holder) for (const t of holder.tableOffsets()) mark(t, cs, 'a dedup holder L2 table');
  // A refcount block, and a holder table, is fetched at the first cluster it covers (the
  // read refcounts.get() and holder.isHeld() would make); the clusters after it are judged
  // without an await: two per cluster were most of an `info`'s time in this loop.
  const perBlock = refblockEntries(image.clusterBits, h.refcountOrder);
  const perTable = cs / 8;
  for (const a of areas) {
    const [first, last] = clusterSpan(a.offset, a.bytes, cs);
    if (last >= fileClusters) return `${a.what} at ${hex(a.offset)} runs past the end of the file`;
    for (let c = first; c <= last; c++) {
      const other = tables.get(c);
      if (other) return `${a.what} at ${hex(a.offset)} overlaps ${other} (cluster ${hex(c * cs)})`;
      tables.set(c, a.what);
      if (c === first || c % perBlock === 0) await refcounts.fetch([c]);
      const refcount = refcounts.count(c);
      if (refcount !== 1) return `${a.what} at ${hex(a.offset)}: cluster ${hex(c * cs)} has refcount ${refcount}, not 1`;
      // The holder holds every store cluster (its one reference): one it does not hold is not
      // the store's (or the image predates that rule: the index is rebuilt once, and those
      // clusters stay leaks for `check -r leaks`). A table that cannot be read holds nothing.
      let held = false;
      try {
        if (holder && (c === first || c % perTable === 0)) await holder.fetch([c]);
        held = holder?.holds(c) ?? false;
      } catch {
        held = false;
      }
      if (!held) return `${a.what} at ${hex(a.offset)}: cluster ${hex(c * cs)} is not held by the dedup holder snapshot`;
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
