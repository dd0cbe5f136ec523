// Guest reads of an open image: a range is planned in one synchronous pass over its L2
// entries (data pieces, zeros, compressed clusters, backing ranges), then the data pieces are
// sorted by host offset and read with one preadv per contiguous host run.

import { inflateCluster } from '../format/deflate.ts';
import { CorruptImageError, QdedupError, hex } from '../errors.ts';
import type { L2Entry } from '../format/l1l2.ts';
import { readvFrom } from './block-file.ts';
import { zeroRange } from './guest-reader.ts';
import { ImageTables } from './image-tables.ts';

/** Largest host run read with one preadv (neighbouring clusters coalesced). */
const MAX_READ_RUN_BYTES = 4 * 1024 * 1024;
/**
 * Host runs up to this size are read synchronously (BlockFile.readvSync): a cached 4 KiB
 * read costs ~3 µs so, ~20 µs through the thread pool. Larger runs go to the pool.
 */
const SYNC_READ_BYTES = 128 * 1024;
/** Reads of one readRange() in flight at once: libuv's thread pool has 4 threads. */
const READS_IN_FLIGHT = 4;

/** Guest bytes stored at a host offset, going to dst[dstOffset…] in a read. */
interface DataPiece {
  hostOffset: number;
  dstOffset: number;
  byteLength: number;
}

/** Guest reads (the reads of Image, ./image.ts). */
export abstract class ImageReads extends ImageTables {
  private lastCompressed: { offset: number; data: Buffer } | null = null;

  /** Reads `length` guest bytes at `guestOffset`; the range must lie inside the disk. */
  async read(guestOffset: number, length: number): Promise<Buffer> {
    this.checkRange(guestOffset, length);
    const dst = Buffer.allocUnsafe(length);
    await this.readRange(dst, 0, guestOffset, length);
    return dst;
  }

  async readGuest(guestOffset: number, length: number): Promise<Buffer> {
    const dst = Buffer.allocUnsafe(length);
    await this.readGuestInto(dst, 0, guestOffset, length);
    return dst;
  }

  async readGuestInto(dst: Buffer, dstStart: number, guestOffset: number, length: number, zeros?: number[]): Promise<void> {
    const inside = Math.max(0, Math.min(length, this.size - guestOffset));
    if (inside > 0) await this.readRange(dst, dstStart, guestOffset, inside, zeros);
    if (inside < length) zeroRange(dst, dstStart + inside, dstStart + length, zeros);
  }

  /**
   * Reads guest bytes [guestOffset, +length) (inside the disk) into dst[dstStart…], whatever
   * dst held before. Ranges that read as zeros without I/O (zero clusters, unallocated
   * clusters without backing data) are zero-filled; when `zeros` is given they are left as
   * they are instead and appended to it as [dstStart, dstEnd) pairs, in order and merged,
   * so a caller can skip them (read's sparse output).
   *
   * Cost: one await per L2 table, then one synchronous pass over the entries; the data
   * pieces are sorted by host offset and read with one preadv per contiguous host run
   * (which gathers the scattered clusters of a dedup image written in one go): large runs
   * through the thread pool, up to READS_IN_FLIGHT at once, small ones synchronously
   * meanwhile (SYNC_READ_BYTES); a host range read twice in a call is read once and copied.
   */
  async readRange(dst: Buffer, dstStart: number, guestOffset: number, length: number, zeros?: number[]): Promise<void> {
    this.checkRange(guestOffset, length);
    if (length === 0) return;
    const cs = this.clusterSize;
    const firstCluster = Math.floor(guestOffset / cs);
    const lastCluster = Math.floor((guestOffset + length - 1) / cs);
    const firstTable = Math.floor(firstCluster / this.l2Entries);
    const tables: (Buffer | null)[] = [];
    for (let t = firstTable; t <= Math.floor(lastCluster / this.l2Entries); t++) tables.push(await this.l2Table(t));

    // The plan, in one synchronous pass: data pieces, and tasks for the rest.
    const pieces: DataPiece[] = [];
    let sorted = true;
    const tasks: (() => Promise<void>)[] = [];
    const ownZeros: number[] = [];
    const backingZeros: number[][] = [];
    let backingDst = -1; // a pending run of guest bytes that come from the backing file
    let backingGuest = 0;
    let backingLen = 0;
    const flushBacking = () => {
      if (backingLen === 0) return;
      const [at, pos, n] = [backingDst, backingGuest, backingLen];
      const backing = this.backing!;
      // Each backing read lists its zeros apart: they finish in any order (merged below).
      const listed = zeros ? ([] as number[]) : undefined;
      if (listed) backingZeros.push(listed);
      if (backing.readGuestInto) tasks.push(() => backing.readGuestInto!(dst, at, pos, n, listed));
      else
        tasks.push(async () => {
          (await backing.readGuest(pos, n)).copy(dst, at);
        });
      backingLen = 0;
    };
    for (let pos = guestOffset, end = guestOffset + length; pos < end; ) {
      const guestCluster = Math.floor(pos / cs);
      const inCluster = pos - guestCluster * cs;
      const n = Math.min(cs - inCluster, end - pos);
      const at = dstStart + (pos - guestOffset);
      const l1Index = Math.floor(guestCluster / this.l2Entries);
      const e = this.entryIn(tables[l1Index - firstTable], l1Index, guestCluster);
      if (e.kind === 'unallocated' && this.backing) {
        if (backingLen > 0 && backingGuest + backingLen === pos) backingLen += n;
        else {
          flushBacking();
          [backingDst, backingGuest, backingLen] = [at, pos, n];
        }
      } else {
        flushBacking();
        if (e.kind === 'normal') {
          const hostOffset = e.hostOffset + inCluster;
          const last = pieces[pieces.length - 1];
          if (last && last.hostOffset + last.byteLength === hostOffset && last.dstOffset + last.byteLength === at) last.byteLength += n;
          else {
            if (last && hostOffset < last.hostOffset) sorted = false;
            pieces.push({ hostOffset, dstOffset: at, byteLength: n });
          }
        } else if (e.kind === 'compressed') {
          tasks.push(async () => {
            (await this.decompress(e)).copy(dst, at, inCluster, inCluster + n);
          });
        } else {
          zeroRange(dst, at, at + n, zeros ? ownZeros : undefined); // zero, or unallocated without backing
        }
      }
      pos += n;
    }
    flushBacking();
    if (!sorted) pieces.sort((a, b) => a.hostOffset - b.hostOffset || a.byteLength - b.byteLength);

    // Host-contiguous pieces become one preadv; a piece that repeats the one before it
    // (a cluster shared by dedup, read twice in this range) is copied once that is read.
    const copies: [DataPiece, DataPiece][] = [];
    const syncReads: [number, Buffer[]][] = [];
    for (let i = 0; i < pieces.length; ) {
      const group = [pieces[i]];
      let hostEnd = pieces[i].hostOffset + pieces[i].byteLength;
      let bytes = pieces[i].byteLength;
      let j = i + 1;
      for (; j < pieces.length; j++) {
        const p = pieces[j];
        const prev = pieces[j - 1];
        if (p.hostOffset === prev.hostOffset && p.byteLength === prev.byteLength) {
          copies.push([p, copies.length && copies[copies.length - 1][0] === prev ? copies[copies.length - 1][1] : prev]);
          continue;
        }
        if (p.hostOffset !== hostEnd || bytes + p.byteLength > MAX_READ_RUN_BYTES) break;
        group.push(p);
        hostEnd += p.byteLength;
        bytes += p.byteLength;
      }
      const hostOffset = group[0].hostOffset;
      const views = group.map((p) => dst.subarray(p.dstOffset, p.dstOffset + p.byteLength));
      if (bytes <= SYNC_READ_BYTES && this.file.readvSync) syncReads.push([hostOffset, views]);
      else tasks.push(() => readvFrom(this.file, hostOffset, views));
      i = j;
    }
    // The large reads go to the thread pool first; the small ones run here meanwhile.
    const pending = inParallel(tasks, READS_IN_FLIGHT);
    try {
      for (const [hostOffset, views] of syncReads) this.file.readvSync!(hostOffset, views);
    } finally {
      await pending; // (its error, if both failed)
    }
    for (const [p, from] of copies) dst.copy(dst, p.dstOffset, from.dstOffset, from.dstOffset + from.byteLength);
    if (zeros) appendMerged(zeros, ownZeros.concat(...backingZeros));
  }

