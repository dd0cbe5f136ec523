// Inline deduplication of an image open for writing: the per-cluster write path (hash, look
// up, link or write; with -c, compressed copies: ./compressed-copies.ts), the release of
// clusters whose last guest reference goes (hash deleted before the free, I2), the commit
// hooks and the clean close. Design: docs/DESIGN.md "Deduplication"; layouts: docs/FORMAT.md §5–10.
//
// It is the engine's write policy (src/image/write-policy.ts WritePolicy), attached by
// ./open.ts through ./attach.ts, and changes the image only through the ImageWriter it is
// given. The trust protocol at open is attachDedup's (./attach.ts): the store is used only if
// judgeStore() (./judge-store.ts) trusts it (autoclear bit set, dirty flag clear,
// configuration and journals intact, areas its own); otherwise a fresh store is built in new
// clusters and the old one is never written to nor freed. The dirty flag reaches disk before
// the first write and is cleared only after everything else is durable (close()).

import { AUTOCLEAR_DEDUP, EXT_DEDUP, configBytesFor, encodeDedupConfig, encodeDedupExtension, type DedupExtension } from '../format/dedup-ext.ts';
import type { Image } from '../image/image.ts';
import type { ClusterBatch, ImageWriter, WritePolicy } from '../image/write-policy.ts';
import type { L2Entry } from '../format/l1l2.ts';
import { ChunkHasher, type PendingDigest } from './chunk-hasher.ts';
import { ChunkCompressor, type PendingCompression } from '../image/chunk-compressor.ts';
import { CompressedCopies, MIN_LINK_REFCOUNT } from './compressed-copies.ts';
import { HASH_BYTES, isStreamEntry, streamGuestField, streamLengthOf } from '../format/hash-entry.ts';
import { createHasher, type Hasher } from './hasher.ts';
import type { Holder, HolderHost } from './holder.ts';
import type { DedupStore, Allocate } from './store.ts';
import { BatchKeys } from './batch-keys.ts';
import { BatchLookups, ENTRY, NOT_LOOKED } from './batch-lookups.ts';

export {
  DEDUP_CLUSTER_BITS,
  DEFAULT_JOURNAL_BLOCK,
  MIN_DEDUP_REFCOUNT_ORDER,
  defaultDedupSettings,
  defaultStoreOrder,
  maxStoreOrder,
  type DedupSettings,
} from './settings.ts';

/** Counters of the current session (for tests and benchmarks). */
export interface WriteCounters {
  hits: number;
  misses: number;
  zeroClusters: number;
  /** Hits whose cluster was compared byte for byte (verify mode, or an entry from disk not yet confirmed this session). */
  compared: number;
  /** Of those, clusters whose bytes differed: not linked. */
  mismatches: number;
  released: number;
}

/** What Dedup.prepare starts for a chunk: its hashes, and with -c its compressed clusters. */
interface DedupPrepared {
  digest: PendingDigest;
  compressed: PendingCompression | null;
}

/** Inline deduplication: the write policy (src/image/write-policy.ts WritePolicy) of a dedup image open for writing. */
export class Dedup implements WritePolicy {
  readonly hasher: Hasher;
  /** Hashes the chunks of the write pipeline on a worker thread. */
  private readonly chunkHasher: ChunkHasher;
  /** Why the old index was dropped at open, or null when it was trusted. */
  notice: string | null = null;
  readonly counters: WriteCounters = { hits: 0, misses: 0, zeroClusters: 0, compared: 0, mismatches: 0, released: 0 };
  /** Decrements queued this commit, per cluster (refcounts apply them only after the commit). */
  private readonly pending = new Map<number, number>();
  /** Refcount cap: a cluster at it is never linked again (half the width's maximum; tests lower it to reach it at 32 and 64 bits). */
  cap: number;
  /** Allocation and overlap guard for the store and the holder (made once at open: the write path passes it per cluster). */
  private readonly host: HolderHost;
  /** Compressed copies: linked to and released always (an earlier `-c` may have written them); written with compressWrites(). */
  private readonly copies: CompressedCopies;
  /** Compresses the chunks of the write pipeline (compressWrites(): `-c`), or null: unique clusters are written plain. */
  private compressor: ChunkCompressor | null = null;
  /** What writeClusters knows about each cluster of its batch (reused from batch to batch; null while in use). */
  private lookups: BatchLookups | null = new BatchLookups();

