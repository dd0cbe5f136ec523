// Consistency check and repair of a QCOW2 image, and the refcount rebuild that a dirty
// image needs before its first write. Modelled on QEMU's qcow2_co_check_locked and
// qcow2_check_refcounts (block/qcow2-refcount.c) and qemu-img's img_check; the messages
// use QEMU 7.2's wording so scripts and people can read both tools' output alike.
// Spec: docs/interop/qcow2.rst "Host cluster management"; observed behaviour:
// ../shared/reference/qemu-img-behaviour.md §3.
//
// One pass (checkPass) counts every reference the metadata makes — header, refcount table
// and blocks, active L1/L2 and data, snapshot table, snapshot L1/L2 and data (a compressed
// cluster counts on every host cluster it touches) — in an in-memory refcount array (the
// IMRT), then compares it with the stored refcounts and checks the COPIED flags.
//
// Writes happen only when a repair mode is given. Their order keeps I3 (a crash leaves at
// worst leaks): fixed refcounts are synced before COPIED flags rely on them; a rebuilt
// refcount structure is written to clusters nobody references, synced, and only then does
// the header point at it; the dirty and corrupt bits are cleared last.
//
// Structures a layer above the engine keeps in the image (the dedup store) join the check
// through a CheckExtension: their areas count as referenced while an autoclear bit vouches
// for them, their problems are corruptions, and `-r all` repairs those by clearing the bit.
//
// Memory is bounded by the file size (the IMRT has one entry per host cluster of the file),
// never by a field read from disk; an L2 table that several L1 entries share is read once
// and counted with its multiplicity, so a hostile L1 cannot multiply the work.
//
// Differences from QEMU 7.2, on purpose: a refcount block whose table entry is unaligned or
// has reserved bits set is repaired by the rebuild (QEMU fails its overlap check there); the
// rebuild never places new blocks on clusters the old refcount structure still uses; a
// snapshot table with incomplete entries is reported but not rewritten; a refcount block far
// past the end of the file (beyond MAX_REPAIR_GROWTH_CLUSTERS) is handled by a rebuild rather
// than by growing the file to reach it; freed clusters are left as they are (QEMU punches holes).

import { CorruptImageError, IoError, QdedupError } from '../errors.ts';
import {
  AUTOCLEAR_BITMAPS, EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_L1_BYTES, MAX_REFTABLE_BYTES, clusterSizeOf,
  l2EntriesOf, type Header,
} from '../format/header.ts';
import {
  L1E_RESERVED_HI, L1E_RESERVED_LO, L2E_STD_RESERVED_HI, L2E_STD_RESERVED_LO, OFFSET_MASK_HI, OFFSET_MASK_LO,
  QCOW_OFLAG_COMPRESSED_HI, QCOW_OFLAG_COPIED_HI, QCOW_OFLAG_ZERO as QCOW_OFLAG_ZERO_LO, REFT_OFFSET_MASK_LO, REFT_RESERVED_LO,
} from '../format/l1l2.ts';
import { getRefcount, maxRefcount, refblockEntries, setRefcount } from '../format/refcount.ts';
import { decodeSnapshotEntry } from '../format/snapshot.ts';
import { TWO_32, writeU64 } from '../format/bytes.ts';
import { NodeFile, errnoText, type BlockFile } from './block-file.ts';
import type { LockRequest } from './image-lock.ts';

// ---------------------------------------------------------------- constants (QEMU's names)

/** BDRV_FIX_LEAKS / BDRV_FIX_ERRORS. */
const FIX_LEAKS = 1;
const FIX_ERRORS = 2;


/** Bitmaps extension limits (QEMU's qcow2-bitmap.c): entries, sizes, flags and table entry masks. */
const QCOW2_MAX_BITMAPS = 65535;
const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;
const BME_MAX_TABLE_SIZE = 0x800_0000;
const BME_MAX_PHYS_SIZE = 0x2000_0000;
const BME_MAX_GRANULARITY_BITS = 31;
const BME_MIN_GRANULARITY_BITS = 9;
const BME_MAX_NAME_SIZE = 1023;
const BME_RESERVED_FLAGS = 0xffff_fffc;
const BT_DIRTY_TRACKING_BITMAP = 1;
/** BME_TABLE_ENTRY_RESERVED_MASK = 0xff000000000001fe, as hi and lo halves; bit 0 is "all ones". */
const BME_TABLE_ENTRY_RESERVED_HI = 0xff00_0000;
const BME_TABLE_ENTRY_RESERVED_LO = 0x1fe;
const BME_TABLE_ENTRY_FLAG_ALL_ONES = 0x1;

/** QEMU's QCOW_MAX_SNAPSHOTS_SIZE: the snapshot table may not exceed 64 MiB. */
const MAX_SNAPSHOT_TABLE_BYTES = 1024 * 65536;
/** QEMU's limit on the clusters of a checked file (INT_MAX): it bounds the IMRT. */
const MAX_CHECK_CLUSTERS = 0x7fff_ffff;
/** Refcount blocks kept in memory while comparing and repairing. */
const MAX_CACHED_REFBLOCKS = 256;
/** Clusters a repair may add to the file to take in a refcount block that lies past its end. */
const MAX_REPAIR_GROWTH_CLUSTERS = 1 << 20;
/** Problem lines kept in the result (all of them still go to onMessage, up to MAX_EMITTED_MESSAGES). */
export const MAX_STORED_MESSAGES = 100_000;
/** Problem lines emitted at most; a hostile image could otherwise print without end (I4). */
export const MAX_EMITTED_MESSAGES = 1_000_000;

// ---------------------------------------------------------------- results

/** The counters of one check, like QEMU's BdrvCheckResult plus its BlockFragInfo. */
export interface CheckCounts {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  /** End of the highest cluster with a stored refcount or a reference, in bytes. */
  imageEndOffset: number;
  /** Guest clusters of the virtual disk. */
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

export type RepairMode = 'leaks' | 'all';

export interface CheckOptions {
  /** Repair leaks only, or leaks and corruptions. Without it the file is never written. */
  repair?: RepairMode;
  /** Receives each problem line as it is found (qemu-img prints them on stderr). */
  onMessage?: (line: string) => void;
  /** QEMU's image locks to take (./image-lock.ts: LOCK_READ, or LOCK_WRITE to repair); none when absent. */
  lock?: LockRequest;
}

/**
 * A layer above the QCOW2 engine that keeps structures of its own in the image, vouched for
 * by an autoclear bit (the dedup store and bit 60). The engine does not know their layout:
 * the extension names their areas and its problems, the check counts the areas as
 * referenced while they are trusted (so they are not leaks), and `-r all` repairs the
 * problems by clearing the autoclear bit (the structures are then dropped, and their areas
 * become leaks that the same repair frees). `-r leaks` never drops them, and a repair keeps
 * the bit of structures that are trusted and sound.
 */
export interface CheckExtension {
  /** Key of the summary in the JSON document ("dedup"). */
  readonly key: string;
  /** The autoclear bits that vouch for the structures. */
  readonly autoclear: bigint;
  /** Inspects the structures as the header now says (called at the start of every pass); null when the image has none. Never writes. */
  inspect(): Promise<ExtensionReport | null>;
}

export interface ExtensionReport {
  /** True when the structures are in force: their areas then count as referenced. */
  trusted: boolean;
  /** Host ranges the structures own (counted once each while trusted). */
  areas: { offset: number; bytes: number; what: string }[];
  /** Problem lines that dropping the structures repairs (at most a bounded number kept). */
  problems: string[];
  /** The number of such problems (each a corruption), which may exceed problems.length. */
  problemCount: number;
  /** Problem lines no repair of the check can fix (each a corruption). */
  unfixable: string[];
  /** What the JSON document shows under `key`. */
  summary: Record<string, unknown>;
}

/** What `qemu-img check` reports: the final counts, and the repair summary when a repair fixed something. */
export interface ImageCheck extends CheckCounts {
  filename: string;
  format: 'qcow2';
  /** Present when a repair pass fixed something; the counts above then come from the check that followed it. */
  repaired?: { leaksFixed: number; corruptionsFixed: number };
  /** Set when the check could not be completed (QEMU's "Check failed: <reason>"). */
  failure?: string;
  /** The problem lines, in the order found (at most MAX_STORED_MESSAGES). */
  messages: string[];
  /** The extension's summary from the last pass, and whether a repair dropped its structures. */
  extension?: { key: string; summary: Record<string, unknown>; dropped: boolean };
}

function zeroCounts(): CheckCounts {
  return {
    checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, imageEndOffset: 0,
    totalClusters: 0, allocatedClusters: 0, fragmentedClusters: 0, compressedClusters: 0,
  };
}

/** qemu-img check's exit code: 1 not completed, 2 corruptions, 3 leaks only, 0 clean. */
export function checkExitCode(result: ImageCheck): number {
  if (result.failure !== undefined || result.checkErrors) return 1;
  if (result.corruptions) return 2;
  if (result.leaks) return 3;
  return 0;
}

/** Aborts a pass, like a negative return in QEMU; `reason` is what "Check failed: …" prints. */
class CheckAborted extends Error {
  constructor(readonly reason: string) {
    super(reason);
  }
}

// ---------------------------------------------------------------- small helpers

/** PRIx64 of a u64 given as hi/lo halves: lower-case hex, no prefix. */
function hex64(hi: number, lo: number): string {
  return hi ? (hi >>> 0).toString(16) + (lo >>> 0).toString(16).padStart(8, '0') : (lo >>> 0).toString(16);
}

/** C's "%#x": "0" for zero, else 0x-prefixed hex. */
function sharpHex(n: number | bigint): string {
  return n === 0 || n === 0n ? '0' : '0x' + n.toString(16);
}

/** hi*2^32 + lo: exact whenever the low 9 bits are clear and the value is below 2^62. */
function join64(hi: number, lo: number): number {
  return (hi >>> 0) * TWO_32 + (lo >>> 0);
}


/**
 * The in-memory refcount table (QEMU's IMRT): one counter per host cluster, of the image's
 * refcount width, so it never holds more than the width can store (QEMU reports overflows).
 */
class RefcountArray {
  private data: Uint8Array | Uint16Array | Uint32Array | Float64Array;
  size: number;

