// `map`: how guest ranges map to the file, as `qemu-img map` reports it (QEMU 7.2,
// qemu-img.c img_map/get_block_status/entry_mergeable, block/io.c bdrv_co_block_status,
// block/qcow2.c qcow2_co_block_status), plus how many guest clusters share each range's
// host clusters (compressed clusters: how many guest clusters name the same compressed copy,
// ./map-copies.ts), and which guest ranges share a given range's storage.
//
// Bounded memory: one L2 table per image of the chain is held at a time (Image.l2Reader),
// refcount blocks through Refcounts' bounded cache; compressed copies are counted in windows
// of at most COPIES_PER_WINDOW (2^18) compressed clusters, one walk of the tables per window
// (./map-copies.ts); the shares scan holds one set entry per host cluster or compressed
// cluster of the range asked about (MAX_SHARES_CLUSTERS) and the ranges it prints.
//
// Host-file holes, as qemu-img sees them (block/file-posix.c raw_co_block_status, through
// lseek SEEK_DATA/SEEK_HOLE): a raw backing file is split at its holes (`zero: true,
// data: false`); under a qcow2 layer's data clusters the file is asked only when QEMU would
// guess the image was preallocated (qcow2_detect_metadata_preallocation: more clusters in use
// than the file has blocks, as after qemu-io writes part of a new cluster and zeroes the rest
// with a hole), and holes there are `zero: true, data: true`. Where lseek is not available
// (not Linux, koffi missing) nothing is probed and every range reads as data.

import { closeSync, fstatSync, openSync } from 'node:fs';
import { dirname, isAbsolute } from 'node:path';
import { UsageError } from '../errors.ts';
import type { L2Entry } from '../format/l1l2.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import type { GuestReader } from './guest-reader.ts';
import { Image } from './image.ts';
import { libc } from './libc.ts';
import { COPIES_PER_WINDOW, CopySet, activeCompressed, guestViews, withCopySharing } from './map-copies.ts';
import { Refcounts } from './refcounts.ts';

/** One range of `qemu-img map --output=json` (its keys and meanings), plus qdedup's. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  /** Host offset in `file`, when known (not for compressed clusters, nor unallocated ranges). */
  offset?: number;
  /** The file `offset` is in, as qemu-img names it (human output's File column); with `offset` only. */
  file?: string;
  /**
   * Ranges with data at depth 0 and an offset: how many guest clusters other than the
   * range's own use the host clusters the range touches — in the active disk and in its
   * internal snapshots, from the refcounts (minus references a layer says are not guest
   * clusters: the dedup holder snapshot's). 0: the range's storage is its own.
   * Compressed ranges at depth 0 (no offset): for each cluster of the range, how many guest
   * clusters other than itself (disk and snapshots, those `skipSnapshot` skips excepted) have
   * an L2 entry naming the same compressed copy, added up over the range.
   */
  sharedBy?: number;
  /** With --shares: the guest ranges (of the disk or of a snapshot) that use this range's host clusters. */
  sharedWith?: ShareRange[];
}

/** A guest range whose L2 entries point into another range's host clusters. */
export interface ShareRange {
  start: number;
  length: number;
  offset: number;
  /** The internal snapshot whose tables hold these entries; absent: the active disk. */
  snapshot?: string;
  /** Zero clusters that keep their host cluster (they read as zeros). */
  zero?: boolean;
  /** A compressed cluster naming the same copy (one cluster; `offset`: the copy's first byte). */
  compressed?: boolean;
}

/** What a layer above the engine knows about references that are not guest data. */
export interface ShareAccounting {
  /** References to host cluster `hostCluster` held by structures that are not guest clusters. */
  nonGuestRefs?(hostCluster: number): Promise<number>;
  /** Snapshots whose tables do not describe guest data (skipped when listing shares). */
  skipSnapshot?(s: SnapshotEntry): boolean;
}

export interface MapOptions {
  /** First guest byte (qemu-img map --start-offset); default 0. */
  start?: number;
  /** Bytes from `start` (--max-length); default to the end of the disk. */
  length?: number;
  /** Compute `sharedBy` for the ranges that have data at depth 0. */
  sharing?: boolean;
  accounting?: ShareAccounting;
  /** Compressed clusters counted per walk of the tables (COPIES_PER_WINDOW; tests lower it). */
  copiesPerWindow?: number;
}

/** Host clusters and compressed clusters --shares looks for at most (one set entry each). */
export const MAX_SHARES_CLUSTERS = 1 << 20;

