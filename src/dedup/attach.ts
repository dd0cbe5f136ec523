// Attaching inline dedup (./dedup.ts) to an image open for writing: attachDedup (the trust
// protocol at open) and initializeDedup (a new dedup image), and around the store: the holder snapshot found, or added (a new snapshot table made
// durable before the header names it); after a foreign writer or an untrusted store, the
// clusters only the holder still references released through its references (I3); and the
// allocation, overlap-guard and L1-move functions the store and the holder use.
// Design: docs/DESIGN.md "The holder also holds the store".

import { CorruptImageError, hex } from '../errors.ts';
import { DEDUP_EXT_VERSION, type DedupExtension } from '../format/dedup-ext.ts';
import { SNAPSHOT_FIXED_BYTES, encodeSnapshotEntry } from '../format/snapshot.ts';
import { writeU64 } from '../format/bytes.ts';
import type { Image } from '../image/image.ts';
import type { ImageWriter } from '../image/write-policy.ts';
import { HOLDER_NAME, Holder, holderL1Size, type HolderHost } from './holder.ts';
import { DedupStore, geometryOf, initialJournalBlocks, type Allocate } from './store.ts';
import { Dedup, writeDedupExtension } from './dedup.ts';
import { hashAlgorithmId } from './hasher.ts';
import { judgeStore } from './judge-store.ts';
import { MIN_DEDUP_REFCOUNT_ORDER, defaultDedupSettings, type DedupSettings } from './settings.ts';
import { heldClusters } from './clusters.ts';

/**
 * Read-write open of a dedup image: sets the dirty flag (synced), then opens the store
 * or, if judgeStore() does not trust it, starts a fresh one. Returns null for a plain image.
 */
export async function attachDedup(image: Image, writer: ImageWriter): Promise<Dedup | null> {
  // The trust verdict (reads only), and the store when trusted.
  const seen = await judgeStore(image, { tolerant: true });
  let ext = seen.ext;
  if (seen.distrust === 'extension') {
    // The extension itself does not decode: nothing of the old store can be found, let
    // alone trusted. It is replaced by one with the default settings and a fresh store, as
    // an untrusted store is (an algorithm or version qdedup does not know is refused instead).
    if (image.header.refcountOrder < MIN_DEDUP_REFCOUNT_ORDER) throw seen.error!;
    ext = newExtension(defaultDedupSettings(image.size, image.clusterSize), 0, 0);
  }
  if (!ext) return null;
  if (seen.distrust === 'algorithm') throw seen.error!; // skein and unknown numbers, before any write
  await writeDedupExtension(writer, { ...ext, dirty: true }); // I3: dirty durable before any other write
  const host = hostOf(image, writer);
  let holder = await findHolder(image, host);
  // Untrusted: clusters only the holder references (the old store's, data a foreign writer
  // left) are let go through the holder's references, never on the old store's word (I3).
  // Before the new store is allocated (its clusters are held with refcount 1 too); the
  // holder's cleared entries and the frees reach disk only at the commit that first makes
  // the new store durable, after it (commit steps 3 and 5 follow beforeRefcounts's writes).
  if (holder && !seen.trusted) await releaseOrphans(image, writer, holder);
  if (!holder) holder = await addHolder(image, writer, host, ext);
  const allocate = storeAllocator(holder, host);
  let store = seen.store;
  let extNow = { ...ext, dirty: true };
  if (store) {
    for (const a of seen.areas) host.markMetadata(a.offset, a.bytes, 'dedup metadata');
  } else {
    // Never write to nor free the old store's clusters: another tool may own them now.
    store = await DedupStore.create(image.file, geometryOf(ext, image.clusterSize), allocate);
    const configOffset = await allocate(1);
    extNow = { ...extNow, configOffset, configBytes: image.clusterSize };
  }
  const d = new Dedup(image, writer, extNow, store, holder, host, allocate);
  if (extNow.compress) d.compressWrites(); // create -o compression=on: every write as with -c
  if (!seen.trusted) {
    const replaced = seen.distrust === 'extension' ? 'the extension is replaced, with the default settings; ' : '';
    d.notice = `dedup index not trusted: ${seen.reason}; ${replaced}starting a fresh index (data is safe; earlier copies are no longer found)`;
  }
  return d;
}