  constructor(private readonly refcountOrder: number, size: number) {
    this.size = size;
    this.data = this.alloc(size);
  }

  private alloc(n: number): Uint8Array | Uint16Array | Uint32Array | Float64Array {
    if (this.refcountOrder <= 3) return new Uint8Array(n);
    if (this.refcountOrder === 4) return new Uint16Array(n);
    if (this.refcountOrder === 5) return new Uint32Array(n);
    return new Float64Array(n);
  }

  get(clusterIndex: number): number {
    return clusterIndex < this.size ? this.data[clusterIndex] : 0;
  }

  set(clusterIndex: number, value: number): void {
    if (clusterIndex >= this.size) this.grow(clusterIndex + 1);
    this.data[clusterIndex] = value;
  }

  /** Makes the array cover `size` clusters (never shrinks). */
  grow(size: number): void {
    if (size <= this.size) return;
    if (size > this.data.length) {
      const next = this.alloc(Math.max(size, this.data.length + (this.data.length >>> 3) + 64));
      next.set(this.data.subarray(0, this.size));
      this.data = next;
    }
    this.size = size;
  }

  clear(): void {
    this.data.fill(0);
  }
}

/** One snapshot table entry, as far as the check needs it. */
interface CheckSnapshot {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
}

/** What a pass runs on: the file, its header (updated in place by repairs) and the active L1. */
export interface CheckTarget {
  path: string;
  file: BlockFile;
  header: Header;
  /** The active L1 table in memory; repairs of L1 entries are applied to it too. */
  l1: Buffer;
  /** True when the file was opened for writing (required by a repair). */
  writable: boolean;
}

// ---------------------------------------------------------------- stored refcounts

/**
 * The refcounts as stored on disk: the refcount table (read whole, ≤ 8 MiB) and a bounded
 * cache of refcount blocks. get() fails, like QEMU's qcow2_get_refcount, for clusters whose
 * block offset is not cluster aligned.
 */
class StoredRefcounts {
  readonly entries: number;
  private readonly cache = new Map<number, { buf: Buffer; dirty: boolean }>();

  constructor(private readonly run: CheckRun, readonly tableOffset: number, readonly table: Buffer) {
    this.entries = table.length / 8;
  }

  /** Masked offset of block `tableIndex` (0 when absent), and whether it is usable. */
  blockOffset(tableIndex: number): { offset: number; hi: number; lo: number } {
    const hi = this.table.readUInt32BE(tableIndex * 8);
    const lo = (this.table.readUInt32BE(tableIndex * 8 + 4) & REFT_OFFSET_MASK_LO) >>> 0;
    return { offset: join64(hi, lo), hi, lo };
  }

  /** The block covering table entry `tableIndex`, null if none, undefined if unreadable (unaligned). */
  async block(tableIndex: number): Promise<Buffer | null | undefined> {
    if (tableIndex >= this.entries) return null;
    const cached = this.cache.get(tableIndex);
    if (cached) return cached.buf;
    const { offset, hi, lo } = this.blockOffset(tableIndex);
    if (offset === 0) return null;
    if (lo % this.run.clusterSize !== 0) {
      this.run.signalCorruption(`Refblock offset ${sharpHex((BigInt(hi) << 32n) | BigInt(lo))} unaligned (reftable index: ${sharpHex(tableIndex)})`);
      return undefined;
    }
    if (this.cache.size >= MAX_CACHED_REFBLOCKS) await this.evict();
    const buf = await this.run.readClipped(offset, this.run.clusterSize);
    this.cache.set(tableIndex, { buf, dirty: false });
    return buf;
  }

  private async evict(): Promise<void> {
    for (const [t, b] of this.cache) {
      if (b.dirty) await this.run.write(this.blockOffset(t).offset, b.buf);
      this.cache.delete(t);
      if (this.cache.size < MAX_CACHED_REFBLOCKS / 2) return;
    }
  }

  /** Stored refcount of host cluster `clusterIndex`; undefined when it cannot be read. */
  async get(clusterIndex: number): Promise<number | undefined> {
    const per = this.run.blockEntries;
    const t = Math.floor(clusterIndex / per);
    const block = await this.block(t);
    if (block === undefined) return undefined;
    return block ? getRefcount(block, clusterIndex - t * per, this.run.header.refcountOrder) : 0;
  }

  /** Sets a stored refcount (the block must exist). Returns false when it does not. */
  async set(clusterIndex: number, value: number): Promise<boolean> {
    const per = this.run.blockEntries;
    const t = Math.floor(clusterIndex / per);
    const block = await this.block(t);
    if (!block) return false;
    setRefcount(block, clusterIndex - t * per, this.run.header.refcountOrder, value);
    this.cache.get(t)!.dirty = true;
    return true;
  }

  /** Writes the changed blocks back (the caller syncs). */
  async flush(): Promise<void> {
    const dirty = [...this.cache].filter(([, b]) => b.dirty).sort((a, b) => this.blockOffset(a[0]).offset - this.blockOffset(b[0]).offset);
    for (const [t, b] of dirty) {
      await this.run.write(this.blockOffset(t).offset, b.buf);
      b.dirty = false;
    }
  }
}

// ---------------------------------------------------------------- one image, one or more passes

/**
 * The state shared by the passes over one image (the repair pass and the double check that
 * follows it): where messages go, whether the corruption event was already printed, and
 * whether the autoclear bits were already cleared before a write.
 */
class CheckRun {
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly l2Entries: number;
  readonly blockEntries: number;
  readonly maxRefcount: number;
  readonly messages: string[] = [];
  private emitted = 0;
  private signaled = false;
  private autoclearDone = false;
  private fix = 0;

  // Per pass:
  res: CheckCounts = zeroCounts();
  fileSize = 0;
  imrt!: RefcountArray;
  stored!: StoredRefcounts;
  snapshots: CheckSnapshot[] = [];
  snapshotsSize = 0;
  /** metadataOverlap's index; null when the structures it reflects were loaded or moved since. */
  private overlapIndex: { l2Tables: Float64Array; refcountBlocks: Float64Array } | null = null;
  rebuild = false;
  highestCluster = 0;
  /** Clusters of the refcount structure in use on disk: a rebuild must not write there before the switch. */
  private oldStructure = new Set<number>();
  /** The extension's report for this pass, and its problems found while counting (overlaps). */
  extReport: ExtensionReport | null = null;
  private extOverlaps = 0;
  private extCounted = false;
  /** Bitmap of the clusters the extension's areas own, counted as referenced. */
  private extOwned: Uint8Array | null = null;
  /** Set once a repair has dropped the extension's structures (kept across passes). */
  extDropped = false;
  /** Autoclear bits a repair keeps besides the bitmaps bit (those of trusted, sound structures). */
  private keepAutoclear = 0n;

  constructor(readonly target: CheckTarget, private readonly onMessage?: (line: string) => void, readonly extension: CheckExtension | null = null) {
    this.clusterSize = clusterSizeOf(target.header);
    this.clusterBits = target.header.clusterBits;
    this.l2Entries = l2EntriesOf(target.header);
    this.blockEntries = refblockEntries(this.clusterBits, target.header.refcountOrder);
    this.maxRefcount = maxRefcount(target.header.refcountOrder);
  }

