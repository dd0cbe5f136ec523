// Framed deflate streams: in a dedup image, each compressed copy qdedup writes is preceded by
// an 8-byte header, so that the streams touching a host cluster can be found from the
// cluster alone (the index entries of every one of them must be deleted before the cluster
// is freed: I2). The header lies outside every stream, so QEMU, which reads a compressed
// cluster by its L2 descriptor, never inflates it. Pure. Layout: docs/FORMAT.md "Framed
// streams".
//
//   0–3  magic 0x51445a53 ("QDZS"), big-endian
//   4–7  u32 length of the stream that follows, in bytes (0 < length < cluster size)
//
// A header starts at a multiple of 8 bytes, in the same host cluster as its stream's first
// byte; a stream therefore never starts on a cluster boundary (which is how a hash entry
// tells a stream from a whole cluster: src/format/hash-entry.ts).

export const STREAM_MAGIC = 0x51445a53;
export const STREAM_HEADER_BYTES = 8;
/** Headers start at multiples of this. */
export const STREAM_ALIGN = 8;

export function encodeStreamHeader(buf: Buffer, pos: number, length: number): void {
  buf.writeUInt32BE(STREAM_MAGIC, pos);
  buf.writeUInt32BE(length, pos + 4);
}

/** A framed stream: `offset` of its first byte (in the file, or in whatever `buf` is relative to), `length` bytes. */
export interface FramedStream {
  offset: number;
  length: number;
}

/**
 * The framed streams whose headers lie in `buf` (bytes of the file from offset `base`, a
 * multiple of STREAM_ALIGN) and whose bytes touch host cluster `cluster`. A header-like
 * pattern inside other bytes may be reported too: callers only act on a stream whose
 * inflated content the index names at exactly that offset.
 */
export function framedStreamsTouching(buf: Buffer, base: number, clusterSize: number, cluster: number): FramedStream[] {
  const out: FramedStream[] = [];
  const lo = cluster * clusterSize;
  const hi = lo + clusterSize;
  for (let p = 0; p + STREAM_HEADER_BYTES <= buf.length; p += STREAM_ALIGN) {
    if (buf.readUInt32BE(p) !== STREAM_MAGIC) continue;
    const length = buf.readUInt32BE(p + 4);
    const offset = base + p + STREAM_HEADER_BYTES;
    if (length === 0 || length >= clusterSize || offset % clusterSize === 0) continue;
    if (offset < hi && offset + length > lo) out.push({ offset, length });
  }
  return out;
}
