// The dedup header extension (type 0xCD8E819B) and the dedup configuration area it points
// at. Pure. Layout: docs/FORMAT.md "Dedup header extension" and "Configuration area".
//
// The extension holds what never changes after creation (algorithm, geometry) plus the
// dirty flag; the configuration area holds what moves (journals, incarnations, limbo) and
// is rewritten, with its checksum, at every clean close. Both are trusted only while the
// dedup autoclear bit is set and the dirty flag is clear (I3, docs/DESIGN.md).

import { crc32 } from './crc32.ts';
import { CorruptImageError, hex } from '../errors.ts';
import { readU64, writeU64 } from './bytes.ts';
import type { HeaderExtension } from './header.ts';
import { MAX_JOURNAL_BLOCK, MIN_JOURNAL_BLOCK } from './journal-block.ts';

export const EXT_DEDUP = 0xcd8e819b;
/** Autoclear bit 60: "the qdedup dedup metadata is consistent with this image". */
export const AUTOCLEAR_DEDUP = 1n << 60n;
export const DEDUP_EXT_VERSION = 1;
export const DEDUP_EXT_BYTES = 48;
export const DEDUP_FLAG_DIRTY = 0x01;
export const DEDUP_FLAG_VERIFY = 0x02;
/** New unique clusters are written compressed by default (`create -o compression=on`), as with `-c`. */
export const DEDUP_FLAG_COMPRESS = 0x04;
/** Largest log store: 2^20 buckets × 4 slots × 49 bytes ≈ 200 MiB of RAM per log store (I4, I5). */
export const MAX_STORE_ORDER = 20;
/** Largest max_incarnations (a u32 field; 0 = unlimited). */
export const MAX_INCARNATIONS = 0xffffffff;

export const CONFIG_MAGIC = 0x51444443; // "QDDC"
export const CONFIG_HEADER_BYTES = 72;
/** Largest configuration area an extension may name (bounds what is read at open, I4). */
export const MAX_CONFIG_BYTES = 64 * 1024 * 1024;
export const INCARNATION_RECORD_BYTES = 32;
export const LIMBO_RECORD_BYTES = 16;

export interface DedupExtension {
  version: number;
  /** 0 sha256, 1 sha3-256, 2 skein (refused), 3 blake3: see src/dedup/hasher.ts. */
  hashAlgorithm: number;
  dirty: boolean;
  verify: boolean;
  /** Unique clusters written compressed by default. */
  compress?: boolean;
  /** Log store order: 2^order buckets of 4 slots. */
  order: number;
  journalBlockSize: number;
  /** 0 = unlimited. */
  maxIncarnations: number;
  configOffset: number;
  configBytes: number;
}

/** A journal block size the format allows: a power of two from MIN_JOURNAL_BLOCK to MAX_JOURNAL_BLOCK. */
export function validJournalBlockSize(n: number): boolean {
  return Number.isInteger(n) && n >= MIN_JOURNAL_BLOCK && n <= MAX_JOURNAL_BLOCK && (n & (n - 1)) === 0;
}

/** The dedup extension's payload among a header's extensions, or undefined (a plain image): the one place it is looked up. */
export function findDedupExtension(extensions: HeaderExtension[]): Buffer | undefined {
  return extensions.find((e) => e.type === EXT_DEDUP)?.data;
}

export function encodeDedupExtension(e: DedupExtension): Buffer {
  const buf = Buffer.alloc(DEDUP_EXT_BYTES);
  buf[0] = e.version;
  buf[1] = e.hashAlgorithm;
  buf[2] = (e.dirty ? DEDUP_FLAG_DIRTY : 0) | (e.verify ? DEDUP_FLAG_VERIFY : 0) | (e.compress ? DEDUP_FLAG_COMPRESS : 0);
  buf[3] = e.order;
  buf.writeUInt32BE(e.journalBlockSize, 4);
  buf.writeUInt32BE(e.maxIncarnations, 8);
  buf.writeUInt32BE(e.configBytes, 12);
  writeU64(buf, 16, e.configOffset);
  return buf;
}

