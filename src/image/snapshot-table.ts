// Reading the internal snapshot table: the one loop over its entries, within QEMU's limits
// (qcow2_read_snapshots: 1 KiB of extra data an entry, 64 MiB in all). The entries' bytes
// are decoded by src/format/snapshot.ts; the snapshots' L1 tables are not looked at here
// (Image.loadSnapshots validates them, check counts them).

import { CorruptImageError } from '../errors.ts';
import { MAX_SNAPSHOT_TABLE_BYTES, decodeSnapshotEntry, type SnapshotEntry } from '../format/snapshot.ts';
import type { BlockFile } from './block-file.ts';

/** Bytes read at a time while walking the table. */
const READ_BYTES = 64 * 1024;

/** The table passes MAX_SNAPSHOT_TABLE_BYTES (check words this one its own way). */
export class SnapshotTableTooBigError extends CorruptImageError {}

/**
 * Yields the `count` entries of the table at `offset`, each with the bytes of the table up to
 * its end, reading through `read` (whose past-the-end behaviour is the caller's). Throws
 * SnapshotTableTooBigError after an entry that ends past MAX_SNAPSHOT_TABLE_BYTES, and what
 * decodeSnapshotEntry throws (SnapshotExtraDataError, UnsupportedError).
 */
export async function* snapshotTableEntries(
  read: (offset: number, length: number) => Promise<Buffer>,
  offset: number,
  count: number,
): AsyncGenerator<{ entry: SnapshotEntry; tableBytes: number }> {
  let buf = Buffer.alloc(0);
  let bufStart = offset;
  let pos = 0;
  for (let index = 0; index < count; ) {
    const decoded = decodeSnapshotEntry(buf, pos, bufStart);
    if (!decoded) {
      const more = await read(bufStart + buf.length, READ_BYTES);
      buf = Buffer.concat([buf.subarray(pos), more]);
      bufStart += pos;
      pos = 0;
      continue;
    }
    pos += decoded.length;
    const tableBytes = bufStart + pos - offset;
    if (tableBytes > MAX_SNAPSHOT_TABLE_BYTES) {
      const message = `snapshot table is too big (over ${MAX_SNAPSHOT_TABLE_BYTES} bytes at snapshot ${index})`;
      throw new SnapshotTableTooBigError(message, { offset, structure: 'snapshot table' });
    }
    yield { entry: decoded.entry, tableBytes };
    index++;
  }
}

/**
 * Reads `count` snapshot table entries from `offset` (`info` shows a table as qemu-img does,
 * Image.loadSnapshots validates). Throws CorruptImageError, UnsupportedError, IoError.
 */
export async function readSnapshotTable(file: BlockFile, offset: number, count: number): Promise<SnapshotEntry[]> {
  const out: SnapshotEntry[] = [];
  for await (const { entry } of snapshotTableEntries((o, n) => file.read(o, n), offset, count)) out.push(entry);
  return out;
}