  /** Made by attachDedup and initializeDedup (./attach.ts). */
  constructor(
    /** The image, read only: every change goes through `writer`. */
    private readonly image: Image,
    private readonly writer: ImageWriter,
    readonly ext: DedupExtension,
    readonly store: DedupStore,
    readonly holder: Holder,
    host: HolderHost,
    /** Allocates clusters for the store, held by the holder (src/dedup/holder.ts). */
    private readonly allocate: Allocate,
  ) {
    this.hasher = createHasher(ext.hashAlgorithm);
    this.chunkHasher = new ChunkHasher(this.hasher.algorithm, image.clusterSize);
    // A journal that grows moves: the holder lets go of its old area, freed after the commit
    // whose configuration names the new one (beforeRefcounts writes it; the frees are step 6).
    store.releaseArea = async (offset, clusters) => {
      const first = offset / image.clusterSize;
      const area = Array.from({ length: clusters }, (_, i) => first + i);
      await holder.fetch(area);
      for (const c of area) {
        holder.release(c);
        writer.deferFree(c);
      }
    };
    // Refcount cap: past half the maximum the hash is no longer linked to.
    this.cap = Math.floor(writer.refcountMax / 2);
    this.host = host;
    this.copies = new CompressedCopies(writer, holder, () => this.cap);
  }

  /** True once compressWrites() was called. */
  get compressing(): boolean {
    return this.compressor !== null;
  }

  /** Unique clusters are written from now on as compressed copies (`-c`; docs/DESIGN.md "Compressed clusters"). */
  compressWrites(): void {
    this.compressor ??= new ChunkCompressor(this.writer.clusterSize);
  }

  // -------------------------------------------------------------------- write path

  /** Hashes (and with -c compresses) a chunk of whole clusters ahead of its writeClusters, on worker threads (WritePolicy.prepare). */
  prepare(chunk: Buffer, start: number, count: number): Promise<DedupPrepared> {
    return Promise.resolve({ digest: this.chunkHasher.begin(chunk, start, count), compressed: this.compressor?.begin(chunk, start, count) ?? null });
  }

  /**
   * Writes whole guest clusters: zero clusters become zero entries; a cluster whose hash is
   * indexed (and held, and of equal bytes when verifying or when the entry came from disk and
   * is met for the first time this session) is linked; the others are written in one
   * contiguous run and indexed. Every old reference is dropped after its replacement.
   *
   * Four phases, so that each decision exists once and costs no promise: every cluster is
   * looked up (1); everything the batch needs is fetched (2: the guest clusters' L2 tables
   * made writable, the refcount blocks and holder tables of the old host clusters and of the
   * index hits); then every cluster is decided in order by synchronous code (3), and the
   * misses are written in one run and indexed (4). Per-cluster state lives in arrays indexed
   * like `batch`, not in an object per cluster. Only the store's rotation (a full log store) and
   * the rare extra copy (refcount cap, a cluster the holder cannot cover) are awaited, in
   * place, before the next decision; nothing fetched leaves memory before the next fetch.
   * Clusters of a prepared chunk come hashed (and found zero) already: `prepared`.
   */
  async writeClusters(batch: ClusterBatch, prepared?: unknown): Promise<void> {
    // The lookups' arrays are reused from batch to batch; a batch written while another one
    // is (two writes at once) gets arrays of its own.
    const L = this.lookups ?? new BatchLookups();
    this.lookups = null;
    try {
      await this.decideAndWrite(batch, prepared as DedupPrepared | undefined, L);
    } finally {
      this.lookups = L;
    }
  }

