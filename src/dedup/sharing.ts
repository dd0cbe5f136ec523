// What `map` needs to know about dedup to count guest references (src/image/map.ts): the
// holder snapshot (./holder.ts) holds one reference on every indexed cluster and on the
// store's own clusters; that reference is no guest's, so it is taken off the refcount, and
// the holder's tables are not a guest view to list shares from. Read-only.
//
// The holder's L2 tables map cluster P to host cluster P, so "is P held" is one entry of one
// table; tables are read on demand and at most HOLDER_TABLES_KEPT are kept (bounded memory,
// whatever the size of the image).

import { decodeL1Entry, decodeL2Entry } from '../format/l1l2.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import type { Image } from '../image/image.ts';
import type { ShareAccounting } from '../image/map.ts';
import { HOLDER_NAME } from './holder.ts';

/** Holder L2 tables kept in memory (the oldest read is dropped first). */
const HOLDER_TABLES_KEPT = 1024;

const isHolder = (s: SnapshotEntry) => s.name === HOLDER_NAME;

/**
 * Share accounting for `image`: without a holder snapshot every reference is a guest's; with
 * one, a held cluster has one reference fewer, and the holder is skipped when listing shares.
 * The holder is valid QCOW2 metadata whether or not the dedup index is trusted, so this holds
 * for an untrusted index too.
 */
export async function dedupShareAccounting(image: Image): Promise<ShareAccounting> {
  const snapshots = image.header.nbSnapshots ? await image.loadSnapshots() : [];
  const holder = snapshots.find(isHolder);
  if (!holder || holder.l1Size === 0) return { skipSnapshot: isHolder };
  const cs = image.clusterSize;
  const perTable = image.l2Entries;
  const l1 = await image.file.read(holder.l1TableOffset, holder.l1Size * 8);
  const tables = new Map<number, Buffer | null>();
  const table = async (l1Index: number): Promise<Buffer | null> => {
    if (tables.has(l1Index)) return tables.get(l1Index)!;
    const l2Offset = l1Index < holder.l1Size ? decodeL1Entry(l1, l1Index).l2Offset : 0;
    // A malformed holder table holds nothing (check reports it).
    const t = l2Offset && l2Offset % cs === 0 ? await image.file.read(l2Offset, cs) : null;
    if (tables.size >= HOLDER_TABLES_KEPT) tables.delete(tables.keys().next().value!);
    tables.set(l1Index, t);
    return t;
  };
  return {
    skipSnapshot: isHolder,
    async nonGuestRefs(hostCluster) {
      const t = await table(Math.floor(hostCluster / perTable));
      if (!t) return 0;
      const e = decodeL2Entry(t, hostCluster % perTable, image.clusterBits);
      return e.kind === 'normal' && e.hostOffset === hostCluster * cs ? 1 : 0;
    },
  };
}