  get header(): Header {
    return this.target.header;
  }

  /** Reports a problem line `times` times (bounded, I4). */
  emit(line: string, times = 1): void {
    for (let i = 0; i < times; i++) {
      if (this.emitted >= MAX_EMITTED_MESSAGES) {
        if (this.emitted === MAX_EMITTED_MESSAGES) {
          const note = `qdedup: more than ${MAX_EMITTED_MESSAGES} problems; further messages suppressed`;
          this.onMessage?.(note);
          if (this.messages.length < MAX_STORED_MESSAGES) this.messages.push(note);
          this.emitted++;
        }
        return;
      }
      this.emitted++;
      this.onMessage?.(line);
      if (this.messages.length < MAX_STORED_MESSAGES) this.messages.push(line);
    }
  }

  /** QEMU's qcow2_signal_corruption for a read-only image: printed once, never written to the header. */
  signalCorruption(what: string): void {
    if (this.signaled) return;
    this.signaled = true;
    this.emit(`qcow2: Image is corrupt: ${what}; further non-fatal corruption events will be suppressed`);
  }

  // ------------------------------------------------------------ I/O

  /** Reads `length` bytes at `hostOffset`; bytes past the end of the file (or past 2^53) read as zeros. */
  async readClipped(hostOffset: number, length: number): Promise<Buffer> {
    if (hostOffset >= this.fileSize || !Number.isSafeInteger(hostOffset)) return Buffer.alloc(length);
    const inside = Math.min(length, this.fileSize - hostOffset);
    const data = await this.target.file.read(hostOffset, inside);
    if (inside === length) return data;
    const out = Buffer.alloc(length);
    data.copy(out);
    return out;
  }

  /** Every write of a repair goes through here: never without a repair mode, autoclear bits cleared first. */
  async write(hostOffset: number, data: Buffer): Promise<void> {
    if (!this.fix || !this.target.writable) throw new QdedupError('internal: check tried to write without a repair mode', 'EINTERNAL');
    await this.clearAutoclearBits();
    await this.target.file.write(hostOffset, data);
    if (hostOffset + data.length > this.fileSize) this.fileSize = hostOffset + data.length;
  }

  async sync(): Promise<void> {
    if (this.fix && this.target.writable) await this.target.file.sync();
  }

  /**
   * The spec's rule for writers: autoclear bits we do not maintain are cleared, durably,
   * before the first other write. A repair never changes guest data, so the bitmaps stay
   * true and their bit is kept, as QEMU's check does (its clusters are counted above).
   */
  private async clearAutoclearBits(): Promise<void> {
    if (this.autoclearDone) return;
    this.autoclearDone = true;
    const h = this.header;
    const keep = AUTOCLEAR_BITMAPS | this.keepAutoclear;
    if (h.version !== 3 || (h.autoclearFeatures & ~keep) === 0n) return;
    h.autoclearFeatures &= keep;
    const field = Buffer.alloc(8);
    field.writeBigUInt64BE(h.autoclearFeatures);
    await this.target.file.write(88, field);
    await this.target.file.sync(); // autoclear bits cleared on disk before anything they vouch for changes
  }

  /**
   * `-r all` on structures with problems: clears their autoclear bits, durably, before
   * anything else is written or freed (I3: once the bit is clear nobody trusts them, so
   * their areas may then be freed as the leaks they have become).
   */
  private async dropExtension(bits: bigint): Promise<void> {
    if (!this.fix || !this.target.writable) throw new QdedupError('internal: check tried to write without a repair mode', 'EINTERNAL');
    const h = this.header;
    this.keepAutoclear &= ~bits;
    this.extDropped = true;
    if (!(h.autoclearFeatures & bits)) return;
    h.autoclearFeatures &= ~bits;
    const field = Buffer.alloc(8);
    field.writeBigUInt64BE(h.autoclearFeatures);
    await this.target.file.write(88, field);
    await this.target.file.sync();
  }

  private async writeIncompatibleFeatures(): Promise<void> {
    const field = Buffer.alloc(8);
    field.writeBigUInt64BE(this.header.incompatibleFeatures);
    await this.write(72, field);
  }

  // ------------------------------------------------------------ the pass

  /**
   * One check of the image (QEMU's qcow2_co_check_locked). Returns the counts, and the
   * reason when the check could not be completed. Repairs what `fix` allows.
   */
  async pass(fix: number): Promise<{ res: CheckCounts; failure?: string }> {
    this.fix = fix;
    this.res = zeroCounts();
    this.rebuild = false;
    const snapshotRes = zeroCounts();
    try {
      this.fileSize = await this.target.file.size();
      await this.inspectExtension(fix);
      await this.readSnapshotTable(snapshotRes);
      await this.checkRefcounts(fix);
      addCounts(this.res, snapshotRes);
      if (fix && this.res.checkErrors === 0 && this.res.corruptions === 0) await this.markCleanAndConsistent();
      return { res: this.res };
    } catch (err) {
      addCounts(this.res, snapshotRes);
      if (err instanceof CheckAborted) return { res: this.res, failure: err.reason };
      if (err instanceof IoError) {
        this.emit(`ERROR: ${err.message}`);
        this.res.checkErrors++;
        return { res: this.res, failure: 'Input/output error' };
      }
      throw err;
    } finally {
      this.fix = 0;
    }
  }

  /** Asks the extension for its report on the image as it is now and decides which autoclear bits a repair keeps. */
  private async inspectExtension(fix: number): Promise<void> {
    this.extReport = null;
    this.extOverlaps = 0;
    this.extCounted = false;
    this.extOwned = null;
    this.keepAutoclear = 0n;
    if (!this.extension) return;
    this.extReport = await this.extension.inspect();
    const r = this.extReport;
    // Trusted structures keep their bit through a repair, unless -r all is about to drop them.
    if (r && r.trusted && !(r.problemCount && fix & FIX_ERRORS)) this.keepAutoclear = this.extension.autoclear;
  }

  /**
   * At the end of calculate_refcounts: reports the extension's problems (and areas that
   * overlap other structures or each other), drops the structures under `-r all` when there
   * are any, else counts their areas as referenced. A second call in the same pass (after a
   * refcount rebuild) counts again without reporting again.
   */
  private async countExtension(fix: number): Promise<void> {
    const r = this.extReport;
    if (!r || !this.extension) return;
    const cs = this.clusterSize;
    if (!this.extCounted) {
      this.extCounted = true;
      for (const line of r.unfixable) this.emit(line);
      this.res.corruptions += r.unfixable.length;
      for (const line of r.problems) this.emit(line);
      this.res.corruptions += r.problemCount;
      if (r.trusted && !this.extDropped) {
        // One bit per cluster the areas own; an area stops at its first cluster that another
        // structure (or an earlier area) already uses, so the work is bounded by the file.
        const limit = this.imrt.size + MAX_REPAIR_GROWTH_CLUSTERS;
        const owned = new Uint8Array(Math.ceil(limit / 8));
        const has = (c: number) => (owned[c >>> 3] & (1 << (c & 7))) !== 0;
        for (const a of r.areas) {
          const first = Math.floor(a.offset / cs);
          const last = Math.floor((a.offset + Math.max(a.bytes, 1) - 1) / cs);
          for (let c = first; c <= last; c++) {
            const why = c >= limit ? 'extends too far past the end of the file'
              : has(c) || this.imrt.get(c) > 0 ? `shares cluster 0x${(c * cs).toString(16)} with another structure` : null;
            if (why) {
              this.emit(`ERROR ${a.what} at 0x${a.offset.toString(16)}: ${why}`);
              this.extOverlaps++;
              break;
            }
            owned[c >>> 3] |= 1 << (c & 7);
          }
        }
        this.extOwned = owned;
        this.res.corruptions += this.extOverlaps;
        const fixable = r.problemCount + this.extOverlaps;
        if (fixable && fix & FIX_ERRORS) {
          await this.dropExtension(this.extension.autoclear);
          this.emit(`Repairing ${this.extension.key}: structures dropped (autoclear bits 0x${this.extension.autoclear.toString(16)} cleared)${r.areas.length ? '; their clusters are now leaks' : ''}`);
          this.res.corruptions -= fixable;
          this.res.corruptionsFixed += fixable;
        }
      }
    } else {
      // Counted again after a rebuild: the same problems, not reported twice.
      this.res.corruptions += r.unfixable.length + (this.extDropped ? 0 : r.problemCount + this.extOverlaps);
    }
    if (!r.trusted || this.extDropped || !this.extOwned) return;
    // Not inc(): an area may end past the end of the file (allocated, not yet written).
    const owned = this.extOwned;
    for (let byte = 0; byte < owned.length; byte++) {
      if (!owned[byte]) continue;
      for (let bit = 0; bit < 8; bit++) {
        if (!(owned[byte] & (1 << bit))) continue;
        const c = byte * 8 + bit;
        if (c >= this.imrt.size) this.imrt.grow(c + 1);
        this.imrt.set(c, this.imrt.get(c) + 1);
      }
    }
  }

