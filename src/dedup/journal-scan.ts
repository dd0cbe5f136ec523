// Reads a dedup journal block by block for `qdedup journal-dump`: every block's sequence
// number, checksum and verdict, every entry, and where replay stops and why. Read-only
// (BlockFile.read only). The stop is decided exactly as replayJournal() decides it (same
// decoder, same expected sequence numbers), so what the dump says is what a write will use.
// Layout and replay rule: docs/FORMAT.md §7.
//
// After the stop the scan goes on while blocks still carry the journal magic (stale blocks
// of an earlier use of the area, or valid blocks cut off by damage) so the dump can show what
// replay leaves out; it ends at the first block without the magic (all zero past the end of
// the file), so its cost is bounded by the journal and the file.

import { crc32 } from '../format/crc32.ts';
import { CorruptImageError, QdedupError, hex } from '../errors.ts';
import { AUTOCLEAR_DEDUP, EXT_DEDUP, decodeDedupConfig, type DedupConfig, type DedupExtension, type JournalDescriptor } from '../format/dedup-ext.ts';
import { ENTRY_HEADER_BYTES, JOURNAL_MAGIC, decodeJournalBlock, type BlockVerdict } from '../format/journal-block.ts';
import type { BlockFile } from '../image/block-file.ts';
import { Image } from '../image/image.ts';
import type { LockRequest } from '../image/image-lock.ts';
import type { ReplayStop } from './journal.ts';
import { judgeStore } from './judge-store.ts';

export interface ScannedEntry {
  /** Byte offset of the entry from the start of the journal (block × block size + offset in block). */
  journalOffset: number;
  /** Byte offset of the entry inside its block. */
  offsetInBlock: number;
  /** Entry type byte (1 = hash entry, the only type a valid block holds). */
  type: number;
  /** Bytes the entry occupies on disk: 4 header bytes + payload length. */
  size: number;
  hash: string;
  hostOffset: number;
  firstGuestOffset: number;
  deleted: boolean;
}

export interface ScannedBlock {
  index: number;
  /** Host (file) offset of the block. */
  fileOffset: number;
  expectedSequence: number;
  /** Sequence number found in the block; null when it has no journal magic, or is ≥ 2^53. */
  sequence: number | null;
  /** CRC-32 matches; null for a block without the journal magic (never written, or not a journal block). */
  checksumValid: boolean | null;
  verdict: BlockVerdict;
  reason: string;
  /** True when replay uses this block (it is before the stop). */
  replayed: boolean;
  /** Entries of a block that decodes as valid (also after the stop: shown, not used). */
  entries: ScannedEntry[];
}

export interface JournalScan {
  desc: JournalDescriptor;
  blockSize: number;
  blocks: ScannedBlock[];
  /** Where replay stops, as replayJournal() reports it. */
  stop: ReplayStop;
  /** Entries replay applies, in order (duplicates of a re-written partial block included). */
  replayedEntries: number;
  insertions: number;
  deletions: number;
  /** Distinct hashes indexed once the replayed entries are applied in order. */
  liveHashes: number;
  /** Distinct hashes whose last replayed entry is a deletion (tombstones). */
  deletedHashes: number;
}

/** Bytes read per request. */
const READ_BYTES = 1024 * 1024;

/** Scans one journal; never writes. */
export async function scanJournal(file: BlockFile, desc: JournalDescriptor, blockSize: number): Promise<JournalScan> {
  const blocks: ScannedBlock[] = [];
  let stop: ReplayStop | null = null;
  const perRead = Math.max(1, Math.floor(READ_BYTES / blockSize));
  const fileSize = await file.size();
  scan: for (let first = 0; first < desc.blocks; first += perRead) {
    const count = Math.min(perRead, desc.blocks - first);
    const at = desc.offset + first * blockSize;
    // Nothing past the end of the file: those blocks read as zero, and replay stops at the first.
    const buf = at >= fileSize ? Buffer.alloc(blockSize) : await file.read(at, count * blockSize);
    for (let i = 0; i < buf.length / blockSize; i++) {
      const index = first + i;
      const bytes = buf.subarray(i * blockSize, (i + 1) * blockSize);
      const expectedSequence = desc.startSequence + index;
      const decoded = decodeJournalBlock(bytes, expectedSequence);
      const hasMagic = bytes.readUInt32BE(0) === JOURNAL_MAGIC;
      if (stop && !hasMagic) break scan;
      const seq = bytes.readBigUInt64BE(8);
      blocks.push({
        index,
        fileOffset: desc.offset + index * blockSize,
        expectedSequence,
        sequence: hasMagic && seq <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(seq) : null,
        checksumValid: hasMagic ? bytes.readUInt32BE(4) === crc32(bytes.subarray(8)) : null,
        verdict: decoded.verdict,
        reason: decoded.reason,
        replayed: !stop && decoded.verdict === 'valid',
        entries: decoded.entries.map((e) => {
          const offsetInBlock = e.offsetInBlock!;
          return {
            journalOffset: index * blockSize + offsetInBlock,
            offsetInBlock,
            type: bytes[offsetInBlock],
            size: ENTRY_HEADER_BYTES + bytes.readUInt16BE(offsetInBlock + 2),
            hash: e.hash.toString('hex'),
            hostOffset: e.hostOffset,
            firstGuestOffset: e.firstGuestOffset,
            deleted: e.deleted,
          };
        }),
      });
      if (!stop && decoded.verdict !== 'valid') stop = { block: index, verdict: decoded.verdict, reason: decoded.reason };
      if (at >= fileSize && stop) break scan;
    }
  }
  stop ??= { block: desc.blocks, verdict: 'end-of-journal', reason: 'every block replayed' };
  const live = new Map<string, boolean>();
  let insertions = 0;
  let deletions = 0;
  for (const b of blocks) {
    if (!b.replayed) continue;
    for (const e of b.entries) {
      if (e.deleted) deletions++;
      else insertions++;
      live.set(e.hash, !e.deleted);
    }
  }
  const liveHashes = [...live.values()].filter(Boolean).length;
  return { desc, blockSize, blocks, stop, replayedEntries: insertions + deletions, insertions, deletions, liveHashes, deletedHashes: live.size - liveHashes };
}

