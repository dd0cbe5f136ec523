// QCOW2 header (cluster 0): fixed fields, header extensions and the backing file name.
// Pure: decodeHeader(buf) ⇄ encodeHeader(h). Spec: QEMU docs/interop/qcow2.rst,
// "Header" and "Header extensions"; what qdedup adds or constrains: docs/FORMAT.md.
//
// Decoding validates every field before anything is sized from it (I4, docs/DESIGN.md): magic,
// version, header length, cluster bits, refcount order, table offsets and sizes against
// the named limits below, extension lengths, the backing name. Unknown compatible bits,
// unknown extensions and unknown additional header bytes are kept for re-encoding.

import { CorruptImageError, NotQcow2Error, UnsupportedError, hex } from '../errors.ts';
import { readU64, writeU64, divCeil } from './bytes.ts';

export const QCOW_MAGIC = 0x514649fb; // "QFI\xfb"
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** The header length QEMU 7.2 writes for v3: the fixed fields plus compression_type and padding. */
export const V3_HEADER_LENGTH = 112;

export const MIN_CLUSTER_BITS = 9; // 512 B
export const MAX_CLUSTER_BITS = 21; // 2 MiB, QEMU's limit
export const MAX_REFCOUNT_ORDER = 6; // 64-bit refcounts
/** Version 2 images have 16-bit refcounts (refcount_order is a v3 field). */
export const V2_REFCOUNT_ORDER = 4;
/** QEMU's QCOW_MAX_L1_SIZE: 32 MiB of L1 entries covers 2^52 bytes at 2 MiB clusters. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
/** QEMU's QCOW_MAX_REFTABLE_SIZE. */
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
/** QEMU's QCOW_MAX_SNAPSHOTS. */
export const MAX_SNAPSHOTS = 65536;
/** QEMU refuses longer backing file names. */
export const MAX_BACKING_NAME = 1023;
/** Host offsets must stay below 2^56 (L2 entry bits 9–55). */
export const MAX_HOST_OFFSET = 2 ** 56;

/** Byte offset of cluster_bits (u32), read first to know how much header to read. */
export const CLUSTER_BITS_OFFSET = 20;
/** Byte offset of incompatible_features (u64, v3), where a corrupt or dirty image is flagged. */
export const INCOMPAT_FEATURES_OFFSET = 72;

// Incompatible feature bits (offset 72).
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
// Compatible feature bits (offset 80).
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
// Autoclear feature bits (offset 88).
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

// Header extension types.
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

export interface Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  /** Virtual disk size in bytes, as stored. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  /** v2: 72. v3: ≥ 104, a multiple of 8. */
  headerLength: number;
  /** 0 deflate, 1 zstd; only present on disk when headerLength > 104. */
  compressionType: number;
  /** Additional header bytes past the ones qdedup knows (offset 112 … headerLength), kept verbatim. */
  extraHeaderBytes: Buffer;
  /** Every extension except the end marker, in file order, kept verbatim. */
  extensions: HeaderExtension[];
  backingFile?: string;
}

export function clusterSizeOf(h: Header): number {
  return 2 ** h.clusterBits;
}

/** Entries per L2 table for standard (64-bit) entries. */
export function l2EntriesOf(h: Header): number {
  return 2 ** (h.clusterBits - 3);
}

/** L1 entries needed to map `size` bytes. */
export function l1SizeFor(size: number, clusterBits: number): number {
  return divCeil(size, 2 ** (clusterBits + clusterBits - 3));
}

export function backingFormatOf(h: Header): string | undefined {
  const ext = h.extensions.find((e) => e.type === EXT_BACKING_FORMAT);
  return ext ? ext.data.toString('latin1') : undefined;
}

/**
 * Decodes and validates the header in `buf` (at least the first cluster of the file, or
 * the whole file if shorter).
 * Throws NotQcow2Error (bad magic), CorruptImageError (malformed) or UnsupportedError
 * (a valid feature qdedup does not implement). Returns the decoded header.
 */
