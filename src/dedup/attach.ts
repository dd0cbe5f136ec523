// How Dedup.attach and Dedup.initialize (./dedup.ts) prepare a dedup image open for
// writing, around the store: the holder snapshot found, or added (a new snapshot table made
// durable before the header names it); after a foreign writer or an untrusted store, the
// clusters only the holder still references released through its references (I3); and the
// allocation, overlap-guard and L1-move functions the store and the holder use.
// Design: docs/DESIGN.md "The holder also holds the store".

import { CorruptImageError, hex } from '../errors.ts';
import type { DedupExtension } from '../format/dedup-ext.ts';
import { SNAPSHOT_FIXED_BYTES, encodeSnapshotEntry } from '../format/snapshot.ts';
import { writeU64 } from '../format/bytes.ts';
import type { Image } from '../image/image.ts';
import type { ImageWriter } from '../image/write-policy.ts';
import { HOLDER_NAME, Holder, holderL1Size, type HolderHost } from './holder.ts';
import { geometryOf, initialJournalBlocks, type Allocate } from './store.ts';
import { heldClusters } from './clusters.ts';

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
