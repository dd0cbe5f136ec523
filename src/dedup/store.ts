// The dedup store: the key-value index from cluster hash to host cluster (SILT/BufferHash
// after the seed). Lookups go current log store → frozen log store → incarnations youngest
// first; inserts and deletions go to the current log store and its journal. A full log
// store is frozen (the journals swap roles) and written as an incarnation at the next
// flush; a journal full of replacements and deletions is packed.
// Layouts: docs/FORMAT.md §6–9. Trust rules (dirty flag, autoclear bit): src/dedup/dedup.ts.

import { InternalError } from '../errors.ts';
import { SLOT_EMPTY, SLOT_TOMBSTONE, SLOT_USED } from '../format/incarnation.ts';
import { entriesPerBlock, type JournalEntry } from '../format/journal-block.ts';
import { nextGeneration, type DedupConfig, type DedupExtension, type JournalDescriptor } from '../format/dedup-ext.ts';
import type { BlockFile } from '../image/block-file.ts';
import { FOUND_ENTRY, HashStore } from './hash-store.ts';
import { Journal, replayJournal, type ReplayResult, type ReplayStop } from './journal.ts';
import { LogStore } from './log-store.ts';
import { emptyFoundSlot, type FoundSlot, type IndexEntry, type SlotBits } from './slot-bits.ts';

export interface StoreGeometry {
  order: number;
  clusterSize: number;
  journalBlockSize: number;
  maxIncarnations: number;
}

/** The store's geometry as a dedup extension and the image's cluster size give it. */
export function geometryOf(ext: DedupExtension, clusterSize: number): StoreGeometry {
  return { order: ext.order, clusterSize, journalBlockSize: ext.journalBlockSize, maxIncarnations: ext.maxIncarnations };
}

/** Allocates `clusters` contiguous clusters for store metadata and returns the host offset. */
export type Allocate = (clusters: number) => Promise<number>;

/** Journal blocks per log store: room for every slot twice (the seed's journal ratio) plus partial blocks. */
export function journalBlocksFor(g: StoreGeometry): number {
  return Math.ceil((2 ** g.order * 4 * 2) / entriesPerBlock(g.journalBlockSize)) + 16;
}

/**
 * Blocks a new journal starts with (at most journalBlocksFor): 128 blocks hold every slot of
 * a log store up to order 10 at 4 KiB blocks. A larger journal is allocated as it fills: when
 * it is full and the log store is not, its live entries move to an area twice as large
 * (DedupStore.pack), so an empty order-20 store takes 1 MiB of journals, not 800 MiB.
 */
export const INITIAL_JOURNAL_BLOCKS = 128;

/** Blocks of a new journal for geometry `g`. */
export function initialJournalBlocks(g: StoreGeometry): number {
  return Math.min(journalBlocksFor(g), INITIAL_JOURNAL_BLOCKS);
}

/** Gives back an area the store no longer uses (a journal that moved): freed after the commit that records the move. */
export type Release = (offset: number, clusters: number) => Promise<void>;

/**
 * Why the replay of a trusted store's journals cannot be trusted, or null: a block with a
 * bad checksum or entry, or replay stopping anywhere but at the blocks the configuration
 * says were written (a zeroed or stale block there would look like a clean end and hide
 * later entries, deletions included: I1, I2). Shared by the open, check and journal-dump.
 */
export function replayDamage(stops: (ReplayStop | null)[], journals: JournalDescriptor[]): string | null {
  for (const [i, stop] of stops.entries()) {
    if (!stop) continue;
    const written = journals[i].written;
    if (stop.verdict === 'bad-checksum' || stop.verdict === 'bad-entry' || stop.block !== written) {
      return `journal ${i} block ${stop.block} is damaged (${stop.reason}${stop.block !== written ? `; ${written} blocks were written` : ''})`;
    }
  }
  return null;
}

/** Writes the entry in slot `slot` of a log store into `out`; false for a tombstone (a deleted hash). */
function slotFound(store: LogStore, slot: number, out: FoundSlot): boolean {
  if (store.states[slot] === SLOT_TOMBSTONE) return false;
  out.hostOffset = store.hostOffsets[slot];
  out.firstGuestOffset = store.guestOffsets[slot];
  out.confirmed = store.confirmed.get(slot);
  out.bits = store.confirmed;
  out.slot = slot;
  return true;
}

interface Side {
  store: LogStore;
  journal: Journal;
  desc: JournalDescriptor;
}

