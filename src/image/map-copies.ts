// `map` on compressed clusters (./map.ts): which guest clusters name the same compressed copy.
// A compressed L2 entry names its copy by a descriptor (the host byte offset of the deflate
// stream and its sector count); two guest clusters share a copy when their entries carry the
// same descriptor: a dedup hit links a duplicate that way, and an internal snapshot keeps the
// entries its clusters had. The refcounts cannot tell: a host cluster packs many unrelated
// copies, each adding its references to it.
//
// Bounded memory: copies are counted in windows. A window holds the ranges map produced over
// at most COPIES_PER_WINDOW units, a unit being one compressed guest cluster at depth 0 or one
// other range waiting behind them; the window's distinct copies go into one Map (at most
// COPIES_PER_WINDOW entries), then ONE walk of every L2 table of the disk and of its guest
// snapshots (one table at a time, guestViews below) counts the entries naming each. So RAM
// is O(COPIES_PER_WINDOW), about 100 bytes a unit (some tens of MiB at most), whatever the
// size of the image, and the time is one walk of the tables per window: ⌈units mapped /
// COPIES_PER_WINDOW⌉ walks, one for any image of fewer than 2^18 compressed clusters (2 GiB of
// compressed 4 KiB clusters: 2 walks, 5 s). Ranges before the first compressed one go out
// unbuffered, so an image without compressed clusters costs nothing more.

import { QCOW_OFLAG_COMPRESSED_HI, decodeL1Entry, decodeL2Entry, type L2Entry } from '../format/l1l2.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import type { Image } from './image.ts';

/** Units (compressed guest clusters and ranges held behind them) of one window. */
export const COPIES_PER_WINDOW = 1 << 18;

/** One compressed copy of a window: a descriptor and the guest entries naming it. */
interface Copy {
  offset: number;
  length: number;
  refs: number;
  /** Another copy at the same offset with another length (a hostile image: still a different descriptor). */
  next?: Copy;
}

/** The copies of a window, by descriptor. */
export class CopySet {
  private readonly byOffset = new Map<number, Copy>();

  get size(): number {
    return this.byOffset.size;
  }

  /** The copy that compressed entry `e` names, added if new. */
  add(e: L2Entry): Copy {
    let c = this.byOffset.get(e.compressedOffset);
    if (!c) {
      c = { offset: e.compressedOffset, length: e.compressedLength, refs: 0 };
      this.byOffset.set(c.offset, c);
      return c;
    }
    for (;;) {
      if (c.length === e.compressedLength) return c;
      if (!c.next) return (c.next = { offset: e.compressedOffset, length: e.compressedLength, refs: 0 });
      c = c.next;
    }
  }

  /** The copy compressed entry `e` names, if it is one of the set's. */
  find(e: L2Entry): Copy | undefined {
    let c = this.byOffset.get(e.compressedOffset);
    while (c && c.length !== e.compressedLength) c = c.next;
    return c;
  }
}

/**
 * Every L2 entry of the active disk and of the snapshots `skip` does not skip, one table at a
 * time; `compressedOnly`: the snapshots' other entries are not even decoded (the count walk).
 */
export type ViewWalker = (fn: (guestCluster: number, e: L2Entry, snapshot?: string) => void, compressedOnly?: boolean) => Promise<void>;

/** The compressed entry of the active disk at a guest cluster (one L2 table kept), null for others. */
export function activeCompressed(image: Image): (guestCluster: number) => Promise<L2Entry | null> {
  let table: { l1Index: number; entry: (guestCluster: number) => L2Entry } | null = null;
  return async (guestCluster) => {
    const l1Index = Math.floor(guestCluster / image.l2Entries);
    if (table?.l1Index !== l1Index) table = { l1Index, entry: await image.l2Reader(l1Index) };
    const e = table.entry(guestCluster);
    return e.kind === 'compressed' ? e : null;
  };
}

/** What the window machinery needs of a map range (MapEntry's fields). */
export interface CopyRange {
  start: number;
  length: number;
  sharedBy?: number;
}

/** A window item: a range passing through, or the part of a compressed range the window covers. */
type Item<E> = { range: E; piece?: undefined } | { range: E; piece: Piece };

interface Piece {
  /** Guest bytes [from, to) of `range` this piece covers. */
  from: number;
  to: number;
  /** The copy of each guest cluster the piece touches, in order. */
  copies: Copy[];
}

/**
 * `ranges` with `sharedBy` set on those `isCompressed` says are compressed at depth 0: for
 * each cluster of the range, the guest entries (disk and guest snapshots, `walk`) other than
 * the cluster's own that name the cluster's copy, added up over the range (as the counts of a
 * range of whole clusters are). Ranges come out as they went in (qemu-img's). `perWindow`:
 * COPIES_PER_WINDOW (tests lower it).
 */