  /** writeClusters() with `L` to keep what it knows about each cluster of the batch. */
  private async decideAndWrite(batch: ClusterBatch, ready: DedupPrepared | undefined, L: BatchLookups): Promise<void> {
    const writer = this.writer;
    const cs = writer.clusterSize;
    const n = batch.length;
    const digest = ready?.digest.complete(); // the rest of the chunk hashed here, if the worker is behind

    // Phase 1, look up. Per cluster, in arrays indexed like `batch` (no object per cluster):
    // where its hash is (none: a zero cluster) and what the index holds for it. Each content
    // is looked up once here, at its first occurrence; its later ones are NOT_LOOKED (either
    // repeats of a miss, never looked up, or looked up again in phase 3 when decided).
    // Contents are keyed by their hash's first 48 bits (BatchKeys), confirmed by comparing
    // whole hashes.
    L.reset(n);
    const looked = new BatchKeys(n); // key → the first cluster of that key
    for (let c = 0; c < n; c++) {
      const i = digest ? batch.prepared[c] : -1;
      if (i >= 0 ? digest!.zero[i] : batch.isZero(c)) {
        L.setZero(c);
        continue;
      }
      if (i >= 0) L.setHash(c, digest!.hashes, i * HASH_BYTES);
      else L.setHash(c, this.hasher.hash(batch.data(c)), 0); // (not from the pipeline: a write's edges)
      const first = looked.get(L.hashIn[c]!, L.hashAt[c]);
      if (first < 0) looked.set(L.hashIn[c]!, c, L.hashAt[c]);
      if (first < 0 || !L.sameHash(first, c)) L.setFound(c, this.store.find(L.hashIn[c]!, L.hashAt[c]), this.store.found);
    }

    // Phase 2, fetch. Tables of clusters that will not change are not made writable (zeroing
    // what already reads as zeros allocates nothing); then the holder tables and refcount
    // blocks of the old host clusters and of the index hits.
    const guests: number[] = [];
    const hosts: number[] = [];
    for (let c = 0; c < n; c++) {
      if (L.hashIn[c] || !writer.readsAsZeros(batch.old[c])) guests.push(batch.guest[c]);
    }
    await writer.prepareTables(guests);
    for (let c = 0; c < n; c++) {
      if (L.state[c] === ENTRY) {
        const host = L.hostOffset[c];
        if (isStreamEntry(host, cs)) hosts.push(...this.copies.clusters(host, streamLengthOf(L.firstGuestOffset[c], cs)));
        else if (Number.isSafeInteger(host / cs)) hosts.push(host / cs);
      }
      const old = batch.old[c];
      const released = writer.releasedBy(old);
      if (released !== null) hosts.push(released);
      else if (old.kind === 'compressed') hosts.push(...writer.clustersReleasedBy(old));
    }
    await this.prepareRelease(hosts);

    // Phase 3, decide, in order: zero, link, or a miss (written in phase 4, with the repeats
    // of its content). Misses are batch indexes; a miss's repeats are a chain through
    // `nextDup` (batch index of the next repeat, -1 at the end), `lastDup` its tail.
    const misses: number[] = [];
    const missByKey = new BatchKeys(n); // key → the first miss of that key
    const nextDup = new Int32Array(n).fill(-1);
    const lastDup = new Int32Array(n);
    for (let c = 0; c < n; c++) {
      const old = batch.old[c];
      const hash = L.hashIn[c];
      if (!hash) {
        this.counters.zeroClusters++;
        const releasing = writer.zeroCluster(batch.guest[c], old);
        if (releasing) await releasing;
        continue;
      }
      const at = L.hashAt[c];
      const pendingMiss = missByKey.get(hash, at);
      if (pendingMiss >= 0 && L.sameHash(pendingMiss, c)) {
        nextDup[lastDup[pendingMiss]] = c; // lastDup of a miss starts at itself
        lastDup[pendingMiss] = c;
        continue;
      }
      if (L.state[c] === NOT_LOOKED) L.setFound(c, this.store.find(hash, at), this.store.found); // its cluster fetched with the first occurrence's
      const target = L.state[c] === ENTRY ? this.linkable(c, batch, L) : null;
      if (target !== null) {
        this.counters.hits++;
        if ((old.kind === 'normal' ? old.hostOffset : old.compressedOffset) === target) continue; // same content, same copy
        const releasing = this.link(batch.guest[c], old, target, isStreamEntry(target, cs) ? streamLengthOf(L.firstGuestOffset[c], cs) : 0);
        if (releasing) await releasing;
        continue;
      }
      misses.push(c);
      lastDup[c] = c;
      if (pendingMiss < 0) missByKey.set(hash, c, at);
    }
    if (!misses.length) return;

    // Phase 4, the misses: one run of whole clusters and (with -c) one run of compressed
    // copies, then each miss indexed (refcount 2 on what it touches: the guest and the
    // holder) and mapped, then its repeats linked to it. The indexed copy of a content, which
    // its duplicates link to, is a whole cluster (`copyLength` 0) or a compressed stream of
    // `copyLength` bytes, at host byte `copyOffset`.
    this.counters.misses += misses.length;
    const streams = this.compressor ? this.copies.streamsOf(batch, misses, ready?.compressed?.complete()) : null;
    const whole = streams ? misses.filter((_, k) => !streams[k]) : misses;
    const start = whole.length ? await writer.writeRun(batch.views(whole)) : 0;
    const packed = streams?.filter((x: Buffer | null): x is Buffer => x !== null) ?? [];
    const run = packed.length ? await this.copies.writeRun(packed) : null;
    for (let i = 0, p = 0, q = 0; i < misses.length; i++) {
      const m = misses[i];
      const hash = L.hashIn[m]!;
      const at = L.hashAt[m];
      const stream = streams?.[i] ?? null;
      let copyOffset = stream ? run!.offsets[q++] : start + p++ * cs;
      const copyLength = stream ? stream.length : 0;
      let held = stream ? run!.held : this.holder.canHold(copyOffset / cs);
      let indexed = this.index(batch.guest[m], hash, at, copyOffset, copyLength, held);
      if (indexed) await indexed;
      const releasing = writer.dropReference(batch.old[m]);
      if (releasing) await releasing;
      for (let d = nextDup[m]; d >= 0; d = nextDup[d]) {
        if (!held) {
          this.counters.hits++;
          // Not held: sharing it could not keep COPIED truthful. Give the copy its own cluster.
          const own = await writer.writeRun([batch.data(d)]);
          writer.mapCluster(batch.guest[d], own, true);
          const dropping = writer.dropReference(batch.old[d]);
          if (dropping) await dropping;
          continue;
        }
        // The cap counts every reference this batch already added (increments apply at
        // once; the holder's is one of them): at the cap the duplicate gets its own copy,
        // which becomes the indexed one, so later copies link to it (docs/DESIGN.md, refcount cap).
        if (copyLength ? this.copies.underCap(copyOffset, copyLength) : writer.refcount(copyOffset / cs) < this.cap) {
          this.counters.hits++;
          const dropping = this.link(batch.guest[d], batch.old[d], copyOffset, copyLength);
          if (dropping) await dropping;
          continue;
        }
        this.counters.misses++;
        if (stream) {
          const again = await this.copies.writeRun([stream]);
          copyOffset = again.offsets[0]; // (copyLength: the same stream's)
          held = again.held;
        } else {
          copyOffset = await writer.writeRun([batch.data(d)]);
          held = this.holder.canHold(copyOffset / cs);
        }
        indexed = this.index(batch.guest[d], hash, at, copyOffset, copyLength, held);
        if (indexed) await indexed;
        const dropping = writer.dropReference(batch.old[d]);
        if (dropping) await dropping;
      }
    }
  }