export class DedupStore {
  readonly geometry: StoreGeometry;
  readonly hashStore: HashStore;
  private current: Side;
  /** The previous log store, full, searchable, waiting to become an incarnation at flush(). */
  private frozen: Side | null = null;
  /** Descriptor of the journal that is not the current one. */
  private other: JournalDescriptor;
  private currentIndex: number;
  /** Where replay stopped at open, per journal (for journal-dump and dedup-stats). */
  readonly replays: [ReplayResult | null, ReplayResult | null] = [null, null];
  /** What the last find() that returned true found (overwritten by the next find). */
  readonly found: FoundSlot = emptyFoundSlot();
  freezes = 0;
  packs = 0;
  /** The journal descriptors the configuration held at open (replay is judged against them). */
  private openedJournals: JournalDescriptor[];

  private constructor(
    private readonly file: BlockFile,
    geometry: StoreGeometry,
    config: DedupConfig,
  ) {
    this.geometry = geometry;
    this.hashStore = new HashStore(file, geometry.order, geometry.clusterSize, geometry.maxIncarnations);
    this.currentIndex = config.currentJournal;
    const desc = config.journals[config.currentJournal];
    this.current = { store: new LogStore(geometry.order), journal: new Journal(file, desc, geometry.journalBlockSize), desc };
    this.other = config.journals[1 - config.currentJournal];
    this.openedJournals = config.journals;
  }

  /** Why replay at open cannot be trusted, or null (see replayDamage). */
  replayDamage(): string | null {
    return replayDamage(
      this.replays.map((r) => r?.stop ?? null),
      this.openedJournals,
    );
  }

  /** Allocates two empty journals: a new store with nothing indexed. */
  static async create(file: BlockFile, g: StoreGeometry, allocate: Allocate): Promise<DedupStore> {
    const blocks = initialJournalBlocks(g);
    const journals: [JournalDescriptor, JournalDescriptor] = [
      { offset: await DedupStore.newJournalArea(file, g, blocks, allocate), blocks, startSequence: 0, written: 0 },
      { offset: await DedupStore.newJournalArea(file, g, blocks, allocate), blocks, startSequence: 0, written: 0 },
    ];
    return new DedupStore(file, g, { currentJournal: 0, journals, incarnations: [], limbo: [] });
  }

  /**
   * Allocates a journal area of `blocks` blocks. Reused clusters may hold old bytes: block 0
   * is zeroed so replay ends there. The last block is written too, so the file covers the
   * whole area: the holder holds every journal cluster, and QEMU counts a reference past the
   * end of the file as a corruption (the file is sparse there until the journal fills).
   */
  private static async newJournalArea(file: BlockFile, g: StoreGeometry, blocks: number, allocate: Allocate): Promise<number> {
    const offset = await allocate(Math.ceil((blocks * g.journalBlockSize) / g.clusterSize));
    await file.write(offset, Buffer.alloc(g.journalBlockSize));
    await file.write(offset + (blocks - 1) * g.journalBlockSize, Buffer.alloc(g.journalBlockSize));
    return offset;
  }

  /** Where moved journals' areas go (Dedup sets it: the holder lets go, the frees follow the commit). */
  releaseArea: Release | null = null;

  /** Opens a trusted store: replays both journals and loads the incarnations' filters. */
  static async open(file: BlockFile, g: StoreGeometry, config: DedupConfig): Promise<DedupStore> {
    const s = new DedupStore(file, g, config);
    await s.hashStore.load(config.incarnations, config.limbo);
    const cur = await replayJournal(file, s.current.desc, g.journalBlockSize);
    s.replays[s.currentIndex] = cur;
    s.current.journal = new Journal(file, s.current.desc, g.journalBlockSize, cur.stop.block);
    for (const e of cur.entries) s.apply(s.current.store, e);
    const other = await replayJournal(file, s.other, g.journalBlockSize);
    s.replays[1 - s.currentIndex] = other;
    if (other.entries.length) {
      // A frozen log store that was not yet an incarnation at close.
      const store = new LogStore(g.order);
      for (const e of other.entries) s.apply(store, e);
      s.frozen = { store, journal: new Journal(file, s.other, g.journalBlockSize, other.stop.block), desc: s.other };
    }
    return s;
  }

  private apply(store: LogStore, e: JournalEntry): void {
    // A deletion becomes a tombstone: it must keep shadowing the hash in older stores.
    // A replayed entry is not confirmed: this session has not seen its cluster.
    store.put(e.hash, e.deleted ? 0 : e.hostOffset, e.firstGuestOffset, e.deleted ? SLOT_TOMBSTONE : SLOT_USED);
  }

  /**
   * The entry for `hash`, or null (never indexed, deleted, or forgotten). Synchronous: see
   * HashStore.lookup. Unless `confirmed`, its cluster must be compared before a link.
   */
  lookup(hash: Buffer): IndexEntry | null {
    return this.find(hash) ? { hash, ...this.found } : null;
  }