/** One layer of the backing chain: the image and the name qemu-img gives its file. */
interface Layer {
  reader: GuestReader;
  name: string;
  /** Image layers: the L2 table walked now (one per layer). */
  table?: { l1Index: number; entry: (guestCluster: number) => L2Entry };
  /** Where the layer's file is asked for holes (raw layers; qcow2 layers QEMU deems preallocated). */
  host?: HostFile | null;
}

const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ENXIO = 6;

/** What the host file holds at [offset, +length): data or a hole, and how far; eof when that reaches its end. */
interface HostStatus {
  zero: boolean;
  length: number;
  eof: boolean;
}

/** A read-only descriptor of a layer's file, for lseek (a second one: the image's own keeps its locks). */
class HostFile {
  private constructor(
    private readonly fd: number,
    private readonly seek: (fd: number, offset: number, whence: number) => number,
    private readonly errno: () => number,
  ) {}

  static open(path: string): HostFile | null {
    const c = libc();
    if (!c) return null;
    try {
      return new HostFile(openSync(path, 'r'), c.lseek, c.errno);
    } catch {
      return null;
    }
  }

  /** Bytes the file takes on disk (st_blocks) and its length. */
  usage(): { allocated: number; size: number } {
    const st = fstatSync(this.fd);
    return { allocated: st.blocks * 512, size: st.size };
  }

  /** file-posix's block status of [offset, +length): past the end nothing (eof, length 0). */
  status(offset: number, length: number): HostStatus {
    const size = fstatSync(this.fd).size;
    if (offset >= size) return { zero: false, length: 0, eof: true };
    const bytes = Math.min(length, size - offset);
    let out: { zero: boolean; length: number };
    const data = this.seek(this.fd, offset, SEEK_DATA);
    if (data < 0)
      out = { zero: this.errno() === ENXIO, length: bytes }; // a trailing hole; else no information: data
    else if (data > offset) out = { zero: true, length: Math.min(bytes, data - offset) };
    else {
      const hole = this.seek(this.fd, offset, SEEK_HOLE);
      out = { zero: false, length: hole > offset ? Math.min(bytes, hole - offset) : bytes };
    }
    return { ...out, eof: offset + out.length === size };
  }

  close(): void {
    closeSync(this.fd);
  }
}

/**
 * QEMU's qcow2_detect_metadata_preallocation: at least max(⌊real·10/9⌋, real + 2) clusters
 * in use (refcount > 0), `real` being the clusters' worth of blocks the file takes on disk.
 */
async function looksPreallocated(image: Image, host: HostFile): Promise<boolean> {
  const { allocated, size } = host.usage();
  const real = Math.floor(allocated / image.clusterSize);
  const threshold = Math.max(Math.floor((real * 10) / 9), real + 2);
  const refcounts = await refcountsOf(image);
  const end = Math.ceil(size / image.clusterSize);
  let used = 0;
  for (let c = 0; c < end && used < threshold; c++) if ((await refcounts.get(c)) > 0) used++;
  return used >= threshold;
}

function refcountsOf(image: Image): Promise<Refcounts> {
  const h = image.header;
  return Refcounts.load(
    image.file,
    {
      clusterBits: image.clusterBits,
      refcountOrder: h.refcountOrder,
      tableOffset: h.refcountTableOffset,
      tableClusters: h.refcountTableClusters,
    },
    () => undefined,
  );
}

/** Opens the host files to probe: every raw layer's, and a qcow2 layer's when it looks preallocated. */
async function openHostFiles(layers: Layer[]): Promise<void> {
  for (const layer of layers) {
    const host = HostFile.open(layer.reader instanceof Image ? layer.reader.path : layer.name);
    if (host && layer.reader instanceof Image && !(await looksPreallocated(layer.reader, host).catch(() => false))) host.close();
    else layer.host = host;
  }
}

/**
 * The file name qemu-img shows for a backing file (block.c bdrv_refresh_filename →
 * path_combine): absolute names as they are, relative ones next to the overlay's name as given.
 */
export function backingDisplayName(overlay: string, backing: string): string {
  if (isAbsolute(backing)) return backing;
  return overlay.includes('/') ? `${dirname(overlay)}/${backing}` : backing;
}

function chainOf(image: Image, name: string): Layer[] {
  const layers: Layer[] = [{ reader: image, name }];
  for (let r: GuestReader | null = image.backing; r; r = r instanceof Image ? r.backing : null) {
    const above = layers[layers.length - 1];
    const backingName = (above.reader as Image).header.backingFile ?? '';
    layers.push({ reader: r, name: backingDisplayName(above.name, backingName) });
  }
  return layers;
}