/** Turns a freshly created plain v3 image into a dedup image (qdedup create -o dedup=…). */
export async function initializeDedup(image: Image, writer: ImageWriter, s: DedupSettings): Promise<Dedup> {
  const host = hostOf(image, writer);
  const configOffset = await host.allocate(1);
  const ext = newExtension(s, configOffset, image.clusterSize);
  await writeDedupExtension(writer, ext);
  const holder = await addHolder(image, writer, host, ext);
  await holder.holdRun(configOffset / image.clusterSize, 1); // allocated before the holder existed
  const allocate = storeAllocator(holder, host);
  const store = await DedupStore.create(image.file, geometryOf(ext, image.clusterSize), allocate);
  return new Dedup(image, writer, ext, store, holder, host, allocate);
}

/** The extension of a new store with settings `s` (dirty: the store is about to be written), its configuration at `configOffset`. */
function newExtension(s: DedupSettings, configOffset: number, configBytes: number): DedupExtension {
  return {
    version: DEDUP_EXT_VERSION,
    hashAlgorithm: hashAlgorithmId(s.algorithm),
    dirty: true,
    verify: s.verify,
    compress: s.compress,
    order: s.order,
    journalBlockSize: s.journalBlockSize,
    maxIncarnations: s.maxIncarnations,
    configOffset,
    configBytes,
  };
}

/** The holder snapshot of the image, loaded, or null when it has none. */
export async function findHolder(image: Image, host: HolderHost): Promise<Holder | null> {
  const s = image.snapshots.find((x) => x.name === HOLDER_NAME);
  return s ? Holder.load(host, s.l1TableOffset, s.l1Size) : null;
}

/**
 * Adds the holder snapshot: a zeroed L1 table and a new snapshot table (the old entries
 * and the holder's), made durable before the header points at it; the old table is freed
 * at the next commit.
 */
export async function addHolder(image: Image, writer: ImageWriter, host: HolderHost, ext: DedupExtension): Promise<Holder> {
  // Sized for the file and the store about to be allocated (both journals), so that the
  // L1 does not have to grow (and move past the journals) at once.
  const g = geometryOf(ext, image.clusterSize);
  const store = 2 * Math.ceil((initialJournalBlocks(g) * g.journalBlockSize) / image.clusterSize) + 8;
  const holder = await Holder.create(host, holderL1Size(Math.ceil((await image.file.size()) / image.clusterSize) + store, image.clusterBits));
  const h = image.header;
  const oldBytes = snapshotTableBytes(image);
  const oldTable = oldBytes ? await image.file.read(h.snapshotsOffset, oldBytes) : Buffer.alloc(0);
  const ids = image.snapshots.map((s) => Number(s.id)).filter(Number.isSafeInteger);
  const now = Date.now();
  const entry = encodeSnapshotEntry({
    l1TableOffset: holder.l1Offset,
    l1Size: holder.l1Size,
    id: String(Math.max(0, ...ids) + 1),
    name: HOLDER_NAME,
    dateSec: Math.floor(now / 1000),
    dateNsec: (now % 1000) * 1e6,
    diskSize: holder.coverage * image.clusterSize,
  });
  const table = Buffer.concat([oldTable, entry]);
  const clusters = Math.ceil(table.length / image.clusterSize);
  const offset = await host.allocate(clusters);
  await writer.file.write(offset, table);
  host.markMetadata(offset, table.length, 'snapshot table');
  await writer.commit(); // refcounts of the holder and the table durable before the header names them
  const oldOffset = h.snapshotsOffset;
  await writer.setSnapshotTable(offset, h.nbSnapshots + 1);
  if (oldBytes) for (let c = 0; c < Math.ceil(oldBytes / image.clusterSize); c++) writer.deferFree(oldOffset / image.clusterSize + c);
  return holder;
}

/**
 * After a foreign writer: clusters only the holder still references (refcount 1) are
 * released; the holder's own tables must be its alone (not applied to the active disk),
 * and a hold on one of them is dropped.
 */
