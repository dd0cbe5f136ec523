// What `qdedup info` reports about an image, read without opening its backing chain (like
// qemu-img info, it must describe an image whose backing file is missing or loops): the
// header, the snapshot table, the file's disk usage, the backing file as qemu names it, and
// the dedup store's settings with judgeStore()'s verdict. The CLI formats it.

import { isAbsolute } from 'node:path';
import { backingFormatOf, type Header } from '../format/header.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import { Image } from '../image/image.ts';
import { readSnapshotTable } from '../image/snapshot-table.ts';
import { SyncReadFile } from '../image/sync-read-file.ts';
import type { LockRequest } from '../image/image-lock.ts';
import { judgeStore, type StoreVerdict } from './judge-store.ts';

export interface ImageFacts {
  header: Header;
  clusterSize: number;
  /** The snapshot table, in table order (the tables themselves are not looked at). */
  snapshots: SnapshotEntry[];
  /** Bytes the file occupies on disk. */
  actualSize: number;
  /** The backing file: its name as stored, qemu's path for it (path_combine), its format if recorded. */
  backing?: { name: string; full: string; format?: string };
  /** judgeStore()'s verdict (store not replayed; a broken extension is a verdict), null for a plain image. */
  dedup: StoreVerdict | null;
}

/**
 * Reads the facts of `path` holding `lock` (QEMU's image locks). Throws the open and read
 * errors. The few KiB it reads are read on this thread (SyncReadFile: no thread-pool round
 * trips, the most of an `info`'s own time).
 */
export async function readImageFacts(path: string, lock?: LockRequest): Promise<ImageFacts> {
  const image = await Image.open(path, { backing: false, file: SyncReadFile.open(path, lock) });
  try {
    const h = image.header;
    const snapshots = h.nbSnapshots > 0 ? await readSnapshotTable(image.file, h.snapshotsOffset, h.nbSnapshots) : [];
    const verdict = await judgeStore(image, { store: false, tolerant: true });
    let backing: ImageFacts['backing'];
    if (h.backingFile !== undefined) {
      // qemu's path_combine(): the image path up to its last '/', then the name; not made
      // absolute (`info o.qcow2` shows "a.qcow2", as qemu-img info does).
      const slash = path.lastIndexOf('/');
      const full = isAbsolute(h.backingFile) || slash < 0 ? h.backingFile : path.slice(0, slash + 1) + h.backingFile;
      backing = { name: h.backingFile, full, format: backingFormatOf(h) || undefined };
    }
    return {
      header: h,
      clusterSize: image.clusterSize,
      snapshots,
      actualSize: await image.file.allocatedBytes(),
      backing,
      dedup: verdict.ext || verdict.extError ? verdict : null,
    };
  } finally {
    await image.close();
  }
}