export function decodeHeader(buf: Buffer): Header {
  const where = (offset: number) => ({ offset, structure: 'header' });
  if (buf.length < V2_HEADER_LENGTH || buf.readUInt32BE(0) !== QCOW_MAGIC) {
    if (buf.length >= 4 && buf.readUInt32BE(0) === QCOW_MAGIC) throw new CorruptImageError('header truncated: file shorter than 72 bytes', where(0));
    throw new NotQcow2Error('image is not in qcow2 format (bad magic)', where(0));
  }
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new UnsupportedError(`unsupported qcow2 version ${version}`, where(4));
  const clusterBits = buf.readUInt32BE(CLUSTER_BITS_OFFSET);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new CorruptImageError(`unsupported cluster size: 2^${clusterBits} (cluster_bits must be 9 to 21)`, where(CLUSTER_BITS_OFFSET));
  }
  const clusterSize = 2 ** clusterBits;

  let headerLength = V2_HEADER_LENGTH;
  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = V2_REFCOUNT_ORDER;
  let compressionType = 0;
  let extraHeaderBytes = Buffer.alloc(0);
  if (version === 3) {
    if (buf.length < V3_MIN_HEADER_LENGTH) throw new CorruptImageError('qcow2 header too short (file ends inside the v3 header)', where(0));
    headerLength = buf.readUInt32BE(100);
    if (headerLength < V3_MIN_HEADER_LENGTH) throw new CorruptImageError(`qcow2 header too short: header_length ${headerLength} < 104`, where(100));
    if (headerLength % 8 !== 0) throw new CorruptImageError(`header_length ${headerLength} is not a multiple of 8`, where(100));
    if (headerLength > clusterSize || headerLength > buf.length)
      throw new CorruptImageError(`header_length ${headerLength} runs past the first cluster or the file`, where(100));
    incompatibleFeatures = buf.readBigUInt64BE(INCOMPAT_FEATURES_OFFSET);
    compatibleFeatures = buf.readBigUInt64BE(80);
    autoclearFeatures = buf.readBigUInt64BE(88);
    refcountOrder = buf.readUInt32BE(96);
    if (refcountOrder > MAX_REFCOUNT_ORDER)
      throw new CorruptImageError(`reference count entry width too large: refcount_order ${refcountOrder} (at most 6)`, where(96));
    if (headerLength > 104) compressionType = buf[104];
    if (headerLength > V3_HEADER_LENGTH) extraHeaderBytes = Buffer.from(buf.subarray(V3_HEADER_LENGTH, headerLength));
  }

  const h: Header = {
    version,
    backingFileOffset: readU64(buf, 8, 'backing file offset'),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits,
    size: readU64(buf, 24, 'virtual size'),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: readU64(buf, 40, 'L1 table offset'),
    refcountTableOffset: readU64(buf, 48, 'refcount table offset'),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: readU64(buf, 64, 'snapshot table offset'),
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    extraHeaderBytes,
    extensions: [],
  };

  // Like QEMU, the extension area ends where the backing file name starts (when it lies in
  // cluster 0), so an extension can never run over the name.
  const nameInCluster = h.backingFileOffset > headerLength && h.backingFileOffset < clusterSize;
  h.extensions = decodeExtensions(
    buf,
    headerLength,
    nameInCluster ? h.backingFileOffset : clusterSize,
    nameInCluster ? 'the backing file name' : 'the first cluster',
  );
  checkFeatures(h);

  if (h.cryptMethod !== 0) {
    if (h.cryptMethod > 2) throw new CorruptImageError(`unsupported encryption method ${h.cryptMethod}`, where(32));
    throw new UnsupportedError(`encrypted images are not supported (crypt_method ${h.cryptMethod}: ${h.cryptMethod === 1 ? 'AES' : 'LUKS'})`, where(32));
  }

  // Refcount table.
  if (h.refcountTableClusters === 0) throw new CorruptImageError('image does not contain a reference count table', where(56));
  if (h.refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw new CorruptImageError(`reference count table too large: ${h.refcountTableClusters} clusters (limit ${MAX_REFTABLE_BYTES} bytes)`, where(56));
  }
  checkTableOffset(h.refcountTableOffset, 1, clusterSize, 'refcount table', 48);

  // L1 table.
  if (h.l1Size * 8 > MAX_L1_BYTES) throw new CorruptImageError(`active L1 table too large: ${h.l1Size} entries (limit ${MAX_L1_BYTES / 8})`, where(36));
  if (h.l1Size < l1SizeFor(h.size, clusterBits))
    throw new CorruptImageError(`L1 table is too small: ${h.l1Size} entries for a virtual size of ${h.size}`, where(36));
  checkTableOffset(h.l1TableOffset, h.l1Size, clusterSize, 'active L1 table', 40);

  // Snapshot table.
  if (h.nbSnapshots > MAX_SNAPSHOTS) throw new CorruptImageError(`too many snapshots: ${h.nbSnapshots}`, where(60));
  checkTableOffset(h.snapshotsOffset, h.nbSnapshots, clusterSize, 'snapshot table', 64);

  // Backing file name: in cluster 0, after the extensions.
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > MAX_BACKING_NAME || h.backingFileSize === 0) {
      throw new CorruptImageError(`backing file name length ${h.backingFileSize} is invalid (1 to ${MAX_BACKING_NAME})`, where(16));
    }
    const end = h.backingFileOffset + h.backingFileSize;
    if (end > clusterSize || end > buf.length || h.backingFileOffset < headerLength) {
      throw new CorruptImageError(`backing file name at ${hex(h.backingFileOffset)} (+${h.backingFileSize}) lies outside the header cluster`, where(8));
    }
    h.backingFile = buf.subarray(h.backingFileOffset, end).toString('utf8');
  }
  return h;
}