async function entryAt(layer: Layer, image: Image, guestCluster: number): Promise<L2Entry> {
  const l1Index = Math.floor(guestCluster / image.l2Entries);
  if (layer.table?.l1Index !== l1Index) layer.table = { l1Index, entry: await image.l2Reader(l1Index) };
  return layer.table.entry(guestCluster);
}

/**
 * The block status at guest byte `pos` of layer `k` and how far it holds (≤ maxLen),
 * going down the chain where a layer has nothing (qemu-img's get_block_status).
 */
async function status(layers: Layer[], k: number, pos: number, maxLen: number): Promise<MapEntry> {
  const layer = layers[k];
  const r = layer.reader;
  if (!(r instanceof Image)) {
    // A raw backing file: its bytes at their own offset, or its holes.
    const hole = layer.host?.status(pos, maxLen);
    const zero = hole !== undefined && hole.length > 0 && hole.zero;
    const length = hole && hole.length > 0 ? hole.length : maxLen;
    return { start: pos, length, depth: k, present: true, zero, data: !zero, offset: pos, file: layer.name };
  }
  const cs = r.clusterSize;
  const cluster = Math.floor(pos / cs);
  const inCluster = pos - cluster * cs;
  const length = Math.min(cs - inCluster, maxLen);
  const e = await entryAt(layer, r, cluster);
  const at = (offset: number) => ({ offset: offset + inCluster, file: layer.name });
  switch (e.kind) {
    case 'normal': {
      // block/io.c: a preallocated image's data cluster is asked of the file (BDRV_BLOCK_RECURSE).
      const hole = layer.host?.status(e.hostOffset + inCluster, length);
      if (!hole) return { start: pos, length, depth: k, present: true, zero: false, data: true, ...at(e.hostOffset) };
      const past = hole.eof && (hole.length === 0 || hole.zero);
      return { start: pos, length: past ? length : hole.length, depth: k, present: true, zero: past || hole.zero, data: true, ...at(e.hostOffset) };
    }
    case 'compressed':
      return { start: pos, length, depth: k, present: true, zero: false, data: true };
    case 'zero':
      return { start: pos, length, depth: k, present: true, zero: true, data: false, ...(e.hostOffset ? at(e.hostOffset) : {}) };
    default: {
      const below = layers[k + 1];
      if (below && pos < below.reader.size) return status(layers, k + 1, pos, Math.min(length, below.reader.size - pos));
      return { start: pos, length, depth: k, present: false, zero: true, data: false };
    }
  }
}

/** qemu-img's entry_mergeable: `next` continues `curr`. */
function mergeable(curr: MapEntry, next: MapEntry): boolean {
  if (curr.length === 0) return false;
  if (curr.zero !== next.zero || curr.data !== next.data || curr.depth !== next.depth || curr.present !== next.present) return false;
  if (curr.file !== next.file) return false;
  if ((curr.offset === undefined) !== (next.offset === undefined)) return false;
  return curr.offset === undefined || curr.offset + curr.length === next.offset;
}

/**
 * The merged ranges of `image` (opened with its backing chain), as `qemu-img map` prints
 * them; `name` is the image's path as the user gave it (qemu-img's File column).
 */
export async function* mapImage(image: Image, name: string, options: MapOptions = {}): AsyncGenerator<MapEntry> {
  const ranges = mapRanges(image, name, options);
  if (!options.sharing) return yield* ranges;
  const walk = guestViews(image, options.accounting?.skipSnapshot);
  yield* withCopySharing(ranges, image, isCompressedRange, walk, options.copiesPerWindow ?? COPIES_PER_WINDOW);
}

/** A compressed range of the image itself: data at depth 0 without an offset. */
const isCompressedRange = (e: MapEntry) => e.data && e.depth === 0 && e.offset === undefined;

/** mapImage's ranges, merged as qemu-img merges them, with `sharedBy` on those that have an offset. */
async function* mapRanges(image: Image, name: string, options: MapOptions): AsyncGenerator<MapEntry> {
  const start = Math.min(options.start ?? 0, image.size);
  const end = Math.min(image.size, options.length === undefined ? image.size : start + options.length);
  const layers = chainOf(image, name);
  try {
    await openHostFiles(layers);
    const counter = options.sharing ? await shareCounter(image, options.accounting) : null;
    let curr: MapEntry | null = null;
    for (let pos = start; pos < end; ) {
      const next = await status(layers, 0, pos, end - pos);
      pos += next.length;
      if (curr && mergeable(curr, next)) {
        curr.length += next.length;
        continue;
      }
      if (curr) yield counter ? await counter(curr) : curr;
      curr = next;
    }
    if (curr) yield counter ? await counter(curr) : curr;
  } finally {
    for (const layer of layers) layer.host?.close();
  }
}