export async function* withCopySharing<E extends CopyRange>(
  ranges: AsyncIterable<E>,
  image: Image,
  isCompressed: (e: E) => boolean,
  walk: ViewWalker,
  perWindow = COPIES_PER_WINDOW,
): AsyncGenerator<E> {
  const cs = image.clusterSize;
  const entryAt = activeCompressed(image);
  let window: Item<E>[] = [];
  let units = 0;
  let copies = new CopySet();
  /** The last range out, held back while the next piece of the same range may continue it. */
  let pending: { range: E; source: E } | null = null;

  function* emit(range: E, source: E): Generator<E> {
    if (pending && pending.source === source && pending.range.start + pending.range.length === range.start) {
      // The next piece of a range a window boundary cut: one range again, its counts added.
      pending.range.length += range.length;
      pending.range.sharedBy = (pending.range.sharedBy ?? 0) + (range.sharedBy ?? 0);
      return;
    }
    if (pending) yield pending.range;
    pending = { range, source };
  }

  async function* flush(): AsyncGenerator<E> {
    if (copies.size) {
      await walk((_guestCluster, e) => {
        if (e.kind !== 'compressed') return;
        const c = copies.find(e);
        if (c) c.refs++;
      }, true);
    }
    for (const { range, piece } of window) {
      if (!piece) {
        yield* emit(range, range);
        continue;
      }
      // The cluster's own entry is one of the copy's references; a cluster whose entry the
      // walk did not see (changed under -U) counts none. The range's count is its clusters'
      // added up, as for a range of whole clusters.
      let sharedBy = 0;
      for (const copy of piece.copies) sharedBy += Math.max(0, copy.refs - 1);
      yield* emit({ ...range, start: piece.from, length: piece.to - piece.from, sharedBy }, range);
    }
    window = [];
    units = 0;
    copies = new CopySet();
  }

  for await (const range of ranges) {
    if (!isCompressed(range)) {
      if (window.length === 0) yield* emit(range, range);
      else {
        window.push({ range });
        if (++units >= perWindow) yield* flush();
      }
      continue;
    }
    const end = range.start + range.length;
    let piece: Piece = { from: range.start, to: range.start, copies: [] };
    for (let pos = range.start; pos < end; ) {
      const cluster = Math.floor(pos / cs);
      const e = await entryAt(cluster);
      // map said compressed: an entry that is not (the image changed under -U) names no copy
      piece.copies.push(e ? copies.add(e) : { offset: -1, length: 0, refs: 0 });
      pos = Math.min((cluster + 1) * cs, end);
      piece.to = pos;
      if (++units >= perWindow) {
        window.push({ range, piece });
        yield* flush();
        piece = { from: pos, to: pos, copies: [] };
      }
    }
    if (piece.to > piece.from) window.push({ range, piece });
  }
  yield* flush();
  if (pending) yield (pending as { range: E }).range;
}

/**
 * Every L2 entry of the active disk, then of each snapshot but those `skip` skips, one table
 * at a time. Snapshot entries and tables that are not well-formed (unaligned, or past the end
 * of the file, where they would read as zeros) are passed over: they reference nothing a range
 * can share; so are the active disk's in the count walk (`compressedOnly`), which reads the
 * tables raw and decodes only compressed entries (map has validated those of its range).
 */
export function guestViews(image: Image, skip?: (s: SnapshotEntry) => boolean): ViewWalker {
  return async (fn, compressedOnly = false) => {
    const perTable = image.l2Entries;
    const fileSize = await image.file.size();
    if (compressedOnly) await walkTables(image, image.l1.subarray(0, image.header.l1Size * 8), fileSize, true, fn);
    else {
      // --shares: the active disk's entries validated, as map reads them
      for (let i = 0; i < image.header.l1Size; i++) {
        const reader = await image.l2Reader(i);
        if (!reader.allocated) continue;
        for (let j = 0; j < perTable; j++) fn(i * perTable + j, reader(i * perTable + j));
      }
    }
    const snapshots = image.header.nbSnapshots ? await image.loadSnapshots() : [];
    for (const s of snapshots) {
      if (skip?.(s)) continue;
      const l1 = s.l1Size ? await image.file.read(s.l1TableOffset, s.l1Size * 8) : Buffer.alloc(0);
      await walkTables(image, l1, fileSize, compressedOnly, (guestCluster, e) => fn(guestCluster, e, s.name));
    }
  };
}

/** The entries of the L2 tables L1 table `l1` names (a snapshot's; the active disk's in the count walk). */
async function walkTables(image: Image, l1: Buffer, fileSize: number, compressedOnly: boolean, fn: (guestCluster: number, e: L2Entry) => void): Promise<void> {
  const cs = image.clusterSize;
  for (let i = 0; i < l1.length / 8; i++) {
    const l2Offset = decodeL1Entry(l1, i).l2Offset;
    if (!l2Offset || l2Offset % cs || l2Offset >= fileSize) continue;
    const table = await image.file.read(l2Offset, cs);
    for (let j = 0; j < image.l2Entries; j++) {
      if (compressedOnly && !(table.readUInt32BE(j * 8) & QCOW_OFLAG_COMPRESSED_HI)) continue;
      const e = decodeL2Entry(table, j, image.clusterBits);
      if (e.kind === 'compressed' || e.hostOffset % cs === 0) fn(i * image.l2Entries + j, e);
    }
  }
}