  /** qcow2_mark_clean + qcow2_mark_consistent: clears the dirty and corrupt bits once all is on disk. */
  private async markCleanAndConsistent(): Promise<void> {
    const h = this.header;
    const bits = h.incompatibleFeatures & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
    if (!bits) return;
    await this.sync(); // I3: every repair durable before the header says the image is clean
    h.incompatibleFeatures &= ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
    await this.writeIncompatibleFeatures();
    await this.sync();
  }

  // ------------------------------------------------------------ snapshot table

  /**
   * Reads the snapshot table (qcow2_check_read_snapshot_table). A table that cannot be read
   * is a check error; a v3 entry without the mandatory extra data is a corruption.
   */
  private async readSnapshotTable(res: CheckCounts): Promise<void> {
    const h = this.header;
    this.overlapIndex = null;
    this.snapshots = [];
    this.snapshotsSize = 0;
    if (h.nbSnapshots === 0) return;
    const fail = (why: string, reason: string): never => {
      res.checkErrors++;
      this.emit(`ERROR failed to read the snapshot table: ${why}`);
      this.snapshots = [];
      this.snapshotsSize = 0;
      throw new CheckAborted(reason);
    };
    let buf = Buffer.alloc(0);
    let bufStart = h.snapshotsOffset;
    let pos = 0;
    const incomplete: number[] = [];
    for (let i = 0; i < h.nbSnapshots;) {
      if (pos + 40 <= buf.length && buf.readUInt32BE(pos + 36) > 1024) fail(`Too much extra metadata in snapshot table entry ${i}`, 'File too large');
      let decoded;
      try {
        decoded = decodeSnapshotEntry(buf, pos, bufStart);
      } catch (err) {
        if (err instanceof QdedupError) fail(err.message, 'Invalid argument');
        throw err;
      }
      if (!decoded) {
        const more = await this.readClipped(bufStart + buf.length, 64 * 1024);
        buf = Buffer.concat([buf.subarray(pos), more]);
        bufStart += pos;
        pos = 0;
        continue;
      }
      const e = decoded.entry;
      if (h.version === 3 && buf.readUInt32BE(pos + 36) < 16) incomplete.push(i);
      this.snapshots.push({ id: e.id, name: e.name, l1TableOffset: e.l1TableOffset, l1Size: e.l1Size });
      pos += decoded.length;
      this.snapshotsSize = bufStart + pos - h.snapshotsOffset;
      if (this.snapshotsSize > MAX_SNAPSHOT_TABLE_BYTES) fail('Snapshot table is too big', 'File too large');
      i++;
    }
    this.overlapIndex = null;
    // A v3 entry must carry at least the 64-bit VM state size and the disk size (16 bytes).
    for (const i of incomplete) {
      res.corruptions++;
      this.emit(`ERROR snapshot table entry ${i} is incomplete`);
    }
  }

  // ------------------------------------------------------------ qcow2_check_refcounts

  private async checkRefcounts(fix: number): Promise<void> {
    const h = this.header;
    const nbClusters = Math.ceil(this.fileSize / this.clusterSize);
    if (nbClusters > MAX_CHECK_CLUSTERS) {
      this.res.checkErrors++;
      throw new CheckAborted('File too large');
    }
    this.res.totalClusters = Math.ceil((Math.floor(h.size / 512) * 512) / this.clusterSize);
    this.imrt = new RefcountArray(h.refcountOrder, nbClusters);
    this.stored = new StoredRefcounts(this, h.refcountTableOffset, await this.readClipped(h.refcountTableOffset, h.refcountTableClusters * this.clusterSize));
    this.overlapIndex = null;

    await this.calculateRefcounts(fix);

    // With a repair that needs no rebuild, the comparison is redone with fixing on, from these counts.
    const preCompare = { ...this.res };
    await this.compareRefcounts(0);

    if (this.rebuild && fix & FIX_ERRORS) {
      const old = { ...this.res };
      this.emit('Rebuilding refcount structure');
      await this.rebuildRefcountStructure();
      this.res.corruptions = 0;
      this.res.leaks = 0;
      // The old structure was exchanged for a new one: count the references again.
      this.rebuild = false;
      this.imrt.clear();
      this.resetFragInfo();
      await this.calculateRefcounts(0);
      let freshLeaks = 0;
      if (fix & FIX_LEAKS) {
        // The old refcount structure is now leaked; those leaks come from the rebuild, not from the image.
        const saved = { ...this.res };
        this.res = zeroCounts();
        await this.compareRefcounts(FIX_LEAKS);
        if (this.rebuild) this.emit('ERROR rebuilt refcount structure is still broken');
        freshLeaks = this.res.leaks;
        this.res = saved;
      }
      if (this.res.corruptions < old.corruptions) this.res.corruptionsFixed += old.corruptions - this.res.corruptions;
      if (this.res.leaks < old.leaks) this.res.leaksFixed += old.leaks - this.res.leaks;
      this.res.leaks += freshLeaks;
    } else if (fix) {
      if (this.rebuild) {
        this.emit('ERROR need to rebuild refcount structures');
        this.res.checkErrors++;
        throw new CheckAborted('Input/output error');
      }
      if (this.res.leaks || this.res.corruptions) {
        this.res = preCompare;
        await this.compareRefcounts(fix);
      }
    }
    await this.stored.flush();
    await this.sync(); // I3: refcounts fixed on disk before COPIED flags are set from them

    await this.checkOflagCopied(fix);
    await this.sync();
    this.res.imageEndOffset = (this.highestCluster + 1) * this.clusterSize;
  }

  private resetFragInfo(): void {
    this.res.allocatedClusters = 0;
    this.res.fragmentedClusters = 0;
    this.res.compressedClusters = 0;
  }