/** Adds `sharedBy` to the ranges that have data at depth 0 and an offset. */
async function shareCounter(image: Image, accounting: ShareAccounting | undefined): Promise<(e: MapEntry) => Promise<MapEntry>> {
  const refcounts = await refcountsOf(image);
  return async (e) => {
    if (!e.data || e.depth !== 0 || e.offset === undefined) return e;
    const cs = image.clusterSize;
    let others = 0;
    for (let c = Math.floor(e.offset / cs); c * cs < e.offset + e.length; c++) {
      const guest = (await refcounts.get(c)) - ((await accounting?.nonGuestRefs?.(c)) ?? 0);
      others += Math.max(0, guest - 1);
    }
    return { ...e, sharedBy: others };
  };
}

/**
 * The ranges of [start, +length) with, for those that have data at depth 0, the guest
 * ranges of the active disk and of its internal snapshots (but those `accounting` skips)
 * whose L2 entries point into their host clusters — the range's own clusters excepted —
 * or, for compressed ranges, name the same compressed copy as one of the range's clusters
 * (every guest cluster but the one naming it itself, so a duplicate inside the range is listed).
 * Walks every L2 table of every view once, one table at a time.
 */
export async function mapShares(image: Image, name: string, start: number, length: number, accounting?: ShareAccounting): Promise<MapEntry[]> {
  const entries: MapEntry[] = [];
  for await (const e of mapImage(image, name, { start, length, sharing: true, accounting })) entries.push(e);
  const cs = image.clusterSize;
  /** Host cluster → the entries whose storage it is (several where the range itself holds duplicates). */
  const owner = new Map<number, MapEntry[]>();
  /** Compressed copies of the range → the entries naming them: how many of their clusters, and the last. */
  const copies = new CopySet();
  const copyOwners = new Map<object, Map<MapEntry, { clusters: number; guestCluster: number }>>();
  const compressedAt = activeCompressed(image);
  let owned = 0;
  const count = () => {
    if (++owned > MAX_SHARES_CLUSTERS)
      throw new UsageError(`--shares: the range covers more than ${MAX_SHARES_CLUSTERS} host clusters; give a ` + 'shorter length');
  };
  for (const e of entries) {
    if (e.sharedBy === undefined) continue;
    e.sharedWith = [];
    if (e.offset === undefined) {
      for (let c = Math.floor(e.start / cs); c * cs < e.start + e.length; c++) {
        const l2 = await compressedAt(c);
        if (!l2) continue;
        const copy = copies.add(l2);
        let owners = copyOwners.get(copy);
        if (!owners) copyOwners.set(copy, (owners = new Map()));
        const own = owners.get(e);
        if (own) own.clusters++;
        else owners.set(e, { clusters: 1, guestCluster: c });
        count();
      }
      continue;
    }
    for (let c = Math.floor(e.offset / cs); c * cs < e.offset + e.length; c++) {
      owner.set(c, [...(owner.get(c) ?? []), e]);
      count();
    }
  }
  if (owner.size === 0 && copies.size === 0) return entries;
  const found = (e: MapEntry, hit: ShareRange) => {
    const list = e.sharedWith!;
    const last = list[list.length - 1];
    const adjacent =
      last && !last.compressed && !hit.compressed && last.snapshot === hit.snapshot && last.zero === hit.zero && last.start + last.length === hit.start;
    if (adjacent && last.offset + last.length === hit.offset) last.length += hit.length;
    else list.push(hit);
  };
  const visitCompressed = (guestCluster: number, l2: L2Entry, snapshot?: string) => {
    const copy = copies.find(l2);
    if (!copy) return;
    for (const [e, own] of copyOwners.get(copy)!) {
      // A cluster does not share with itself; another cluster of the range naming the copy does.
      if (snapshot === undefined && own.clusters === 1 && own.guestCluster === guestCluster) continue;
      found(e, { start: guestCluster * cs, length: cs, offset: l2.compressedOffset, ...(snapshot !== undefined ? { snapshot } : {}), compressed: true });
    }
  };
  const visit = (guestCluster: number, l2: L2Entry, snapshot?: string) => {
    if (l2.kind === 'compressed') return visitCompressed(guestCluster, l2, snapshot);
    if (!l2.hostOffset) return;
    const guest = guestCluster * cs;
    for (const e of owner.get(l2.hostOffset / cs) ?? []) {
      // The range's own clusters (the active disk's, over the range) are not "others".
      if (snapshot === undefined && guest < e.start + e.length && guest + cs > e.start) continue;
      found(e, {
        start: guest,
        length: cs,
        offset: l2.hostOffset,
        ...(snapshot !== undefined ? { snapshot } : {}),
        ...(l2.kind === 'zero' ? { zero: true } : {}),
      });
    }
  };
  await guestViews(image, accounting?.skipSnapshot)(visit);
  return entries;
}