/** Decodes and validates the extension payload. Throws CorruptImageError naming the field. */
export function decodeDedupExtension(buf: Buffer, clusterSize: number): DedupExtension {
  const bad = (what: string, at: number) => new CorruptImageError(`dedup header extension: ${what}`, { offset: at, structure: 'dedup header extension' });
  if (buf.length < DEDUP_EXT_BYTES) throw bad(`payload of ${buf.length} bytes, expected ${DEDUP_EXT_BYTES}`, 0);
  if (buf[0] !== DEDUP_EXT_VERSION) throw bad(`unknown version ${buf[0]}`, 0);
  if (buf[2] & ~(DEDUP_FLAG_DIRTY | DEDUP_FLAG_VERIFY | DEDUP_FLAG_COMPRESS)) throw bad(`unknown flags 0x${buf[2].toString(16)}`, 2);
  const order = buf[3];
  if (order > MAX_STORE_ORDER) throw bad(`store order ${order} above ${MAX_STORE_ORDER}`, 3);
  const journalBlockSize = buf.readUInt32BE(4);
  if (!validJournalBlockSize(journalBlockSize))
    throw bad(`journal block size ${journalBlockSize} is not a power of two from ${MIN_JOURNAL_BLOCK} to ${MAX_JOURNAL_BLOCK}`, 4);
  const configBytes = buf.readUInt32BE(12);
  const configOffset = readU64(buf, 16, 'dedup configuration offset');
  if (configOffset % clusterSize !== 0 || configOffset === 0)
    throw bad(`configuration area offset ${hex(configOffset)} is not a non-zero multiple of the cluster size`, 16);
  if (configBytes < CONFIG_HEADER_BYTES || configBytes > MAX_CONFIG_BYTES) throw bad(`configuration area size ${configBytes} out of range`, 12);
  if (buf.subarray(24, DEDUP_EXT_BYTES).some((b) => b !== 0)) throw bad('reserved bytes 24–47 are not zero', 24);
  return {
    version: buf[0],
    hashAlgorithm: buf[1],
    dirty: (buf[2] & DEDUP_FLAG_DIRTY) !== 0,
    verify: (buf[2] & DEDUP_FLAG_VERIFY) !== 0,
    compress: (buf[2] & DEDUP_FLAG_COMPRESS) !== 0,
    order,
    journalBlockSize,
    maxIncarnations: buf.readUInt32BE(8),
    configOffset,
    configBytes,
  };
}

export interface JournalDescriptor {
  /** Host offset of block 0 (cluster aligned). */
  offset: number;
  blocks: number;
  /** Sequence number replay expects in block 0. */
  startSequence: number;
  /**
   * Blocks written when the configuration was recorded: replay of a trusted store must
   * stop exactly there (a zeroed or stale block before it would look like a clean end and
   * hide later entries, deletions included).
   */
  written: number;
}

export interface IncarnationRecord {
  /** Host offset of the filter (slots × u16 tags); the hash table follows, cluster aligned. */
  offset: number;
  /** Used slots when it was frozen (tombstones included). */
  entries: number;
  /** Age: higher is younger. */
  generation: number;
}

export interface LimboRecord {
  offset: number;
  clusters: number;
}

export interface DedupConfig {
  /** Index (0 or 1) of the journal of the current log store; the other is the frozen one's. */
  currentJournal: number;
  journals: [JournalDescriptor, JournalDescriptor];
  /** Youngest first. */
  incarnations: IncarnationRecord[];
  limbo: LimboRecord[];
}

/** Generation number for the next incarnation: one past the youngest. */
export function nextGeneration(config: DedupConfig): number {
  return config.incarnations.length ? config.incarnations[0].generation + 1 : 0;
}

/** Bytes the configuration area needs for `config`. */
export function configBytesFor(config: DedupConfig): number {
  return CONFIG_HEADER_BYTES + config.incarnations.length * INCARNATION_RECORD_BYTES + config.limbo.length * LIMBO_RECORD_BYTES;
}

/**
 *   0–3 magic "QDDC"     4–7 crc32 of bytes 8 … size-1
 *   8–11 incarnations    12–15 limbo records   16 current journal   17–23 reserved
 *  24–47 journal 0: u64 offset, u32 blocks, u32 blocks written, u64 start sequence
 *  48–71 journal 1: the same
 *  72…   incarnation records (u64 offset, u32 entries, u32 reserved, u64 generation, u64 reserved)
 *        then limbo records (u64 offset, u32 clusters, u32 reserved)
 * The area is `size` bytes long; the rest is zero.
 */