  /**
   * lookup() of the hash at byte `at` of `hash`, without an object: true when there is an
   * entry, its fields then in `found` until the next find.
   */
  find(hash: Uint8Array, at = 0): boolean {
    const inCurrent = this.current.store.find(hash, at);
    if (inCurrent >= 0) return slotFound(this.current.store, inCurrent, this.found);
    const inFrozen = this.frozen ? this.frozen.store.find(hash, at) : -1;
    if (inFrozen >= 0) return slotFound(this.frozen!.store, inFrozen, this.found);
    return this.hashStore.find(hash, at, this.found) === FOUND_ENTRY;
  }

  /**
   * Records that the hash at byte `at` of `hash` is the content of the cluster at
   * `hostOffset` (first written at guestOffset). Returns a promise only when the log store
   * must be frozen or the journal packed (I/O); the common case completes synchronously and
   * returns undefined, so the write path awaits only when there is something to wait for.
   * `hash` must not change until then.
   */
  insert(hash: Uint8Array, hostOffset: number, guestOffset: number, allocate: Allocate, at = 0): Promise<void> | undefined {
    return this.record(hash, at, hostOffset, guestOffset, false, allocate);
  }

  /**
   * Deletes `hash` (I2: the caller flushes before the cluster can be reused). As insert():
   * a promise only when the log store must be frozen or the journal packed.
   */
  remove(hash: Buffer, allocate: Allocate): Promise<void> | undefined {
    return this.record(hash, 0, 0, 0, true, allocate);
  }

  /** Marks a found entry confirmed: its cluster's bytes were compared with data of its hash. */
  confirm(bits: SlotBits, slot: number): void {
    bits.set(slot, true);
  }

  /** Puts the entry in the current log store and appends it to the journal; a promise only when it must rotate or pack. */
  private record(hash: Uint8Array, at: number, hostOffset: number, guestOffset: number, deleted: boolean, allocate: Allocate): Promise<void> | undefined {
    const state = deleted ? SLOT_TOMBSTONE : SLOT_USED;
    // One put() only: a refused put advances the log store's kick walk, so it must not be retried before rotating.
    // An entry this session records names a cluster it has just written: confirmed.
    if (!this.current.store.put(hash, hostOffset, guestOffset, state, !deleted, at))
      return this.rotateAndRecord(hash, at, hostOffset, guestOffset, deleted, allocate);
    if (this.current.journal.wouldOverflow(1)) return this.packAndAppend(hash, at, hostOffset, guestOffset, deleted, allocate);
    this.current.journal.append(hash, at, hostOffset, guestOffset, deleted);
    return undefined;
  }

  private async rotateAndRecord(hash: Uint8Array, at: number, hostOffset: number, guestOffset: number, deleted: boolean, allocate: Allocate): Promise<void> {
    await this.rotate(allocate);
    if (!this.current.store.put(hash, hostOffset, guestOffset, deleted ? SLOT_TOMBSTONE : SLOT_USED, !deleted, at))
      throw new InternalError('an empty log store refused an entry');
    if (this.current.journal.wouldOverflow(1)) await this.pack(allocate);
    this.current.journal.append(hash, at, hostOffset, guestOffset, deleted);
  }

  private async packAndAppend(hash: Uint8Array, at: number, hostOffset: number, guestOffset: number, deleted: boolean, allocate: Allocate): Promise<void> {
    await this.pack(allocate);
    this.current.journal.append(hash, at, hostOffset, guestOffset, deleted);
  }

  /** The current log store is full: it becomes the frozen one and the journals swap. */
  private async rotate(allocate: Allocate): Promise<void> {
    if (this.frozen) await this.incarnateFrozen(allocate);
    this.frozen = this.current;
    this.currentIndex = 1 - this.currentIndex;
    const desc = this.resetDescriptor(this.other);
    this.other = this.frozen.desc;
    this.current = { store: new LogStore(this.geometry.order), journal: new Journal(this.file, desc, this.geometry.journalBlockSize), desc };
    this.freezes++;
  }

  /** A journal is reused from block 0 under sequence numbers past any it carried before. */
  private resetDescriptor(d: JournalDescriptor): JournalDescriptor {
    return { offset: d.offset, blocks: d.blocks, startSequence: d.startSequence + d.blocks + 1, written: 0 };
  }