export async function releaseOrphans(image: Image, writer: ImageWriter, holder: Holder): Promise<void> {
  for (const t of holder.tableOffsets()) {
    if (t % image.clusterSize)
      throw new CorruptImageError(
        `dedup holder L2 table offset ${hex(t)} is not cluster aligned; delete the snapshot with 'qemu-img snapshot -d ${HOLDER_NAME}'`,
        { offset: holder.l1Offset, structure: 'dedup holder' },
      );
    const c = t / image.clusterSize;
    await writer.fetchRefcounts([c]);
    let r = writer.refcount(c);
    if (await holder.isHeld(c)) {
      // An identity entry for the holder's own table (never made by qdedup): one reference
      // too many, and no index may name a table. Let go of it.
      holder.release(c);
      writer.deferFree(c);
      r--;
    }
    if (r !== 1)
      throw new CorruptImageError(
        `dedup holder L2 table at ${hex(t)} has refcount ${r}, not 1; delete the snapshot with 'qemu-img snapshot -d ${HOLDER_NAME}'`,
        { offset: t, structure: 'dedup holder' },
      );
  }
  const held = await heldClusters(image, holder, (message, offset) => {
    throw new CorruptImageError(message, { offset, structure: 'dedup holder' });
  });
  await holder.fetch(held);
  for (const c of held) {
    await writer.fetchRefcounts([c]); // one block at a time: bounded memory (I5)
    if (writer.refcount(c) === 1) {
      holder.release(c);
      writer.deferFree(c);
    }
  }
}

/** Bytes of the image's snapshot table: from its start to the end of its last entry (0 when empty). */
function snapshotTableBytes(image: Image): number {
  const last = image.snapshots[image.snapshots.length - 1];
  return last ? last.tableOffset + last.byteLength - image.header.snapshotsOffset : 0;
}

/**
 * The allocation, overlap-guard and table-move functions the store and the holder use. The
 * holder's L1 move (it grew) switches the snapshot table entry to the new L1 the way
 * addHolder adds the entry: a new table in clusters reserved before the commit (so their
 * refcounts are durable with its increments), synced before the header names it.
 */
export function hostOf(image: Image, writer: ImageWriter): HolderHost {
  let reserved: { offset: number; bytes: number } | null = null;
  const cs = image.clusterSize;
  const host: HolderHost = {
    file: writer.file,
    clusterBits: writer.clusterBits,
    allocate: async (n) => {
      const offset = await writer.allocate(n);
      writer.markMetadata(offset, n * cs, 'dedup metadata');
      return offset;
    },
    markMetadata: (offset, bytes, what) => writer.markMetadata(offset, bytes, what),
    freeUnreferenced: (cluster) => writer.deferFree(cluster),
    reserveL1Move: async () => {
      const bytes = snapshotTableBytes(image);
      reserved = { offset: await host.allocate(Math.ceil(bytes / cs)), bytes };
    },
    moveL1: async (l1Offset, l1Size, oldL1Offset, oldL1Bytes) => {
      const h = image.header;
      const at = reserved!;
      reserved = null;
      const entry = image.snapshots.find((x) => x.name === HOLDER_NAME)!;
      const table = await writer.file.read(h.snapshotsOffset, at.bytes);
      const pos = entry.tableOffset - h.snapshotsOffset;
      writeU64(table, pos, l1Offset);
      table.writeUInt32BE(l1Size, pos + 8);
      // v3 extra data bytes 8–15: the virtual disk size the snapshot describes (its coverage).
      if (table.readUInt32BE(pos + 36) >= 16) writeU64(table, pos + SNAPSHOT_FIXED_BYTES + 8, l1Size * (cs / 8) * cs);
      await writer.file.write(at.offset, table);
      host.markMetadata(at.offset, at.bytes, 'snapshot table');
      await writer.file.sync(); // I3: the new table durable before the header names it
      const oldTable = h.snapshotsOffset;
      await writer.setSnapshotTable(at.offset, h.nbSnapshots);
      for (let c = 0; c < Math.ceil(at.bytes / cs); c++) writer.deferFree(oldTable / cs + c);
      for (let c = 0; c < oldL1Bytes / cs; c++) writer.deferFree(oldL1Offset / cs + c);
    },
  };
  return host;
}

/**
 * Allocation for the store's own clusters: each is held by the holder (its one reference), so
 * `qemu-img check` counts it as referenced. A cluster past what the holder can ever cover
 * (beyond QEMU's largest L1) is left unheld: a leak, never a wrong reference.
 */
export function storeAllocator(holder: Holder, host: HolderHost): Allocate {
  const cs = 2 ** host.clusterBits;
  return async (n) => {
    const offset = await host.allocate(n);
    const first = offset / cs;
    let held = n;
    while (held > 0 && !holder.canHold(first + held - 1)) held--;
    await holder.holdRun(first, held);
    return offset;
  };
}