  /**
   * Maps guest cluster `guestCluster` to the copy just written (a whole cluster at
   * `copyOffset` when `copyLength` is 0, else a compressed stream of `copyLength` bytes)
   * and, when `held`, indexes it under the hash at byte `at` of `hash`. A whole cluster is then held here (its table
   * read or made first: rare, once per table, in this order so that the file's layout does
   * not depend on batching) and its refcount becomes 2 before the L2 entry names it (I3),
   * COPIED clear; not held, it is mapped alone, COPIED set. A compressed copy's run is held
   * by writeRun already; the guest's reference goes on every cluster it touches. A promise
   * only when the holder's table is read or the store must rotate.
   */
  private index(guestCluster: number, hash: Uint8Array, at: number, copyOffset: number, copyLength: number, held: boolean): Promise<void> | undefined {
    const cs = this.writer.clusterSize;
    if (copyLength) {
      if (!held) {
        this.copies.mapUnheld(guestCluster, copyOffset, copyLength);
        return undefined;
      }
      this.copies.link(guestCluster, copyOffset, copyLength);
      return this.store.insert(hash, copyOffset, streamGuestField(guestCluster * cs, copyLength), this.allocate, at);
    }
    const cluster = copyOffset / cs;
    let inserting: Promise<void> | undefined;
    if (held) {
      if (!this.holder.ready(cluster)) return this.indexOnceHoldable(guestCluster, hash, at, copyOffset, held);
      this.writer.increment(cluster);
      this.holder.hold(cluster);
      inserting = this.store.insert(hash, copyOffset, guestCluster * cs, this.allocate, at);
    }
    this.writer.mapCluster(guestCluster, copyOffset, !held);
    return inserting;
  }