  /**
   * Adds `times` references to every cluster of [hostOffset, +byteLength) in the IMRT
   * (qcow2_inc_refcounts_imrt). A range ending a cluster or more past the end of the file
   * is a corruption; a counter at the width's maximum overflows (a corruption per reference).
   */
  private inc(hostOffset: number, byteLength: number, times = 1, offsetHex?: string): void {
    if (byteLength <= 0 || times <= 0) return;
    if (hostOffset + byteLength - this.fileSize >= this.clusterSize) {
      this.emit(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offsetHex ?? hostOffset.toString(16)} size 0x${byteLength.toString(16)}`, times);
      this.res.corruptions += times;
      return;
    }
    const first = Math.floor(hostOffset / this.clusterSize);
    const last = Math.floor((hostOffset + byteLength - 1) / this.clusterSize);
    for (let k = first; k <= last; k++) {
      if (k >= this.imrt.size) this.imrt.grow(k + 1);
      const current = this.imrt.get(k);
      const added = Math.min(times, this.maxRefcount - current);
      this.imrt.set(k, current + added);
      const overflow = times - added;
      if (overflow > 0) {
        for (let i = 0; i < overflow && i < 2; i++) {
          this.emit(`ERROR: overflow cluster offset=0x${(k * this.clusterSize).toString(16)}`);
          this.emit('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
        }
        if (overflow > 2) this.emit(`ERROR: overflow cluster offset=0x${(k * this.clusterSize).toString(16)} (${overflow - 2} more times)`);
        this.res.corruptions += overflow;
      }
    }
  }

  /** calculate_refcounts: fills the IMRT from every structure the header reaches. */
  private async calculateRefcounts(fix: number): Promise<void> {
    const h = this.header;
    this.inc(0, this.clusterSize); // header

    await this.checkL1Group([{ offset: h.l1TableOffset, size: h.l1Size, times: 1, active: true }], true, fix);

    const groups: { offset: number; size: number; times: number; active: boolean }[] = [];
    for (const sn of this.snapshots) {
      if (sn.l1TableOffset % this.clusterSize !== 0) {
        this.emit(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=${sharpHex(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
        this.res.corruptions++;
        continue;
      }
      if (sn.l1Size > MAX_L1_BYTES / 8) {
        this.emit(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=${sharpHex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
        this.res.corruptions++;
        continue;
      }
      // Snapshots sharing one L1 table are checked once, counted with their number.
      const same = groups.find((g) => g.offset === sn.l1TableOffset && g.size === sn.l1Size);
      if (same) same.times++;
      else groups.push({ offset: sn.l1TableOffset, size: sn.l1Size, times: 1, active: false });
    }
    await this.checkL1Group(groups, false, fix);

    this.inc(h.snapshotsOffset, this.snapshotsSize);
    this.inc(h.refcountTableOffset, this.stored.entries * 8);
    await this.checkBitmaps();
    await this.checkRefblocks(fix);
    await this.countExtension(fix);
  }

  /** The L1 table of a group as a buffer (the active one from memory; others read, clipped to the file). */
  private async l1Table(offset: number, entries: number, active: boolean): Promise<Buffer> {
    if (active) return this.target.l1;
    return this.readClipped(offset, entries * 8);
  }

  /**
   * check_refcounts_l1 for a group of L1 tables (the active one, or all snapshot ones). Each
   * in-file L2 table is read once and counted with the number of L1 entries of the group
   * that point at it, which is what QEMU's one-by-one walk adds up to.
   */
  private async checkL1Group(tables: { offset: number; size: number; times: number; active: boolean }[], active: boolean, fix: number): Promise<void> {
    const visits = new Map<number, number>();
    for (const t of tables) {
      if (!t.size) continue;
      const l1 = await this.l1Table(t.offset, t.size, active);
      for (let i = 0; i < t.size; i++) {
        const hi = l1.readUInt32BE(i * 8);
        const lo = l1.readUInt32BE(i * 8 + 4);
        if (!hi && !lo) continue;
        const l2Offset = join64(hi & OFFSET_MASK_HI, lo & OFFSET_MASK_LO);
        if (l2Offset < this.fileSize) visits.set(l2Offset, (visits.get(l2Offset) ?? 0) + t.times);
      }
    }
    const done = new Set<number>();
    for (const t of tables) {
      if (!t.size) continue;
      this.inc(t.offset, t.size * 8, t.times); // the L1 table itself
      const l1 = await this.l1Table(t.offset, t.size, active);
      for (let i = 0; i < t.size; i++) {
        const hi = l1.readUInt32BE(i * 8);
        const lo = l1.readUInt32BE(i * 8 + 4);
        if (!hi && !lo) continue;
        if (hi & L1E_RESERVED_HI || lo & L1E_RESERVED_LO) {
          this.emit(`ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`, t.times);
          this.res.corruptions += t.times;
        }
        const l2Hi = hi & OFFSET_MASK_HI;
        const l2Lo = (lo & OFFSET_MASK_LO) >>> 0;
        const l2Offset = join64(l2Hi, l2Lo);
        this.inc(l2Offset, this.clusterSize, t.times, hex64(l2Hi, l2Lo)); // the L2 table
        if (l2Offset % this.clusterSize !== 0) {
          this.emit(`ERROR l2_offset=${hex64(l2Hi, l2Lo)}: Table is not cluster aligned; L1 entry corrupted`, t.times);
          this.res.corruptions += t.times;
        }
        if (l2Offset >= this.fileSize || done.has(l2Offset)) continue; // past EOF it reads as zeros: nothing more to count
        done.add(l2Offset);
        await this.checkL2(l2Offset, visits.get(l2Offset) ?? t.times, active, fix);
      }
    }
  }

  /**
   * check_refcounts_l2: counts the clusters an L2 table references, `times` over, and checks
   * its entries (reserved bits, alignment, COPIED on compressed entries). For the active
   * table it also gathers the allocation, fragmentation and compression figures.
   */
  private async checkL2(l2Offset: number, times: number, active: boolean, fix: number): Promise<void> {
    const table = await this.readClipped(l2Offset, this.clusterSize);
    const cs = this.clusterSize;
    let nextContiguousOffset = 0;
    for (let i = 0; i < this.l2Entries; i++) {
      const hi = table.readUInt32BE(i * 8);
      const lo = table.readUInt32BE(i * 8 + 4);
      if (hi & QCOW_OFLAG_COMPRESSED_HI) {
        const entry = table.readBigUInt64BE(i * 8);
        const shift = BigInt(70 - this.clusterBits);
        const coffset = entry & ((1n << shift) - 1n);
        if (hi & QCOW_OFLAG_COPIED_HI) {
          this.emit(`ERROR: coffset=0x${coffset.toString(16)}: copied flag must never be set for compressed clusters`, times);
          this.res.corruptions += times;
        }
        const sectors = Number((entry >> shift) & ((1n << BigInt(this.clusterBits - 8)) - 1n)) + 1;
        const csize = sectors * 512 - Number(coffset & 511n);
        this.inc(Number(coffset), csize, times, coffset.toString(16));
        if (active) {
          this.res.allocatedClusters += times;
          this.res.compressedClusters += times;
          this.res.fragmentedClusters += times; // compressed clusters are fragmented by nature
        }
        continue;
      }
      if (hi & L2E_STD_RESERVED_HI || lo & L2E_STD_RESERVED_LO) {
        this.emit(`ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`, times);
        this.res.corruptions += times;
      }
      const offHi = hi & OFFSET_MASK_HI;
      const offLo = (lo & OFFSET_MASK_LO) >>> 0;
      if (!offHi && !offLo) continue; // unallocated, or a zero cluster without a host cluster
      const hostOffset = join64(offHi, offLo);
      const offsetHex = hex64(offHi, offLo);
      if (offLo % cs !== 0) {
        this.res.corruptions += times;
        if (lo & QCOW_OFLAG_ZERO_LO) {
          const fixing = (fix & FIX_ERRORS) !== 0;
          this.emit(`${fixing ? 'Repairing' : 'ERROR'} offset=${offsetHex}: Preallocated cluster is not properly aligned; L2 entry corrupted.`, fixing ? 1 : times);
          if (fixing && (await this.fixL2EntryByZero(l2Offset, i, active))) {
            this.res.corruptions -= times;
            this.res.corruptionsFixed++;
            continue; // the entry no longer references anything
          }
        } else {
          this.emit(`ERROR offset=${offsetHex}: Data cluster is not properly aligned; L2 entry corrupted.`, times);
        }
      }
      if (active) {
        this.res.allocatedClusters += times;
        if (nextContiguousOffset && hostOffset !== nextContiguousOffset) this.res.fragmentedClusters += times;
        nextContiguousOffset = hostOffset + cs;
      }
      this.inc(hostOffset, cs, times, offsetHex);
    }
  }

  /** fix_l2_entry_by_zero: turns a preallocated zero cluster with a bad offset into a plain zero cluster. */
  private async fixL2EntryByZero(l2Offset: number, l2Index: number, active: boolean): Promise<boolean> {
    const entryOffset = l2Offset + l2Index * 8;
    const overlap = this.metadataOverlap(entryOffset, 8, active ? 'active L2 table' : 'inactive L2 table');
    if (overlap) {
      this.emit('ERROR: Overlap check failed');
      this.res.checkErrors++;
      throw new CheckAborted('Input/output error');
    }
    const entry = Buffer.alloc(8);
    entry.writeUInt32BE(QCOW_OFLAG_ZERO_LO, 4);
    try {
      await this.write(entryOffset, entry);
      await this.sync();
    } catch (err) {
      this.emit(`ERROR: Failed to overwrite L2 table entry: ${errnoText(err) ?? 'Input/output error'}`);
      this.res.checkErrors++;
      return false;
    }
    return true;
  }

  /** The bitmaps extension in force (autoclear bit 0 set), validated as QEMU does at open; null when none. */
  private bitmapsExtension(): { count: number; directorySize: number; directoryOffset: number } | null {
    const h = this.header;
    if (!(h.autoclearFeatures & AUTOCLEAR_BITMAPS)) return null;
    const ext = h.extensions.find((e) => e.type === EXT_BITMAPS);
    if (!ext) return null;
    const invalid = (why: string): never => {
      this.emit(`ERROR bitmaps_ext: ${why}`);
      this.res.checkErrors++;
      throw new CheckAborted('Invalid argument');
    };
    if (ext.data.length !== 24) invalid('Invalid extension length');
    const count = ext.data.readUInt32BE(0);
    const directorySize = ext.data.readBigUInt64BE(8);
    const directoryOffset = ext.data.readBigUInt64BE(16);
    if (ext.data.readUInt32BE(4) !== 0) invalid('Reserved field is not zero');
    if (count > QCOW2_MAX_BITMAPS) invalid(`${count} bitmaps, exceeding the supported maximum of ${QCOW2_MAX_BITMAPS}`);
    if (count === 0) invalid('found bitmaps extension with zero bitmaps');
    if (directoryOffset % BigInt(this.clusterSize) !== 0n || directoryOffset >= 1n << 53n) invalid('invalid bitmap directory offset');
    if (directorySize > BigInt(QCOW2_MAX_BITMAP_DIRECTORY_SIZE)) invalid(`bitmap directory size (${directorySize}) exceeds the maximum supported size (${QCOW2_MAX_BITMAP_DIRECTORY_SIZE})`);
    return { count, directorySize: Number(directorySize), directoryOffset: Number(directoryOffset) };
  }

  /**
   * qcow2_check_bitmaps_refcounts: the bitmap directory, each bitmap table and its data
   * clusters. A directory or table QEMU cannot load is a corruption that ends the check.
   */
  private async checkBitmaps(): Promise<void> {
    const ext = this.bitmapsExtension();
    if (!ext) return;
    const cs = this.clusterSize;
    this.inc(ext.directoryOffset, ext.directorySize);
    const broken = (why: string): never => {
      this.emit(`ERROR bitmap directory: ${why}`);
      this.res.corruptions++;
      throw new CheckAborted('Invalid argument');
    };
    if (ext.directorySize === 0) broken('Requested bitmap directory size is zero');
    const dir = await this.readClipped(ext.directoryOffset, ext.directorySize);
    const diskBytes = BigInt(Math.floor(this.header.size / 512) * 512);
    const tables: { offset: number; entries: number }[] = [];
    let pos = 0;
    while (pos < dir.length) {
      if (pos + 24 > dir.length) broken('Broken bitmap directory');
      if (tables.length + 1 > ext.count) broken('More bitmaps found than specified in header extension');
      const tableOffset = dir.readBigUInt64BE(pos);
      const tableEntries = dir.readUInt32BE(pos + 8);
      const flags = dir.readUInt32BE(pos + 12);
      const type = dir[pos + 16];
      const granularityBits = dir[pos + 17];
      const nameSize = dir.readUInt16BE(pos + 18);
      const extraSize = dir.readUInt32BE(pos + 20);
      const entryBytes = Math.ceil((24 + nameSize + extraSize) / 8) * 8;
      if (pos + entryBytes > dir.length) broken('Broken bitmap directory');
      if (extraSize !== 0) broken('Bitmap extra data is not supported');
      const physBytes = BigInt(tableEntries) * BigInt(cs);
      const bad = tableEntries === 0 || tableOffset === 0n || tableOffset % BigInt(cs) !== 0n || tableOffset >= 1n << 53n
        || tableEntries > BME_MAX_TABLE_SIZE || granularityBits > BME_MAX_GRANULARITY_BITS || granularityBits < BME_MIN_GRANULARITY_BITS
        || (flags & BME_RESERVED_FLAGS) !== 0 || nameSize > BME_MAX_NAME_SIZE || type !== BT_DIRTY_TRACKING_BITMAP
        || physBytes > BigInt(BME_MAX_PHYS_SIZE) || diskBytes > (physBytes * 8n) << BigInt(granularityBits);
      if (bad) broken(`Bitmap '${dir.subarray(pos + 24, pos + 24 + nameSize).toString('utf8')}' doesn't satisfy the constraints`);
      tables.push({ offset: Number(tableOffset), entries: tableEntries });
      pos += entryBytes;
    }
    if (tables.length !== ext.count) broken('Less bitmaps found than specified in header extension');

    const CHUNK_ENTRIES = 128 * 1024;
    for (const t of tables) {
      this.inc(t.offset, t.entries * 8);
      // QEMU loads and validates the whole table before counting its clusters.
      for (let pass = 0; pass < 2; pass++) {
        for (let first = 0; first < t.entries; first += CHUNK_ENTRIES) {
          const n = Math.min(CHUNK_ENTRIES, t.entries - first);
          const chunk = await this.readClipped(t.offset + first * 8, n * 8);
          for (let i = 0; i < n; i++) {
            const hi = chunk.readUInt32BE(i * 8);
            const lo = chunk.readUInt32BE(i * 8 + 4);
            const offHi = hi & OFFSET_MASK_HI;
            const offLo = (lo & OFFSET_MASK_LO) >>> 0;
            const hasOffset = offHi !== 0 || offLo !== 0;
            if (pass === 0) {
              if (hi & BME_TABLE_ENTRY_RESERVED_HI || lo & BME_TABLE_ENTRY_RESERVED_LO
                || (hasOffset && (lo & BME_TABLE_ENTRY_FLAG_ALL_ONES || offLo % cs !== 0))) {
                this.emit(`ERROR bitmap table at 0x${t.offset.toString(16)}: invalid entry ${first + i}: ${hex64(hi, lo)}`);
                this.res.corruptions++;
                throw new CheckAborted('Invalid argument');
              }
            } else if (hasOffset) {
              this.inc(join64(offHi, offLo), cs, 1, hex64(offHi, offLo));
            }
          }
        }
      }
    }
  }

