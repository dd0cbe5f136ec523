// `qdedup info`'s output: qemu-img info's JSON document (ImageInfo, keys in qemu-img's
// order) built from the facts src/dedup/image-info.ts reads, and its human text. A dedup
// image adds a `dedup` object to the qcow2 format-specific data (as qemu-img nests
// `bitmaps` or `encrypt` there): its settings and whether the store is trusted.

import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, V2_REFCOUNT_ORDER } from '../format/header.ts';
import { readImageFacts } from '../dedup/image-info.ts';
import type { StoreVerdict } from '../dedup/judge-store.ts';
import type { LockRequest } from '../image/image-lock.ts';
import { humanSize } from './parse.ts';
import { snapshotInfo, snapshotListLines, type SnapshotInfo } from './snapshot-list.ts';

/**
 * The JSON document of `info --output json` (qemu-img's ImageInfo keys). imageInfo() builds
 * it with its keys in the order qemu-img 7.2 prints them (this order).
 */
export interface ImageInfo {
  'backing-filename-format'?: string;
  /** Internal snapshots, in table order; absent when there are none (as in qemu-img). */
  snapshots?: SnapshotInfo[];
  'virtual-size': number;
  filename: string;
  'cluster-size': number;
  format: 'qcow2';
  'actual-size': number;
  'format-specific': { type: 'qcow2'; data: Record<string, unknown> };
  'full-backing-filename'?: string;
  'backing-filename'?: string;
  'dirty-flag': boolean;
}

/** `format-specific.data.dedup` of a dedup image. */
export interface DedupInfo {
  /** sha256, sha3-256, blake3 or skein; "unknown" when the extension does not decode. */
  algorithm: string;
  verify?: boolean;
  trusted: boolean;
  /** Why the store is not trusted (only then). */
  reason?: string;
  dirty?: boolean;
  order?: number;
  'journal-block-size'?: number;
  'max-incarnations'?: number;
  /** Present (true) when new unique clusters are written compressed by default (`create -o compression=on`). */
  compression?: boolean;
}

/** The `dedup` object of a dedup image (its settings unless the extension does not decode). */
function dedupInfo(v: StoreVerdict): DedupInfo {
  const e = v.ext;
  if (!e) return { algorithm: v.algorithm, trusted: false, reason: v.reason! };
  return {
    algorithm: v.algorithm,
    verify: e.verify,
    trusted: v.trusted,
    ...(v.trusted ? {} : { reason: v.reason! }),
    dirty: e.dirty,
    order: e.order,
    'journal-block-size': e.journalBlockSize,
    'max-incarnations': e.maxIncarnations,
    ...(e.compress ? { compression: true } : {}),
  };
}

/** `lock`: QEMU's image locks to take while reading (the CLI: qemu-img info's, LOCK_INFO). */
export async function imageInfo(path: string, lock?: LockRequest): Promise<ImageInfo> {
  const f = await readImageFacts(path, lock);
  const h = f.header;
  const data: Record<string, unknown> =
    h.version === 3
      ? {
          compat: '1.1',
          'compression-type': 'zlib',
          'lazy-refcounts': (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n,
          'refcount-bits': 2 ** h.refcountOrder,
          corrupt: (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n,
          'extended-l2': false,
        }
      : { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 2 ** V2_REFCOUNT_ORDER };
  if (f.dedup) data.dedup = dedupInfo(f.dedup);
  const snapshots = f.snapshots.map(snapshotInfo);
  const backing = f.backing;
  // Keys in qemu-img's order (its QDict's), absent ones left out.
  return {
    ...(backing?.format ? { 'backing-filename-format': backing.format } : {}),
    ...(snapshots.length ? { snapshots } : {}),
    'virtual-size': h.size,
    filename: path,
    'cluster-size': f.clusterSize,
    format: 'qcow2',
    'actual-size': f.actualSize,
    'format-specific': { type: 'qcow2', data },
    ...(backing ? { 'full-backing-filename': backing.full, 'backing-filename': backing.name } : {}),
    'dirty-flag': (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
  };
}

/**
 * The human output of `info` (QEMU block/qapi.c bdrv_image_info_dump): the summary, the
 * backing file, the snapshot list, then the format-specific block. `date` formats snapshot
 * dates (local time by default).
 */
export function infoText(info: ImageInfo, date?: (sec: number) => string): string {
  const d = info['format-specific'].data;
  const lines = [
    `image: ${info.filename}`,
    'file format: qcow2',
    `virtual size: ${humanSize(info['virtual-size'])} (${info['virtual-size']} bytes)`,
    `disk size: ${humanSize(info['actual-size'])}`,
    `cluster_size: ${info['cluster-size']}`,
  ];
  if (info['dirty-flag']) lines.push('cleanly shut down: no');
  if (info['backing-filename'] !== undefined) {
    const full = info['full-backing-filename'];
    lines.push(`backing file: ${info['backing-filename']}` + (full !== info['backing-filename'] ? ` (actual path: ${full})` : ''));
    if (info['backing-filename-format']) lines.push(`backing file format: ${info['backing-filename-format']}`);
  }
  lines.push(...snapshotListLines(info.snapshots ?? [], date));
  lines.push('Format specific information:');
  lines.push(`    compat: ${d.compat}`);
  lines.push(`    compression type: ${d['compression-type']}`);
  if ('lazy-refcounts' in d) lines.push(`    lazy refcounts: ${d['lazy-refcounts']}`);
  lines.push(`    refcount bits: ${d['refcount-bits']}`);
  if ('corrupt' in d) lines.push(`    corrupt: ${d.corrupt}`);
  if ('extended-l2' in d) lines.push(`    extended l2: ${d['extended-l2']}`);
  const dd = d.dedup as DedupInfo | undefined;
  if (dd) {
    lines.push('    dedup:');
    lines.push(`        algorithm: ${dd.algorithm}`);
    if (dd.verify !== undefined) lines.push(`        verify: ${dd.verify}`);
    lines.push(`        trusted: ${dd.trusted}`);
    if (dd.reason !== undefined) lines.push(`        reason: ${dd.reason}`);
    if (dd.dirty !== undefined) lines.push(`        dirty: ${dd.dirty}`);
    if (dd.order !== undefined) lines.push(`        order: ${dd.order}`);
    if (dd['journal-block-size'] !== undefined) lines.push(`        journal block size: ${dd['journal-block-size']}`);
    if (dd['max-incarnations'] !== undefined) lines.push(`        max incarnations: ${dd['max-incarnations']}`);
    if (dd.compression) lines.push('        compression: on');
  }
  return lines.join('\n') + '\n';
}