/**
 * A table's offset must be cluster aligned even when the table is empty (QEMU's
 * qcow2_validate_table refuses the image otherwise), and may be 0 only when it is.
 */
function checkTableOffset(offset: number, entries: number, clusterSize: number, what: string, fieldPos: number): void {
  if (offset % clusterSize !== 0)
    throw new CorruptImageError(`${what} offset ${hex(offset)} is not cluster aligned`, { offset: fieldPos, structure: 'header' });
  if (offset === 0 && entries > 0) throw new CorruptImageError(`${what} offset is 0 (overlaps the header)`, { offset: fieldPos, structure: 'header' });
}

/**
 * Parses the extensions from `headerLength` up to `end` (the cluster size, or the backing
 * file name's offset), `endWhat` naming that bound in messages. Throws CorruptImageError.
 */
function decodeExtensions(buf: Buffer, headerLength: number, end: number, endWhat: string): HeaderExtension[] {
  const extensions: HeaderExtension[] = [];
  // A Set, not a scan of `extensions`: a 2 MiB header cluster holds 262,000 empty
  // extensions, and a quadratic duplicate check would hang on it (I4: bounded time).
  const seen = new Set<number>();
  const limit = Math.min(end, buf.length);
  // A file cut short inside cluster 0 is named as such rather than as a missing end marker.
  const bound = buf.length < end ? `the end of the file (byte ${buf.length})` : endWhat;
  let pos = headerLength;
  for (;;) {
    if (pos + 8 > limit)
      throw new CorruptImageError(`header extension at ${hex(pos)} runs past ${bound} (no end marker)`, { offset: pos, structure: 'header extension' });
    const type = buf.readUInt32BE(pos);
    const length = buf.readUInt32BE(pos + 4);
    if (type === EXT_END) return extensions;
    if (length > limit - pos - 8)
      throw new CorruptImageError(`header extension ${hex(type)} at ${hex(pos)} too large: length ${length} runs past ${bound}`, {
        offset: pos + 4,
        structure: 'header extension',
      });
    if (seen.has(type)) throw new CorruptImageError(`header extension ${hex(type)} appears twice`, { offset: pos, structure: 'header extension' });
    seen.add(type);
    extensions.push({ type, data: Buffer.from(buf.subarray(pos + 8, pos + 8 + length)) });
    pos += 8 + divCeil(length, 8) * 8;
  }
}