export function encodeDedupConfig(config: DedupConfig, size: number): Buffer {
  const need = configBytesFor(config);
  if (need > size) throw new RangeError(`dedup configuration needs ${need} bytes, area has ${size}`);
  const buf = Buffer.alloc(size);
  buf.writeUInt32BE(CONFIG_MAGIC, 0);
  buf.writeUInt32BE(config.incarnations.length, 8);
  buf.writeUInt32BE(config.limbo.length, 12);
  buf[16] = config.currentJournal;
  config.journals.forEach((j, i) => {
    const at = 24 + i * 24;
    writeU64(buf, at, j.offset);
    buf.writeUInt32BE(j.blocks, at + 8);
    buf.writeUInt32BE(j.written, at + 12);
    writeU64(buf, at + 16, j.startSequence);
  });
  let pos = CONFIG_HEADER_BYTES;
  for (const r of config.incarnations) {
    writeU64(buf, pos, r.offset);
    buf.writeUInt32BE(r.entries, pos + 8);
    writeU64(buf, pos + 16, r.generation);
    pos += INCARNATION_RECORD_BYTES;
  }
  for (const r of config.limbo) {
    writeU64(buf, pos, r.offset);
    buf.writeUInt32BE(r.clusters, pos + 8);
    pos += LIMBO_RECORD_BYTES;
  }
  buf.writeUInt32BE(crc32(buf.subarray(8)), 4);
  return buf;
}

/** Decodes and validates a configuration area. Throws CorruptImageError naming the byte. */
export function decodeDedupConfig(buf: Buffer, areaOffset: number, clusterSize: number): DedupConfig {
  const bad = (what: string, at: number) =>
    new CorruptImageError(`dedup configuration area: ${what}`, { offset: areaOffset + at, structure: 'dedup configuration area' });
  if (buf.length < CONFIG_HEADER_BYTES || buf.readUInt32BE(0) !== CONFIG_MAGIC) throw bad('bad magic', 0);
  if (buf.readUInt32BE(4) !== crc32(buf.subarray(8))) throw bad('checksum mismatch', 4);
  const incarnationCount = buf.readUInt32BE(8);
  const limboCount = buf.readUInt32BE(12);
  const currentJournal = buf[16];
  if (currentJournal > 1) throw bad(`current journal ${currentJournal} is not 0 or 1`, 16);
  if (CONFIG_HEADER_BYTES + incarnationCount * INCARNATION_RECORD_BYTES + limboCount * LIMBO_RECORD_BYTES > buf.length)
    throw bad(`${incarnationCount} incarnations and ${limboCount} limbo records do not fit`, 8);
  const aligned = (offset: number, at: number, what: string) => {
    if (offset === 0 || offset % clusterSize !== 0) throw bad(`${what} offset ${hex(offset)} is not a non-zero multiple of the cluster size`, at);
    return offset;
  };
  const journals = [0, 1].map((i) => {
    const at = 24 + i * 24;
    const d = {
      offset: aligned(readU64(buf, at, 'journal offset'), at, `journal ${i}`),
      blocks: buf.readUInt32BE(at + 8),
      written: buf.readUInt32BE(at + 12),
      startSequence: readU64(buf, at + 16, 'journal start sequence'),
    };
    if (d.written > d.blocks) throw bad(`journal ${i}: ${d.written} blocks written of ${d.blocks}`, at + 12);
    return d;
  }) as [JournalDescriptor, JournalDescriptor];
  const incarnations: IncarnationRecord[] = [];
  let pos = CONFIG_HEADER_BYTES;
  for (let i = 0; i < incarnationCount; i++, pos += INCARNATION_RECORD_BYTES) {
    const generation = readU64(buf, pos + 16, 'incarnation generation');
    if (i > 0 && generation >= incarnations[i - 1].generation) throw bad(`incarnation ${i} is not older than incarnation ${i - 1}`, pos + 16);
    incarnations.push({ offset: aligned(readU64(buf, pos, 'incarnation offset'), pos, `incarnation ${i}`), entries: buf.readUInt32BE(pos + 8), generation });
  }
  const limbo: LimboRecord[] = [];
  for (let i = 0; i < limboCount; i++, pos += LIMBO_RECORD_BYTES) {
    limbo.push({ offset: aligned(readU64(buf, pos, 'limbo offset'), pos, `limbo record ${i}`), clusters: buf.readUInt32BE(pos + 8) });
  }
  return { currentJournal, journals, incarnations, limbo };
}
