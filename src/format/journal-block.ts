// Dedup journal blocks: fixed-size, checksummed, sequence-numbered blocks of entries.
// Pure. Layout and replay rule: docs/FORMAT.md "Journal".
//
//   block := header entry* zero-padding            (exactly blockSize bytes)
//   header:  0–3  magic "QDJB"   4–7  crc32 of bytes 8 … blockSize-1
//            8–15 u64 sequence   16–17 u16 entry count   18–19 u16 entry bytes
//            20–23 reserved, 0
//   entry:   0 u8 type   1 u8 flags   2–3 u16 payload length (bytes after these 4)
//            4 … 4+length-1 payload
//
// A block is valid only if the magic, the checksum, the expected sequence number and
// every entry parse; replay stops at the first block that is not.

import { crc32 } from './crc32.ts';
import { HASH_ENTRY_BYTES, decodeHashEntry, encodeHashEntry, type HashEntry } from './hash-entry.ts';
import { U64_HI_UNSAFE, readU64, writeU64 } from './bytes.ts';

export const JOURNAL_MAGIC = 0x51444a42; // "QDJB"
export const JOURNAL_HEADER_BYTES = 24;
export const ENTRY_HEADER_BYTES = 4;
export const ENTRY_TYPE_HASH = 1;
export const ENTRY_FLAG_DELETED = 0x01;
/** A hash entry in a journal: 4-byte entry header + 48-byte payload. */
export const JOURNAL_HASH_ENTRY_BYTES = ENTRY_HEADER_BYTES + HASH_ENTRY_BYTES;
export const MIN_JOURNAL_BLOCK = 512;
export const MAX_JOURNAL_BLOCK = 65536;

export interface JournalEntry extends HashEntry {
  deleted: boolean;
  /** Byte offset of the entry inside its block (for journal-dump). */
  offsetInBlock?: number;
}

export type BlockVerdict = 'valid' | 'bad-magic' | 'bad-checksum' | 'bad-sequence' | 'bad-entry' | 'empty';

export interface DecodedBlock {
  verdict: BlockVerdict;
  /** Human words for the verdict, naming the byte where useful. */
  reason: string;
  sequence: number;
  checksumValid: boolean;
  entries: JournalEntry[];
}

/** Hash entries that fit in one block of `blockSize` bytes. */
export function entriesPerBlock(blockSize: number): number {
  return Math.floor((blockSize - JOURNAL_HEADER_BYTES) / JOURNAL_HASH_ENTRY_BYTES);
}

/** Encodes a whole block: header with checksum, the entries, zero padding. */
export function encodeJournalBlock(blockSize: number, sequence: number, entries: JournalEntry[]): Buffer {
  if (entries.length > entriesPerBlock(blockSize)) throw new RangeError(`${entries.length} entries do not fit in a ${blockSize}-byte journal block`);
  const buf = Buffer.alloc(blockSize);
  entries.forEach((e, i) => encodeJournalEntry(buf, i, e.hash, 0, e.hostOffset, e.firstGuestOffset, e.deleted));
  sealJournalBlock(buf, sequence, entries.length);
  return buf;
}

/**
 * Writes entry `index` of a block being filled (a block encoded entry by entry, then sealed):
 * the hash at byte `hashAt` of `hash`, its host and guest offsets, deleted or not.
 */
export function encodeJournalEntry(
  block: Buffer,
  index: number,
  hash: Uint8Array,
  hashAt: number,
  hostOffset: number,
  firstGuestOffset: number,
  deleted: boolean,
): void {
  const pos = JOURNAL_HEADER_BYTES + index * JOURNAL_HASH_ENTRY_BYTES;
  block[pos] = ENTRY_TYPE_HASH;
  block[pos + 1] = deleted ? ENTRY_FLAG_DELETED : 0;
  block.writeUInt16BE(HASH_ENTRY_BYTES, pos + 2);
  encodeHashEntry(block, pos + ENTRY_HEADER_BYTES, hash, hashAt, hostOffset, firstGuestOffset);
}