  /**
   * index() of a whole cluster whose holder table is not in memory: read or made first. Apart
   * from index(), whose every call would otherwise make a context for this continuation's closure.
   */
  private async indexOnceHoldable(guestCluster: number, hash: Uint8Array, at: number, copyOffset: number, held: boolean): Promise<void> {
    await this.holder.prepareHold([copyOffset / this.writer.clusterSize]);
    await this.index(guestCluster, hash, at, copyOffset, 0, held);
  }

  /**
   * Points guest cluster `guestCluster`, whose entry was `old`, at the indexed copy (as for
   * index()): a reference on each cluster it touches, the L2 entry, then the old reference
   * dropped. A promise only when the release returned one.
   */
  private link(guestCluster: number, old: L2Entry, copyOffset: number, copyLength: number): Promise<void> | undefined {
    if (copyLength) this.copies.link(guestCluster, copyOffset, copyLength);
    else {
      this.writer.increment(copyOffset / this.writer.clusterSize);
      this.writer.mapCluster(guestCluster, copyOffset, false);
    }
    return this.writer.dropReference(old);
  }

  /**
   * The host offset of the indexed cluster of the entry found for cluster `c` of `batch`
   * (`L`) when it may be linked to (held, under the cap, and equal to the cluster's
   * bytes when verifying or when the entry is not confirmed this session), or null. Without
   * I/O but a compare: the holder table and refcount block of its cluster fetched.
   */
  private linkable(c: number, batch: ClusterBatch, L: BatchLookups): number | null {
    const host = L.hostOffset[c];
    const check = this.ext.verify || !L.confirmed[c];
    if (isStreamEntry(host, this.writer.clusterSize)) {
      const length = streamLengthOf(L.firstGuestOffset[c], this.writer.clusterSize);
      if (!this.copies.linkable(host, length)) return null;
      return !check || this.sameBytes(c, batch, L, length) ? host : null;
    }
    const cluster = host / this.writer.clusterSize;
    // An index entry is only good for a cluster the holder still holds (belt and braces for I1).
    if (!Number.isSafeInteger(cluster) || !this.holder.holds(cluster)) return null;
    const refcount = this.writer.refcount(cluster);
    if (refcount < MIN_LINK_REFCOUNT || refcount >= this.cap) return null;
    if (check && !this.sameBytes(c, batch, L)) return null;
    return host;
  }

  /**
   * Compares the indexed cluster found for cluster `c` with its bytes (verify mode, or an
   * entry from disk that may lie: damage, a crafted image, a stale entry;
   * src/dedup/slot-bits.ts). Equal bytes confirm the entry for the session: a held cluster is
   * never rewritten in place (I2). A synchronous read, as for incarnation slots: the thread
   * pool's round trip cost twice the import's time when every cluster hit an entry from an
   * earlier session.
   */
  private sameBytes(c: number, batch: ClusterBatch, L: BatchLookups, streamLength = 0): boolean {
    const host = L.hostOffset[c];
    this.counters.compared++;
    const same = streamLength
      ? this.copies.sameBytes(host, streamLength, batch.data(c))
      : batch.equals(c, this.writer.file.readSync(host, this.writer.clusterSize));
    if (!same) {
      this.counters.mismatches++;
      return false;
    }
    this.store.confirm(L.bits[c], L.slot[c]);
    return true;
  }

