// Creates a new, empty QCOW2 image: header, refcount table, refcount blocks and an empty
// L1 table, laid out from cluster 0 as qemu-img does (64 KiB: header, reftable at 0x10000,
// refblock at 0x20000, L1 at 0x30000). A dedup image is this plus its dedup structures,
// added by the layer above (src/dedup/open.ts createImage). Spec: docs/interop/qcow2.rst.

import { open, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { UsageError } from '../errors.ts';
import {
  COMPAT_LAZY_REFCOUNTS,
  EXT_BACKING_FORMAT,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  V2_HEADER_LENGTH,
  V2_REFCOUNT_ORDER,
  V3_HEADER_LENGTH,
  encodeHeader,
  l1SizeFor,
  type Header,
} from '../format/header.ts';
import { refblockEntries, setRefcount } from '../format/refcount.ts';
import { writeU64 } from '../format/bytes.ts';
import { NodeFile, ioError } from './block-file.ts';
import { LOCK_CREATE } from './image-lock.ts';

/** qemu-img's default cluster size for qcow2: 64 KiB. */
export const DEFAULT_CLUSTER_BITS = 16;
/** qemu-img's default refcount width for qcow2 v3: 16 bits (v2's only width). */
export const DEFAULT_REFCOUNT_ORDER = V2_REFCOUNT_ORDER;

export interface CreateOptions {
  /** Virtual size in bytes, rounded up to a multiple of 512 as qemu-img does. */
  size: number;
  clusterBits: number;
  version: 2 | 3;
  refcountOrder: number;
  lazyRefcounts: boolean;
  backingFile?: string;
  backingFormat?: string;
  /** Replace an existing file. */
  force: boolean;
}

/** Computes the new image's header and layout. Pure; throws UsageError on impossible sizes. */
export function planImage(o: CreateOptions): {
  header: Header;
  clusters: number;
  fileLength: number;
  l1Clusters: number;
  reftableClusters: number;
  refblocks: number;
} {
  const clusterSize = 2 ** o.clusterBits;
  const size = Math.ceil(o.size / 512) * 512;
  const l1Size = l1SizeFor(size, o.clusterBits);
  if (l1Size * 8 > MAX_L1_BYTES) throw new UsageError(`the image size is too large for file format 'qcow2' (try using a larger cluster size)`);
  const l1Clusters = Math.ceil((l1Size * 8) / clusterSize);
  const perBlock = refblockEntries(o.clusterBits, o.refcountOrder);
  let refblocks = 1;
  let reftableClusters = 1;
  for (;;) {
    const total = 1 + reftableClusters + refblocks + l1Clusters;
    const needBlocks = Math.ceil(total / perBlock);
    const needTable = Math.ceil((needBlocks * 8) / clusterSize);
    if (needBlocks === refblocks && needTable === reftableClusters) break;
    refblocks = Math.max(refblocks, needBlocks);
    reftableClusters = Math.max(reftableClusters, needTable);
  }
  if (reftableClusters * clusterSize > MAX_REFTABLE_BYTES) throw new UsageError('the image size is too large for this cluster size and refcount width');
  const clusters = 1 + reftableClusters + refblocks + l1Clusters;
  const l1Offset = l1Size ? (1 + reftableClusters + refblocks) * clusterSize : 0;
  const header: Header = {
    version: o.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: o.clusterBits,
    size,
    cryptMethod: 0,
    l1Size,
    l1TableOffset: l1Offset,
    refcountTableOffset: clusterSize,
    refcountTableClusters: reftableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: o.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: 0n,
    refcountOrder: o.refcountOrder,
    headerLength: o.version === 3 ? V3_HEADER_LENGTH : V2_HEADER_LENGTH,
    compressionType: 0,
    extraHeaderBytes: Buffer.alloc(0),
    extensions: o.backingFormat ? [{ type: EXT_BACKING_FORMAT, data: Buffer.from(o.backingFormat, 'latin1') }] : [],
    backingFile: o.backingFile,
  };
  const fileLength = l1Size ? l1Offset + l1Size * 8 : clusters * clusterSize;
  return { header, clusters, fileLength, l1Clusters, reftableClusters, refblocks };
}

/**
 * Writes a new image to `path` and syncs it. Refuses an existing file unless `force`, and
 * an existing file another process holds (QEMU's image locks, as `qemu-img create` takes
 * them) before changing a byte of it.
 */
export async function createImage(path: string, o: CreateOptions): Promise<Header> {
  const plan = planImage(o);
  const clusterSize = 2 ** o.clusterBits;
  const headerBytes = encodeHeader(plan.header);
  const perBlock = refblockEntries(o.clusterBits, o.refcountOrder);
  const reftable = Buffer.alloc(plan.reftableClusters * clusterSize);
  const refblocks = Buffer.alloc(plan.refblocks * clusterSize);
  const firstBlock = 1 + plan.reftableClusters;
  for (let b = 0; b < plan.refblocks; b++) writeU64(reftable, b * 8, (firstBlock + b) * clusterSize);
  for (let c = 0; c < plan.clusters; c++) {
    const b = Math.floor(c / perBlock);
    setRefcount(refblocks.subarray(b * clusterSize, (b + 1) * clusterSize), c % perBlock, o.refcountOrder, 1);
  }
  const header = Buffer.alloc(clusterSize);
  headerBytes.copy(header);
  const file = await NodeFile.create(path, !o.force, LOCK_CREATE);
  try {
    await file.truncate(0); // only now: the lock is held (NodeFile.create does not truncate)
    await file.write(0, Buffer.concat([header, reftable, refblocks]));
    await file.truncate(plan.fileLength);
    await file.sync();
  } finally {
    await file.close();
  }
  await syncDirectory(path); // I3: the new name is durable too, before create exits 0
  return plan.header;
}

/**
 * fsyncs the directory holding `path`, so that a file just created there survives a crash
 * under its name (a file's own fsync does not cover its directory entry). A file system
 * that cannot sync a directory (EINVAL, ENOTSUP) is passed over. Throws IoError.
 */
export async function syncDirectory(path: string): Promise<void> {
  const dir = dirname(path);
  let fh: FileHandle | undefined;
  try {
    fh = await open(dir, 'r');
    await fh.sync();
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'EINVAL' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP') throw ioError(err, dir, 'cannot sync the directory');
  } finally {
    await fh?.close();
  }
}