/** Completes a block whose first `count` entries are encoded (and the rest zero): its header and checksum. */
export function sealJournalBlock(block: Buffer, sequence: number, count: number): void {
  block.writeUInt32BE(JOURNAL_MAGIC, 0);
  writeU64(block, 8, sequence);
  block.writeUInt16BE(count, 16);
  block.writeUInt16BE(count * JOURNAL_HASH_ENTRY_BYTES, 18);
  block.writeUInt32BE(crc32(block.subarray(8)), 4);
}

/**
 * Decodes one block and judges it. `expectedSequence` is the sequence number replay
 * expects at this position. Never throws on bad bytes: the verdict says what is wrong.
 */
export function decodeJournalBlock(buf: Buffer, expectedSequence: number): DecodedBlock {
  const out = (verdict: BlockVerdict, reason: string, sequence = 0, checksumValid = false, entries: JournalEntry[] = []): DecodedBlock => ({
    verdict,
    reason,
    sequence,
    checksumValid,
    entries,
  });
  if (buf.readUInt32BE(0) !== JOURNAL_MAGIC) {
    return buf.every((b) => b === 0)
      ? out('empty', 'block never written (all zero)')
      : out('bad-magic', `bad magic 0x${buf.readUInt32BE(0).toString(16)} at byte 0`);
  }
  const checksumValid = buf.readUInt32BE(4) === crc32(buf.subarray(8));
  const hi = buf.readUInt32BE(8);
  const sequence = hi >= U64_HI_UNSAFE ? -1 : readU64(buf, 8, 'journal sequence');
  if (!checksumValid) return out('bad-checksum', 'checksum mismatch (torn or damaged block)', sequence, false);
  if (sequence !== expectedSequence) return out('bad-sequence', `sequence ${sequence}, expected ${expectedSequence} (a stale block)`, sequence, true);
  const count = buf.readUInt16BE(16);
  const used = buf.readUInt16BE(18);
  if (JOURNAL_HEADER_BYTES + used > buf.length) return out('bad-entry', `entry bytes ${used} run past the block end`, sequence, true);
  const entries: JournalEntry[] = [];
  let pos = JOURNAL_HEADER_BYTES;
  const end = JOURNAL_HEADER_BYTES + used;
  for (let i = 0; i < count; i++) {
    if (pos + ENTRY_HEADER_BYTES > end) return out('bad-entry', `entry ${i} at byte ${pos} crosses the end of the entries`, sequence, true);
    const type = buf[pos];
    const flags = buf[pos + 1];
    const length = buf.readUInt16BE(pos + 2);
    if (pos + ENTRY_HEADER_BYTES + length > end)
      return out('bad-entry', `entry ${i} at byte ${pos}: length ${length} crosses the end of the entries`, sequence, true);
    if (type !== ENTRY_TYPE_HASH || length !== HASH_ENTRY_BYTES || (flags & ~ENTRY_FLAG_DELETED) !== 0) {
      return out('bad-entry', `entry ${i} at byte ${pos}: unknown type ${type}, flags 0x${flags.toString(16)} or length ${length}`, sequence, true);
    }
    let entry: HashEntry;
    try {
      entry = decodeHashEntry(buf, pos + ENTRY_HEADER_BYTES);
    } catch {
      return out('bad-entry', `entry ${i} at byte ${pos}: offset beyond 2^53`, sequence, true);
    }
    entries.push({ ...entry, deleted: (flags & ENTRY_FLAG_DELETED) !== 0, offsetInBlock: pos });
    pos += ENTRY_HEADER_BYTES + length;
  }
  if (pos !== end) return out('bad-entry', `entry bytes ${used} do not match ${count} entries`, sequence, true);
  return out('valid', 'valid', sequence, true, entries);
}