  /** Reads the holder tables and refcount blocks release() and linkable() of these clusters need. */
  async prepareRelease(clusters: number[]): Promise<void> {
    await this.holder.fetch(clusters);
    await this.writer.fetchRefcounts(clusters);
  }

  /**
   * A guest reference to host cluster `cluster` goes away. When only the holder would be
   * left, the hash is deleted (I2: the journal is durable before the commit frees) and the
   * holder lets go too, so the cluster becomes free at this commit. Without I/O but a read
   * of the cluster (prepareRelease first); a promise only when the deletion rotates the store.
   */
  release(cluster: number): Promise<void> | undefined {
    let drops = 1;
    let removing: Promise<void> | undefined;
    if (this.holder.holds(cluster)) {
      const left = this.writer.refcount(cluster) - (this.pending.get(cluster) ?? 0);
      if (left <= 2) {
        const cs = this.writer.clusterSize;
        const offset = cluster * cs;
        // The entry naming the cluster whole, or else those of the streams touching it (I2).
        const hash = this.hasher.hash(this.writer.file.readSync(offset, cs));
        const e = this.store.lookup(hash);
        const named = e && e.hostOffset === offset ? [hash] : [];
        if (!named.length) {
          for (const s of this.copies.streamsTouching(cluster)) {
            const h = this.hasher.hash(s.data);
            if (this.store.lookup(h)?.hostOffset === s.offset) named.push(h);
          }
        }
        for (const h of named) removing = removing ? removing.then(() => this.store.remove(h, this.allocate)) : this.store.remove(h, this.allocate);
        this.holder.release(cluster);
        this.counters.released++;
        drops = 2;
      }
    }
    for (let i = 0; i < drops; i++) this.writer.deferFree(cluster);
    this.pending.set(cluster, (this.pending.get(cluster) ?? 0) + drops);
    return removing;
  }

  // -------------------------------------------------------------------- commit hooks

  /** Commit step 2, before the refcount increments are written: the store's journal and incarnations, the configuration area. */
  async beforeRefcounts(): Promise<void> {
    const host = this.host;
    await this.store.flush(this.allocate);
    const config = this.store.config();
    const need = configBytesFor(config);
    if (need > this.ext.configBytes) {
      const clusters = Math.ceil((need * 2) / this.writer.clusterSize);
      const old = this.ext.configOffset / this.writer.clusterSize;
      // The old area is let go by the holder and freed after this commit's tables are durable.
      const area = Array.from({ length: this.ext.configBytes / this.writer.clusterSize }, (_, c) => old + c);
      await this.holder.fetch(area);
      for (const c of area) {
        this.holder.release(c);
        this.writer.deferFree(c);
      }
      this.ext.configOffset = await this.allocate(clusters);
      this.ext.configBytes = clusters * this.writer.clusterSize;
    }
    host.markMetadata(this.ext.configOffset, this.ext.configBytes, 'dedup configuration area');
    await this.writer.file.write(this.ext.configOffset, encodeDedupConfig(config, this.ext.configBytes));
  }

  /** Commit step 4: the holder's L2 tables, with the active L2 tables (the engine syncs). */
  writeL2Tables(): Promise<boolean> {
    return this.holder.writeTables();
  }

  /** Commit step 5: the holder's L1 (and, when it grew, the snapshot table naming it), with the active L1. */
  writeL1(): Promise<boolean> {
    return this.holder.writeL1();
  }

  /** Commit step 6 done: the queued decrements are applied. */
  afterFrees(): void {
    this.pending.clear();
  }

  /** Clean close, after the last commit: clears the dirty flag, then syncs (I3). */
  async close(): Promise<void> {
    await this.chunkHasher.close();
    await this.compressor?.close();
    this.ext.dirty = false;
    await writeDedupExtension(this.writer, this.ext);
  }
}

/** Rewrites the header with `ext` and autoclear bit 60 set, then syncs. */
export async function writeDedupExtension(writer: ImageWriter, ext: DedupExtension): Promise<void> {
  await writer.writeExtension(EXT_DEDUP, encodeDedupExtension(ext), AUTOCLEAR_DEDUP);
}
