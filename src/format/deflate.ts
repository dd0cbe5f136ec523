// Compressed clusters: one guest cluster as one raw deflate stream, exactly what QEMU reads
// (block/qcow2-threads.c: inflateInit2 with -12 window bits) and `qemu-img convert -c`
// writes. Pure: bytes in, bytes out. Layout of the L2 descriptor: ./l1l2.ts; docs/FORMAT.md
// "Compressed clusters".

import { createRequire } from 'node:module';

/** node:zlib, loaded at the first compression or inflation: most runs have none, and it costs every start ~3 ms (docs/PERFORMANCE.md). */
let zlib: typeof import('node:zlib') | undefined;
const loadZlib = () => (zlib ??= createRequire(import.meta.url)('node:zlib') as typeof import('node:zlib'));

/** Deflate window of every compressed cluster: 2^12 = 4 KiB, the window QEMU inflates with, whatever the cluster size. */
export const DEFLATE_WINDOW_BITS = 12;
/** zlib's memLevel QEMU compresses with. */
export const DEFLATE_MEM_LEVEL = 9;
/** zlib level qdedup compresses with: QEMU's (Z_DEFAULT_COMPRESSION). */
export const DEFLATE_LEVEL = 6;

/**
 * `data` (one whole cluster) as a raw deflate stream, or null when that would not be
 * smaller than the cluster: such a cluster is stored plain, as QEMU stores it.
 */
export function compressCluster(data: Buffer, level = DEFLATE_LEVEL): Buffer | null {
  const out = loadZlib().deflateRawSync(data, { level, windowBits: DEFLATE_WINDOW_BITS, memLevel: DEFLATE_MEM_LEVEL }); // zlib's default strategy, as QEMU
  return out.length < data.length ? out : null;
}

/**
 * Inflates a compressed cluster's stream to at most `clusterSize` bytes. `stream` may run on
 * past the stream's end (a descriptor's last sector): what follows it is ignored. Throws
 * zlib's error for bytes that are not a deflate stream.
 */
export function inflateCluster(stream: Buffer, clusterSize: number): Buffer {
  return loadZlib().inflateRawSync(stream, { finishFlush: 2 /* Z_SYNC_FLUSH: the stream may end mid-sector */, maxOutputLength: clusterSize });
}
