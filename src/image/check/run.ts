// The state of one check of one image, shared by its passes (the repair pass and the
// double check that follows it), and the primitives every pass uses: reporting a problem
// (bounded, I4), reading clipped to the file, writing only under a repair mode (autoclear
// bits cleared first), and counting references in the in-memory refcount table.

import { InternalError } from '../../errors.ts';
import { AUTOCLEAR_BITMAPS, clusterSizeOf, l2EntriesOf, type Header } from '../../format/header.ts';
import { maxRefcount, refblockEntries } from '../../format/refcount.ts';
import type { SnapshotEntry } from '../../format/snapshot.ts';
import type { RefcountArray } from './refcount-array.ts';
import { StoredRefcounts } from './stored-refcounts.ts';
import {
  MAX_EMITTED_MESSAGES,
  MAX_STORED_MESSAGES,
  zeroCounts,
  type CheckCounts,
  type CheckExtension,
  type CheckTarget,
  type ExtensionReport,
} from './types.ts';

/** Byte offset of the header's autoclear_features field. */
const AUTOCLEAR_FIELD_OFFSET = 88;

export class CheckRun {
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly l2Entries: number;
  readonly blockEntries: number;
  readonly maxRefcount: number;
  readonly messages: string[] = [];
  private emitted = 0;
  private signaled = false;
  private autoclearDone = false;
  /** What the current pass may repair (FIX_LEAKS | FIX_ERRORS); 0 outside a repairing pass. */
  fix = 0;

  // Per pass:
  res: CheckCounts = zeroCounts();
  fileSize = 0;
  imrt!: RefcountArray;
  stored!: StoredRefcounts;
  snapshots: SnapshotEntry[] = [];
  snapshotsSize = 0;
  /** ./overlap.ts's index; null when the structures it reflects were loaded or moved since. */
  overlapIndex: { l2Tables: Float64Array; refcountBlocks: Float64Array } | null = null;
  rebuild = false;
  highestCluster = 0;
  /** Clusters of the refcount structure in use on disk: a rebuild must not write there before the switch. */
  oldStructure = new Set<number>();
  /** The extension's report for this pass, and its problems found while counting (overlaps). */
  extReport: ExtensionReport | null = null;
  extOverlaps = 0;
  extCounted = false;
  /** Bitmap of the clusters the extension's areas own, counted as referenced. */
  extOwned: Uint8Array | null = null;
  /** Set once a repair has dropped the extension's structures (kept across passes). */
  extDropped = false;
  /** Autoclear bits a repair keeps besides the bitmaps bit (those of trusted, sound structures). */
  keepAutoclear = 0n;

  constructor(
    readonly target: CheckTarget,
    private readonly onMessage?: (line: string) => void,
    readonly extension: CheckExtension | null = null,
  ) {
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

  /** A reader of the stored refcount structure at `tableOffset` whose table is `table`. */
  storedRefcounts(tableOffset: number, table: Buffer): StoredRefcounts {
    return new StoredRefcounts(
      {
        clusterSize: this.clusterSize,
        blockEntries: this.blockEntries,
        refcountOrder: this.header.refcountOrder,
        read: (offset, length) => this.readClipped(offset, length),
        write: (offset, data) => this.write(offset, data),
        signalCorruption: (what) => this.signalCorruption(what),
      },
      tableOffset,
      table,
    );
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

  /** Throws unless a repair mode is given and the file is open for writing. */
  requireRepair(): void {
    if (!this.fix || !this.target.writable) throw new InternalError('check tried to write without a repair mode');
  }

  /** Every write of a repair goes through here: never without a repair mode, autoclear bits cleared first. */
  async write(hostOffset: number, data: Buffer): Promise<void> {
    this.requireRepair();
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
  async clearAutoclearBits(): Promise<void> {
    if (this.autoclearDone) return;
    this.autoclearDone = true;
    const keep = AUTOCLEAR_BITMAPS | this.keepAutoclear;
    if (this.header.version !== 3 || (this.header.autoclearFeatures & ~keep) === 0n) return;
    await this.writeAutoclear(this.header.autoclearFeatures & keep);
  }

  /** Sets the header's autoclear bits to `bits`, in memory and on disk, synced (before anything they vouch for changes). */
  async writeAutoclear(bits: bigint): Promise<void> {
    this.header.autoclearFeatures = bits;
    const field = Buffer.alloc(8);
    field.writeBigUInt64BE(bits);
    await this.target.file.write(AUTOCLEAR_FIELD_OFFSET, field);
    await this.target.file.sync();
  }

  // ------------------------------------------------------------ counting references

  /**
   * Adds `times` references to every cluster of [hostOffset, +byteLength) in the IMRT
   * (qcow2_inc_refcounts_imrt). A range ending a cluster or more past the end of the file
   * is a corruption; a counter at the width's maximum overflows (a corruption per reference).
   */
  addReferences(hostOffset: number, byteLength: number, times = 1, offsetHex?: string): void {
    if (byteLength <= 0 || times <= 0) return;
    if (hostOffset + byteLength - this.fileSize >= this.clusterSize) {
      const region = `offset 0x${offsetHex ?? hostOffset.toString(16)} size 0x${byteLength.toString(16)}`;
      this.emit(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: ${region}`, times);
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
          this.emit(
            'Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy' + ' if the image cannot be opened for writing',
          );
        }
        if (overflow > 2) this.emit(`ERROR: overflow cluster offset=0x${(k * this.clusterSize).toString(16)} (${overflow - 2} more times)`);
        this.res.corruptions += overflow;
      }
    }
  }
}