  /**
   * Rewrites the current journal with only the live slots of the current log store: in a
   * journal twice as large when this one is smaller than a full journal and the live slots
   * fill more than half of it (a journal allocated as it fills), else in place.
   */
  private async pack(allocate: Allocate): Promise<void> {
    const store = this.current.store;
    const old = this.current.desc;
    const perBlock = this.current.journal.perBlock;
    const full = journalBlocksFor(this.geometry);
    if (old.blocks < full && this.releaseArea && 2 * (Math.ceil(store.count / perBlock) + 2) > old.blocks) {
      // Grow: the live slots go to a new area under later sequence numbers; the old area is
      // given back (the holder lets go now, the refcounts drop after the commit that records
      // the new area in the configuration, I3; its bytes are never read again).
      const blocks = Math.min(full, Math.max(2 * old.blocks, 2 * (Math.ceil(store.count / perBlock) + 2)));
      const offset = await DedupStore.newJournalArea(this.file, this.geometry, blocks, allocate);
      const desc = { offset, blocks, startSequence: old.startSequence + old.blocks + 1, written: 0 };
      await this.releaseArea(old.offset, Math.ceil((old.blocks * this.geometry.journalBlockSize) / this.geometry.clusterSize));
      this.rewriteLive(desc);
      return;
    }
    if (store.count >= perBlock * (old.blocks - 1)) {
      await this.rotate(allocate); // nearly full anyway: freeze instead
      return;
    }
    // The old journal is abandoned whole: the new one, under later sequence numbers, holds every live slot.
    this.rewriteLive(this.resetDescriptor(old));
  }

  /** Makes `desc` the current journal, holding every live slot of the current log store. */
  private rewriteLive(desc: JournalDescriptor): void {
    const store = this.current.store;
    const journal = new Journal(this.file, desc, this.geometry.journalBlockSize);
    for (let s = 0; s < store.slots; s++) {
      if (store.states[s] === SLOT_EMPTY) continue;
      journal.append(store.hashes, s * 32, store.hostOffsets[s], store.guestOffsets[s], store.states[s] === SLOT_TOMBSTONE);
    }
    this.current = { store, journal, desc };
    this.packs++;
  }

  private async incarnateFrozen(allocate: Allocate): Promise<void> {
    const frozen = this.frozen!;
    await this.hashStore.freeze(frozen.store, frozen.store.count, nextGeneration(this.config()), allocate, frozen.store.confirmed);
    this.other = this.resetDescriptor(frozen.desc);
    this.frozen = null;
  }

  /**
   * Writes what is pending: the frozen log store as an incarnation, the journal blocks.
   * The caller syncs (I2: deletions are durable once that sync returns).
   */
  async flush(allocate: Allocate): Promise<void> {
    if (this.frozen) await this.incarnateFrozen(allocate);
    await this.current.journal.flush();
  }

  /** What the configuration area records now. */
  config(): DedupConfig {
    const journals = [
      { ...this.current.desc, written: this.current.journal.blocksWritten },
      this.frozen ? { ...this.frozen.desc, written: this.frozen.journal.blocksWritten } : this.other,
    ];
    if (this.currentIndex === 1) journals.reverse();
    return {
      currentJournal: this.currentIndex,
      journals: journals as [JournalDescriptor, JournalDescriptor],
      incarnations: this.hashStore.incarnations.map((i) => i.record),
      limbo: this.hashStore.limbo,
    };
  }

  /** Every area the store owns on disk: both journals, the incarnations and limbo. */
  areas(): { offset: number; bytes: number }[] {
    const journals = [this.current.desc, this.other].map((d) => ({ offset: d.offset, bytes: d.blocks * this.geometry.journalBlockSize }));
    return [...journals, ...this.hashStore.areas().map((a) => ({ offset: a.offset, bytes: a.clusters * this.geometry.clusterSize }))];
  }

  /** The log stores in lookup order: the current one, then the frozen one if any (read-only use: check, src/dedup/inspect.ts). */
  logStores(): readonly LogStore[] {
    return this.frozen ? [this.current.store, this.frozen.store] : [this.current.store];
  }

  /** Figures for dedup-stats. */
  stats() {
    const logEntries = this.current.store.count + (this.frozen?.store.count ?? 0);
    return {
      indexEntries: logEntries + this.hashStore.entries,
      logStore: { entries: this.current.store.count, capacity: this.current.store.slots },
      frozenEntries: this.frozen?.store.count ?? 0,
      incarnations: { count: this.hashStore.incarnations.length, max: this.geometry.maxIncarnations },
      limbo: this.hashStore.limbo.length,
      journal: { blocksUsed: this.current.journal.blocksUsed, blocksTotal: this.current.desc.blocks },
      ramBytes: this.current.store.ramBytes + (this.frozen?.store.ramBytes ?? 0) + this.hashStore.ramBytes,
      filterRamBytes: this.hashStore.filterRamBytes,
      incarnationLookups: this.hashStore.lookups,
      incarnationReads: this.hashStore.slotReads,
      incarnationHits: this.hashStore.hits,
      freezes: this.freezes,
      packs: this.packs,
    };
  }
}