/** Which log store a journal belongs to. */
export type JournalRole = 'current' | 'frozen';

export interface JournalsReport {
  /** Dedup autoclear bit 60 set in the header. */
  autoclearBit: boolean;
  /** Dedup dirty flag (extension byte 2, bit 0). */
  dirty: boolean;
  /** judgeStore()'s verdict: the next read-write open keeps the index. */
  trusted: boolean;
  ext: DedupExtension;
  /** The hash algorithm's name, or "unknown (N)". */
  algorithm: string;
  config: DedupConfig;
  /** Journal 0 then journal 1. */
  journals: { index: number; role: JournalRole; scan: JournalScan }[];
  /** Same as `trusted` (kept as the JSON key `index-kept`). */
  indexKept: boolean;
  /** What the next write does with the index: "kept: …", "dropped: <reason>", or "refused: <reason>" (an algorithm a write refuses). */
  indexReason: string;
}

/**
 * Reads the dedup extension, the configuration area and both journals of an image opened
 * read-only, with judgeStore()'s verdict. Throws QdedupError (exit 1) for a plain image and
 * CorruptImageError naming a damaged extension or configuration area (the journals cannot
 * be found without them).
 */
export async function readJournals(image: Image): Promise<JournalsReport> {
  const verdict = await judgeStore(image, { store: false });
  const ext = verdict.ext;
  if (!ext) throw new QdedupError(`not a dedup image (no dedup header extension ${hex(EXT_DEDUP)})`, 'ENOTDEDUP', 1);
  let config = verdict.config;
  if (!config) {
    try {
      config = decodeDedupConfig(await image.file.read(ext.configOffset, ext.configBytes), ext.configOffset, image.clusterSize);
    } catch (err) {
      // Name the area and where it is: "dedup configuration area: checksum mismatch at 0x…".
      if (err instanceof CorruptImageError) throw new CorruptImageError(`${err.message} at ${hex(err.details.offset ?? ext.configOffset)}`, err.details);
      throw err;
    }
  }
  const journals = [];
  for (const index of [0, 1]) {
    journals.push({
      index,
      role: (index === config.currentJournal ? 'current' : 'frozen') as JournalRole,
      scan: await scanJournal(image.file, config.journals[index], ext.journalBlockSize),
    });
  }
  const indexReason = verdict.trusted
    ? 'kept: ' + journals.map((j) => `${j.scan.replayedEntries} entries from journal ${j.index} (${j.role})`).join(', ')
    : `${verdict.distrust === 'algorithm' ? 'refused' : 'dropped'}: ${verdict.reason}`;
  return {
    autoclearBit: (image.header.autoclearFeatures & AUTOCLEAR_DEDUP) !== 0n,
    dirty: ext.dirty,
    trusted: verdict.trusted,
    ext,
    algorithm: verdict.algorithm,
    config,
    journals,
    indexKept: verdict.trusted,
    indexReason,
  };
}

/** readJournals() of the image at `path`, opened read-only without its backing file, holding `lock` (QEMU's image locks). */
export async function readImageJournals(path: string, lock?: LockRequest): Promise<JournalsReport> {
  const image = await Image.open(path, { backing: false, lock });
  try {
    return await readJournals(image);
  } finally {
    await image.close();
  }
}