// ---------------------------------------------------------------- output, as qemu-img prints it

/** One entry as qemu-img's dump_map_entry prints it in JSON (one line), with qdedup's keys after qemu's. */
export function mapJsonLine(e: MapEntry): string {
  let line = `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
  if (e.offset !== undefined) line += `, "offset": ${e.offset}`;
  if (e.sharedBy !== undefined) line += `, "shared-by": ${e.sharedBy}`;
  if (e.sharedWith) {
    const items = e.sharedWith.map((s) => {
      let item = `{ "start": ${s.start}, "length": ${s.length}, "offset": ${s.offset}`;
      if (s.snapshot !== undefined) item += `, "snapshot": ${JSON.stringify(s.snapshot)}`;
      if (s.zero) item += ', "zero": true';
      if (s.compressed) item += ', "compressed": true';
      return item + '}';
    });
    line += `, "shared-with": [${items.join(', ')}]`;
  }
  return line + '}';
}

/** C's printf("%#-16" PRIx64): 0 as "0", others with 0x, left-aligned in 16 columns. */
const hex16 = (n: number) => (n === 0 ? '0' : `0x${n.toString(16)}`).padEnd(16);

/**
 * The human rows (qemu-img's OFORMAT_HUMAN): data ranges only, non-data ranges folded
 * together as qemu-img does; a `Shared by` column before File; under --shares, one
 * indented line per sharing range. Compressed data cannot be shown this way: `error` is
 * set at the first one (qemu-img: "File contains external, encrypted or compressed
 * clusters."), after the rows before it — unless `compressedFile` is given (--shares, which
 * qemu-img does not have): then compressed ranges are rows too, "compressed" in the Mapped to
 * column and `compressedFile` (the image's name) in File.
 */
export function mapHumanRows(entries: Iterable<MapEntry>, compressedFile?: string): { rows: string[]; error?: string } {
  const rows = [`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}${'Shared by'.padEnd(16)}File`];
  let curr: MapEntry | null = null;
  const dump = (e: MapEntry): string | undefined => {
    const compressed = e.data && e.offset === undefined;
    if (compressed && compressedFile === undefined) return 'File contains external, encrypted or compressed clusters.';
    if (e.data && !e.zero) {
      const mapped = compressed ? 'compressed'.padEnd(16) : hex16(e.offset ?? 0);
      rows.push(`${hex16(e.start)}${hex16(e.length)}${mapped}${String(e.sharedBy ?? '-').padEnd(16)}${compressed ? compressedFile : (e.file ?? '')}`);
      for (const s of e.sharedWith ?? []) {
        rows.push(
          `    shared with ${hex16(s.start).trim()} (${s.length} bytes ${s.compressed ? 'compressed ' : ''}at ` +
            `${hex16(s.offset).trim()})${s.zero ? ' as a zero cluster' : ''}${s.snapshot !== undefined ? ` in snapshot '${s.snapshot}'` : ''}`,
        );
      }
    }
    return undefined;
  };
  for (const given of entries) {
    // This format does not tell 0, ZERO and ZERO|DATA apart: qemu-img folds them (and merges more).
    const next = { ...given, ...(!given.data || given.zero ? { data: false, zero: true } : {}) };
    if (curr && mergeable(curr, next)) {
      curr.length += next.length;
      if (next.sharedBy !== undefined) curr.sharedBy = (curr.sharedBy ?? 0) + next.sharedBy;
      if (next.sharedWith) curr.sharedWith = [...(curr.sharedWith ?? []), ...next.sharedWith];
      continue;
    }
    if (curr) {
      const error = dump(curr);
      if (error) return { rows, error };
    }
    curr = next;
  }
  const error = curr ? dump(curr) : undefined;
  return error ? { rows, error } : { rows };
}