  /** Drops the last inflated cluster: the bytes at its offset are about to be reused. */
  protected forgetDecompressed(): void {
    this.lastCompressed = null;
  }

  /** Inflates a compressed cluster (raw deflate) to exactly one cluster of bytes. */
  protected async decompress(e: L2Entry): Promise<Buffer> {
    if (this.lastCompressed?.offset === e.compressedOffset) return this.lastCompressed.data;
    const input = await this.file.read(e.compressedOffset, e.compressedLength);
    let data: Buffer;
    try {
      data = inflateCluster(input, this.clusterSize);
    } catch (err) {
      throw new CorruptImageError(`compressed cluster at ${hex(e.compressedOffset)} does not inflate: ${(err as Error).message}`, {
        path: this.path,
        offset: e.compressedOffset,
        structure: 'compressed cluster',
      });
    }
    if (data.length < this.clusterSize) {
      throw new CorruptImageError(`compressed cluster at ${hex(e.compressedOffset)} inflates to ${data.length} bytes, not ${this.clusterSize}`, {
        path: this.path,
        offset: e.compressedOffset,
        structure: 'compressed cluster',
      });
    }
    this.lastCompressed = { offset: e.compressedOffset, data };
    return data;
  }

  protected checkRange(guestOffset: number, length: number): void {
    if (!Number.isSafeInteger(guestOffset) || !Number.isSafeInteger(length) || guestOffset < 0 || length < 0 || guestOffset + length > this.size) {
      throw new QdedupError(`offset ${guestOffset} + length ${length} is outside the virtual disk (${this.size} bytes)`, 'ERANGE', 1, { path: this.path });
    }
  }
}

/**
 * Appends the [start, end) pairs of `ranges` (in any order, not overlapping) to `into`,
 * sorted and merged. The pairs already in `into` must lie before all of them.
 */
function appendMerged(into: number[], ranges: number[]): void {
  const order: number[] = [];
  for (let i = 0; i < ranges.length; i += 2) order.push(i);
  order.sort((a, b) => ranges[a] - ranges[b]);
  for (const i of order) {
    const [start, end] = [ranges[i], ranges[i + 1]];
    if (into.length && into[into.length - 1] >= start) into[into.length - 1] = Math.max(into[into.length - 1], end);
    else into.push(start, end);
  }
}

/** Runs the tasks with at most `limit` in flight; waits for all that started, then throws the first error. */
async function inParallel(tasks: (() => Promise<void>)[], limit: number): Promise<void> {
  let next = 0;
  let failure: { err: unknown } | null = null;
  const worker = async () => {
    while (next < tasks.length && !failure) {
      const task = tasks[next++];
      try {
        await task();
      } catch (err) {
        failure ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
  if (failure) throw (failure as { err: unknown }).err;
}