  /**
   * check_refblocks: alignment and reserved bits of each refcount table entry, and each
   * block's own reference (it must be exactly 1). A block past the end of the file is a
   * corruption; `-r all` grows the file to take it in, as QEMU does (within
   * MAX_REPAIR_GROWTH_CLUSTERS; beyond that the refcount structure is rebuilt instead).
   */
  private async checkRefblocks(fix: number): Promise<void> {
    const stored = this.stored;
    const fixing = (fix & FIX_ERRORS) !== 0;
    for (let i = 0; i < stored.entries; i++) {
      const rawLo = stored.table.readUInt32BE(i * 8 + 4);
      const { offset, hi, lo } = stored.blockOffset(i);
      if (rawLo & REFT_RESERVED_LO) {
        this.emit(`ERROR refcount table entry ${i} has reserved bits set`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      if (lo % this.clusterSize !== 0) {
        this.emit(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      const cluster = Math.floor(offset / this.clusterSize);
      if (hi >= 0x200000 || cluster >= this.imrt.size) {
        this.res.corruptions++;
        this.emit(`${fixing ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
        if (fixing) await this.growFileForRefblock(offset, hi);
        continue;
      }
      if (offset === 0) continue;
      this.inc(offset, this.clusterSize);
      if (this.imrt.get(cluster) !== 1) {
        this.emit(`ERROR refcount block ${i} refcount=${this.imrt.get(cluster)}`);
        this.res.corruptions++;
        this.rebuild = true;
      }
    }
  }

  /** The `-r all` repair of a refcount block past the end of the file: the file grows to hold it (zeros). */
  private async growFileForRefblock(blockOffset: number, hi: number): Promise<void> {
    const cluster = Math.floor(blockOffset / this.clusterSize);
    if (hi >= 0x200000 || cluster >= this.imrt.size + MAX_REPAIR_GROWTH_CLUSTERS) {
      this.rebuild = true;
      this.emit('ERROR could not resize image: File too large');
      return;
    }
    try {
      await this.clearAutoclearBits();
      await this.target.file.truncate(blockOffset + this.clusterSize);
    } catch (err) {
      this.rebuild = true;
      this.emit(`ERROR could not resize image: ${errnoText(err) ?? 'Input/output error'}`);
      return;
    }
    this.fileSize = await this.target.file.size();
    this.imrt.grow(Math.ceil(this.fileSize / this.clusterSize));
    this.res.corruptions--;
    this.res.corruptionsFixed++;
    this.inc(blockOffset, this.clusterSize); // a fresh zeroed cluster: its count is exactly 1
  }

  /**
   * compare_refcounts: stored refcount against counted references, cluster by cluster.
   * A stored 0 where there are references needs a rebuild; other mismatches are fixed
   * here when `fix` allows (leaks down, corruptions up).
   */
  private async compareRefcounts(fix: number): Promise<void> {
    const order = this.header.refcountOrder;
    const per = this.blockEntries;
    this.highestCluster = 0;
    for (let start = 0; start < this.imrt.size; start += per) {
      const t = start / per;
      const block = await this.stored.block(t);
      const end = Math.min(start + per, this.imrt.size);
      for (let i = start; i < end; i++) {
        if (block === undefined) {
          this.emit(`Can't get refcount for cluster ${i}: Input/output error`);
          this.res.checkErrors++;
          continue;
        }
        const refcount = block ? getRefcount(block, i - start, order) : 0;
        const references = this.imrt.get(i);
        if (refcount > 0 || references > 0) this.highestCluster = i;
        if (refcount === references) continue;
        let fixed: 'leaksFixed' | 'corruptionsFixed' | null = null;
        if (refcount === 0) this.rebuild = true;
        else if (refcount > references && fix & FIX_LEAKS) fixed = 'leaksFixed';
        else if (refcount < references && fix & FIX_ERRORS) fixed = 'corruptionsFixed';
        this.emit(`${fixed ? 'Repairing' : refcount < references ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${refcount} reference=${references}`);
        if (fixed && (await this.stored.set(i, references))) {
          this.res[fixed]++;
          continue;
        }
        if (refcount < references) this.res.corruptions++;
        else this.res.leaks++;
      }
    }
  }

  /**
   * check_oflag_copied: in the active tables COPIED must be set exactly when the refcount is
   * 1. `-r all` always repairs; `-r leaks` only when nothing else is wrong any more.
   */
  private async checkOflagCopied(fix: number): Promise<void> {
    const res = this.res;
    const repair = fix & FIX_ERRORS ? true : fix & FIX_LEAKS ? !res.checkErrors && !res.corruptions && !res.leaks : false;
    const l1 = this.target.l1;
    const l1Size = this.header.l1Size;
    // Several L1 entries pointing at one L2 table: check it once, count it for each.
    const visits = new Map<number, number>();
    for (let i = 0; i < l1Size; i++) {
      const l2Offset = join64(l1.readUInt32BE(i * 8) & OFFSET_MASK_HI, l1.readUInt32BE(i * 8 + 4) & OFFSET_MASK_LO);
      if (l2Offset) visits.set(l2Offset, (visits.get(l2Offset) ?? 0) + 1);
    }
    const done = new Set<number>();
    for (let i = 0; i < l1Size; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      const l2Offset = join64(hi & OFFSET_MASK_HI, lo & OFFSET_MASK_LO);
      if (!l2Offset) continue;
      const refcount = await this.stored.get(Math.floor(l2Offset / this.clusterSize));
      if (refcount === undefined) continue; // already reported by the comparison
      if ((refcount === 1) !== ((hi & QCOW_OFLAG_COPIED_HI) !== 0)) {
        res.corruptions++;
        this.emit(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(hi, lo)} refcount=${refcount}`);
        if (repair) {
          const newHi = refcount === 1 ? (hi | QCOW_OFLAG_COPIED_HI) >>> 0 : (hi & ~QCOW_OFLAG_COPIED_HI) >>> 0;
          await this.writeL1Entry(i, newHi, lo);
          res.corruptions--;
          res.corruptionsFixed++;
        }
      }
      if (done.has(l2Offset)) continue;
      done.add(l2Offset);
      const times = visits.get(l2Offset) ?? 1;
      if (l2Offset >= this.fileSize) continue; // reads as zeros: no entries
      const table = await this.readClipped(l2Offset, this.clusterSize);
      let dirty = 0;
      for (let j = 0; j < this.l2Entries; j++) {
        const eHi = table.readUInt32BE(j * 8);
        const eLo = table.readUInt32BE(j * 8 + 4);
        if (eHi & QCOW_OFLAG_COMPRESSED_HI) continue;
        const dataOffset = join64(eHi & OFFSET_MASK_HI, eLo & OFFSET_MASK_LO);
        if (!dataOffset) continue; // unallocated or plain zero cluster
        const dataRefcount = await this.stored.get(Math.floor(dataOffset / this.clusterSize));
        if (dataRefcount === undefined) continue;
        if ((dataRefcount === 1) !== ((eHi & QCOW_OFLAG_COPIED_HI) !== 0)) {
          res.corruptions += repair ? 1 : times;
          this.emit(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex64(eHi, eLo)} refcount=${dataRefcount}`, repair ? 1 : times);
          if (repair) {
            table.writeUInt32BE(dataRefcount === 1 ? (eHi | QCOW_OFLAG_COPIED_HI) >>> 0 : (eHi & ~QCOW_OFLAG_COPIED_HI) >>> 0, j * 8);
            dirty++;
          }
        }
      }
      if (dirty > 0) {
        const overlap = this.metadataOverlap(l2Offset, this.clusterSize, 'active L2 table');
        if (overlap) {
          this.emit('ERROR: Could not write L2 table; metadata overlap check failed: Input/output error');
          res.checkErrors++;
          throw new CheckAborted('Input/output error');
        }
        try {
          await this.write(l2Offset, table);
        } catch (err) {
          this.emit(`ERROR: Could not write L2 table: ${errnoText(err) ?? 'Input/output error'}`);
          res.checkErrors++;
          throw new CheckAborted(errnoText(err) ?? 'Input/output error');
        }
        res.corruptions -= dirty;
        res.corruptionsFixed += dirty;
      }
    }
  }

  /** qcow2_write_l1_entry: one active L1 entry, on disk and in memory. */
  private async writeL1Entry(l1Index: number, hi: number, lo: number): Promise<void> {
    const entryOffset = this.header.l1TableOffset + l1Index * 8;
    if (this.metadataOverlap(entryOffset, 8, 'active L1 table')) {
      this.res.checkErrors++;
      throw new CheckAborted('Input/output error');
    }
    const entry = Buffer.alloc(8);
    entry.writeUInt32BE(hi, 0);
    entry.writeUInt32BE(lo, 4);
    try {
      await this.write(entryOffset, entry);
    } catch (err) {
      this.res.checkErrors++;
      throw new CheckAborted(errnoText(err) ?? 'Input/output error');
    }
    entry.copy(this.target.l1, l1Index * 8);
  }

  /**
   * qcow2_check_metadata_overlap with QEMU's default ("cached") set of structures: the name of
   * the first structure that [hostOffset, +byteLength) touches, other than `ignore`, or null.
   * The active L2 tables and the refcount blocks are looked up in sorted arrays of their
   * offsets (overlapIndex, 8 bytes an entry), built at first use and dropped when the
   * structures move: a walk of the L1 and refcount tables per call made repairs of many
   * entries quadratic (fuzz seeds 12539 and 519418143).
   */
  metadataOverlap(hostOffset: number, byteLength: number, ignore?: string): string | null {
    if (byteLength === 0) return null;
    const cs = this.clusterSize;
    if (hostOffset < cs) return 'qcow2_header';
    const start = Math.floor(hostOffset / cs) * cs;
    const end = Math.ceil((hostOffset + byteLength) / cs) * cs;
    const hits = (offset: number, length: number) => length > 0 && start < offset + length && offset < end;
    /** Whether a cluster-sized structure at one of the sorted `offsets` hits [start, end). */
    const hitsAny = (offsets: Float64Array) => {
      let lo = 0;
      let hi = offsets.length;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        if (offsets[mid] + cs <= start) lo = mid + 1;
        else hi = mid;
      }
      return lo < offsets.length && offsets[lo] < end;
    };
    const h = this.header;
    const index = (this.overlapIndex ??= this.indexMetadata());
    if (ignore !== 'active L1 table' && h.l1Size && hits(h.l1TableOffset, h.l1Size * 8)) return 'active L1 table';
    if (hits(this.stored.tableOffset, this.stored.entries * 8)) return 'refcount table';
    if (this.snapshotsSize && hits(h.snapshotsOffset, this.snapshotsSize)) return 'snapshot table';
    for (const sn of this.snapshots) if (sn.l1Size && hits(sn.l1TableOffset, sn.l1Size * 8)) return 'inactive L1 table';
    if (ignore !== 'active L2 table' && hitsAny(index.l2Tables)) return 'active L2 table';
    if (hitsAny(index.refcountBlocks)) return 'refcount block';
    const ext = h.autoclearFeatures & AUTOCLEAR_BITMAPS ? h.extensions.find((e) => e.type === EXT_BITMAPS) : undefined;
    if (ext && ext.data.length === 24 && hits(Number(ext.data.readBigUInt64BE(16)), Number(ext.data.readBigUInt64BE(8)))) return 'bitmap directory';
    return null;
  }

  /** The offsets of the active L2 tables and of the refcount blocks, sorted. */
  private indexMetadata(): { l2Tables: Float64Array; refcountBlocks: Float64Array } {
    const l1 = this.target.l1;
    const l2: number[] = [];
    for (let i = 0; i < this.header.l1Size; i++) {
      const l2Offset = join64(l1.readUInt32BE(i * 8) & OFFSET_MASK_HI, l1.readUInt32BE(i * 8 + 4) & OFFSET_MASK_LO);
      if (l2Offset) l2.push(l2Offset);
    }
    const blocks: number[] = [];
    for (let i = 0; i < this.stored.entries; i++) {
      const { offset } = this.stored.blockOffset(i);
      if (offset) blocks.push(offset);
    }
    return { l2Tables: Float64Array.from(l2).sort(), refcountBlocks: Float64Array.from(blocks).sort() };
  }

  // ------------------------------------------------------------ rebuild_refcount_structure

  /**
   * Allocates `count` contiguous clusters in the IMRT (alloc_clusters_imrt), at or after
   * `from.cluster`, never on a cluster of the refcount structure still in use; the IMRT grows
   * past the end of the file when no free run is found. Returns the host offset.
   */
  private allocImrt(count: number, from: { cluster: number }): number {
    let cluster = from.cluster;
    let contiguous = 0;
    let firstGap = true;
    for (; cluster < this.imrt.size && contiguous < count; cluster++) {
      if (this.imrt.get(cluster) === 0 && !this.oldStructure.has(cluster)) {
        contiguous++;
        if (firstGap) {
          from.cluster = cluster;
          firstGap = false;
        }
      } else {
        contiguous = 0;
      }
    }
    // Not enough room before the end: the free run at the end is extended past it.
    if (contiguous < count) this.imrt.grow(cluster + count - contiguous);
    const start = cluster - contiguous;
    for (let i = 0; i < count; i++) this.imrt.set(start + i, 1);
    return start * this.clusterSize;
  }

  /**
   * rebuild_refcounts_write_refblocks: writes a refcount block, taken from the IMRT, for
   * every block range of [firstCluster, endCluster) that holds a used cluster, allocating
   * blocks (and entries of `reftable`) as needed. Returns true when the table had to grow.
   */
  private async writeRefblocks(firstCluster: number, endCluster: number, reftable: number[]): Promise<boolean> {
    const per = this.blockEntries;
    const from = { cluster: 0 };
    let grown = false;
    for (let cluster = firstCluster; cluster < endCluster; cluster++) {
      if (this.imrt.get(cluster) === 0) continue;
      const index = Math.floor(cluster / per);
      const blockStart = index * per;
      let blockOffset = index < reftable.length ? reftable[index] : 0;
      if (!blockOffset) {
        if (from.cluster < blockStart) from.cluster = blockStart; // never inside a block already written
        blockOffset = this.allocImrt(1, from);
        const blockCluster = blockOffset / this.clusterSize;
        if (blockCluster >= endCluster) endCluster = blockCluster + 1; // the block holding its own count must be written too
        if (reftable.length <= index) {
          const entries = Math.ceil(((index + 1) * 8) / this.clusterSize) * (this.clusterSize / 8);
          if (entries * 8 > MAX_REFTABLE_BYTES) {
            this.emit('qdedup: ERROR allocating reftable: the refcount table would exceed 8 MiB');
            this.res.checkErrors++;
            throw new CheckAborted('File too large');
          }
          while (reftable.length < entries) reftable.push(0);
          grown = true;
        }
        reftable[index] = blockOffset;
      }
      const block = Buffer.alloc(this.clusterSize);
      const order = this.header.refcountOrder;
      const last = Math.min(blockStart + per, this.imrt.size);
      for (let c = blockStart; c < last; c++) {
        const value = this.imrt.get(c);
        if (value) setRefcount(block, c - blockStart, order, value);
      }
      if (this.metadataOverlap(blockOffset, this.clusterSize)) {
        this.emit('qdedup: ERROR writing refblock: Input/output error');
        this.res.checkErrors++;
        throw new CheckAborted('Input/output error');
      }
      await this.writeOrAbort(blockOffset, block, 'ERROR writing refblock');
      cluster = blockStart + per - 1; // this block is done
    }
    return grown;
  }

  private async writeOrAbort(hostOffset: number, data: Buffer, what: string): Promise<void> {
    try {
      await this.write(hostOffset, data);
    } catch (err) {
      this.emit(`qdedup: ${what}: ${errnoText(err) ?? 'Input/output error'}`);
      this.res.checkErrors++;
      throw new CheckAborted(errnoText(err) ?? 'Input/output error');
    }
  }

  /**
   * rebuild_refcount_structure: a new refcount table and blocks, made from the IMRT alone,
   * in clusters nothing references. Order (I3): blocks and table written and synced, then the
   * header switched (synced); until then the old structure stays in force, untouched.
   */
  private async rebuildRefcountStructure(): Promise<void> {
    const h = this.header;
    // The old structure's clusters are off limits until the header no longer points at them.
    this.oldStructure = new Set<number>();
    const cs = this.clusterSize;
    for (let c = 0; c < h.refcountTableClusters; c++) this.oldStructure.add(Math.floor(h.refcountTableOffset / cs) + c);
    for (let i = 0; i < this.stored.entries; i++) {
      const { offset, hi } = this.stored.blockOffset(i);
      if (offset && hi < 0x200000) this.oldStructure.add(Math.floor(offset / cs));
    }
    const reftable: number[] = [];
    let grown = await this.writeRefblocks(0, this.imrt.size, reftable);
    let reftableOffset = 0;
    let reftableClusters = 0;
    do {
      reftableClusters = Math.ceil((reftable.length * 8) / cs);
      reftableOffset = this.allocImrt(reftableClusters, { cluster: 0 });
      const first = reftableOffset / cs;
      grown = await this.writeRefblocks(first, first + reftableClusters, reftable);
    } while (grown);

    const tableBuf = Buffer.alloc(reftableClusters * cs);
    reftable.forEach((o, i) => writeU64(tableBuf, i * 8, o));
    await this.writeOrAbort(reftableOffset, tableBuf, 'ERROR writing reftable');
    await this.sync(); // I3: the new blocks and table are durable before the header points at them

    const pointer = Buffer.alloc(12);
    writeU64(pointer, 0, reftableOffset);
    pointer.writeUInt32BE(reftableClusters, 8);
    await this.writeOrAbort(48, pointer, 'ERROR setting reftable');
    await this.sync();
    h.refcountTableOffset = reftableOffset;
    h.refcountTableClusters = reftableClusters;
    this.stored = new StoredRefcounts(this, reftableOffset, tableBuf);
    this.overlapIndex = null;
    this.oldStructure = new Set<number>();
  }
}

function addCounts(into: CheckCounts, from: CheckCounts): void {
  into.corruptions += from.corruptions;
  into.leaks += from.leaks;
  into.checkErrors += from.checkErrors;
  into.corruptionsFixed += from.corruptionsFixed;
  into.leaksFixed += from.leaksFixed;
}

// ---------------------------------------------------------------- entry points

/**
 * Checks an open image like `qemu-img check` (img_check): one pass, repairing when
 * `options.repair` is set (the image must then be open on a writable file), and when that
 * pass fixed something, a second, read-only pass whose counts are reported, with the fixed
 * counts of the first. Never writes without `repair`. Throws only on internal errors;
 * a check that cannot complete is reported in `failure`.
 */
export async function checkOpenImage(target: CheckTarget, options: CheckOptions = {}, extension: CheckExtension | null = null): Promise<ImageCheck> {
  const fix = options.repair === 'all' ? FIX_LEAKS | FIX_ERRORS : options.repair === 'leaks' ? FIX_LEAKS : 0;
  if (fix && !target.writable) throw new QdedupError('internal: a repair needs the image file open for writing', 'EINTERNAL');
  const run = new CheckRun(target, options.onMessage, extension);
  const first = await run.pass(fix);
  let final = first;
  let repaired: ImageCheck['repaired'];
  if (first.failure === undefined && (first.res.corruptionsFixed || first.res.leaksFixed)) {
    repaired = { leaksFixed: first.res.leaksFixed, corruptionsFixed: first.res.corruptionsFixed };
    final = await run.pass(0); // "Double checking the fixed image now..."
    final.res.leaksFixed = repaired.leaksFixed;
    final.res.corruptionsFixed = repaired.corruptionsFixed;
  }
  const result: ImageCheck = { ...final.res, filename: target.path, format: 'qcow2', repaired, failure: final.failure, messages: run.messages };
  if (extension && run.extReport) result.extension = { key: extension.key, summary: run.extReport.summary, dropped: run.extDropped };
  return result;
}

/**
 * Repairs a dirty image (incompatible bit 0) before its first write, as QEMU does on a
 * read-write open: a full check with `-r all` (rebuilding the refcount structure when
 * refcounts are missing), after which the dirty bit is cleared. The image's header and L1
 * in memory are updated with what changed. Messages go to `onMessage` (default: stderr).
 * Throws CorruptImageError when the image cannot be repaired (it stays dirty and unwritten
 * apart from the repairs).
 */
export async function rebuildRefcounts(image: Omit<CheckTarget, 'writable'>, onMessage: (line: string) => void = (line) => process.stderr.write(line + '\n')): Promise<void> {
  const result = await checkOpenImage({ path: image.path, file: image.file, header: image.header, l1: image.l1, writable: true }, { repair: 'all', onMessage });
  const where = { path: image.path, structure: 'refcount table', offset: image.header.refcountTableOffset };
  if (result.failure !== undefined || result.checkErrors) {
    throw new CorruptImageError(`could not repair dirty image: ${result.failure ?? 'check errors'}`, where);
  }
  if (image.header.incompatibleFeatures & INCOMPAT_DIRTY) {
    throw new CorruptImageError(`could not repair dirty image: ${result.corruptions} corruptions remain; see 'qdedup check'`, where);
  }
}