function checkFeatures(h: Header): void {
  const where = { offset: INCOMPAT_FEATURES_OFFSET, structure: 'header' };
  const known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
  const unknown = h.incompatibleFeatures & ~known;
  if (unknown !== 0n) {
    // Worded as QEMU's report_unsupported_feature(): feature-table names in table order
    // (the first entry naming a bit wins; the table ends at an entry with an empty name),
    // then the hex mask of the bits no entry named.
    const parts: string[] = [];
    let rest = unknown;
    const table = h.extensions.find((e) => e.type === EXT_FEATURE_TABLE)?.data ?? Buffer.alloc(0);
    for (let pos = 0; pos + 48 <= table.length && table[pos + 2] !== 0; pos += 48) {
      const bit = 1n << BigInt(table[pos + 1]);
      if (table[pos] !== 0 || (rest & bit) === 0n) continue;
      const raw = table.subarray(pos + 2, pos + 48);
      const end = raw.indexOf(0);
      parts.push(raw.subarray(0, end < 0 ? raw.length : end).toString('latin1'));
      rest &= ~bit;
    }
    if (rest !== 0n) parts.push(`Unknown incompatible feature: ${rest.toString(16)}`);
    throw new UnsupportedError(`unsupported qcow2 feature(s): ${parts.join(', ')}`, where);
  }
  if (h.incompatibleFeatures & INCOMPAT_DATA_FILE) throw new UnsupportedError('external data files are not supported (incompatible feature bit 2)', where);
  if (h.incompatibleFeatures & INCOMPAT_EXTL2) throw new UnsupportedError('extended L2 entries are not supported (incompatible feature bit 4)', where);
  const compressionBit = (h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
  if (compressionBit && h.compressionType === 0)
    throw new CorruptImageError('compression type incompatible feature bit must not be set with compression type 0 (deflate)', where);
  if (!compressionBit && h.compressionType !== 0)
    throw new CorruptImageError(`compression type ${h.compressionType} requires incompatible feature bit 3`, { offset: 104, structure: 'header' });
  if (h.compressionType === 1)
    throw new UnsupportedError('zstd compressed clusters are not supported (compression type 1)', { offset: 104, structure: 'header' });
  if (h.compressionType > 1) throw new CorruptImageError(`unknown compression type ${h.compressionType}`, { offset: 104, structure: 'header' });
  if (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW)
    throw new UnsupportedError('raw external data file (autoclear bit 1) requires an external data file, which is not supported', {
      offset: 88,
      structure: 'header',
    });
}

/**
 * Encodes the header, its extensions, the end marker and the backing file name into a
 * new buffer (not padded to a cluster). Recomputes backingFileOffset/Size from
 * `h.backingFile`. Throws CorruptImageError if the result does not fit in one cluster.
 */
export function encodeHeader(h: Header): Buffer {
  const clusterSize = clusterSizeOf(h);
  const headerLength = h.version === 2 ? V2_HEADER_LENGTH : h.headerLength;
  let extBytes = 0;
  for (const e of h.extensions) extBytes += 8 + divCeil(e.data.length, 8) * 8;
  const name = h.backingFile !== undefined ? Buffer.from(h.backingFile, 'utf8') : Buffer.alloc(0);
  const nameOffset = headerLength + extBytes + 8;
  const total = nameOffset + name.length;
  if (total > clusterSize)
    throw new CorruptImageError(`header, extensions and backing file name (${total} bytes) do not fit in one ${clusterSize}-byte cluster`, {
      structure: 'header',
    });
  const buf = Buffer.alloc(total);
  buf.writeUInt32BE(QCOW_MAGIC, 0);
  buf.writeUInt32BE(h.version, 4);
  writeU64(buf, 8, name.length ? nameOffset : 0);
  buf.writeUInt32BE(name.length, 16);
  buf.writeUInt32BE(h.clusterBits, 20);
  writeU64(buf, 24, h.size);
  buf.writeUInt32BE(h.cryptMethod, 32);
  buf.writeUInt32BE(h.l1Size, 36);
  writeU64(buf, 40, h.l1TableOffset);
  writeU64(buf, 48, h.refcountTableOffset);
  buf.writeUInt32BE(h.refcountTableClusters, 56);
  buf.writeUInt32BE(h.nbSnapshots, 60);
  writeU64(buf, 64, h.snapshotsOffset);
  if (h.version === 3) {
    buf.writeBigUInt64BE(h.incompatibleFeatures, INCOMPAT_FEATURES_OFFSET);
    buf.writeBigUInt64BE(h.compatibleFeatures, 80);
    buf.writeBigUInt64BE(h.autoclearFeatures, 88);
    buf.writeUInt32BE(h.refcountOrder, 96);
    buf.writeUInt32BE(headerLength, 100);
    if (headerLength > 104) buf[104] = h.compressionType;
    h.extraHeaderBytes.copy(buf, V3_HEADER_LENGTH);
  }
  let pos = headerLength;
  for (const e of h.extensions) {
    buf.writeUInt32BE(e.type, pos);
    buf.writeUInt32BE(e.data.length, pos + 4);
    e.data.copy(buf, pos + 8);
    pos += 8 + divCeil(e.data.length, 8) * 8;
  }
  // End marker: 8 zero bytes, already zero.
  name.copy(buf, nameOffset);
  return buf;
}
