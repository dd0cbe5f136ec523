// Where the compressed clusters of one write batch go in the file: packed byte-tight into one
// run of new host clusters, a stream crossing from one cluster into the next as QEMU's
// qcow2_alloc_bytes lets it (`qemu-img convert -c` packs the same way). Pure arithmetic.
//
// Every host cluster a stream touches counts one reference for it (QCOW2's rule for
// compressed clusters), so a cluster holding k streams has refcount k: a stream that would
// push a cluster past the refcount width's maximum starts at the next cluster instead. A run
// is never continued by a later batch: no byte of a cluster that durable L2 entries already
// name is ever written again.

import { InternalError } from '../errors.ts';
import { STREAM_ALIGN, STREAM_HEADER_BYTES } from '../format/stream-header.ts';

export interface PackedRun {
  /** Byte offset of each stream from the start of the run, in the order given. */
  offsets: number[];
  /** Framed runs: byte offset of each stream's header (../format/stream-header.ts) from the start of the run. */
  headers: number[];
  /** Host clusters the run takes. */
  clusters: number;
  /** Streams touching each cluster of the run: its refcount. */
  touches: number[];
}

/**
 * Lays out streams of `lengths` bytes (each shorter than a cluster) in order from the start
 * of a run of `clusterSize` clusters, no cluster touched by more than `maxTouches` streams.
 * `framed` (dedup images): each stream follows its 8-byte header, at a multiple of 8 in the
 * same cluster as the stream's first byte, so no stream starts on a cluster boundary.
 */
export function packStreams(lengths: number[], clusterSize: number, maxTouches: number, framed = false): PackedRun {
  if (maxTouches < 1) throw new InternalError('packStreams: a cluster must hold at least one stream');
  const offsets: number[] = [];
  const headers: number[] = [];
  const touches: number[] = [];
  const frame = framed ? STREAM_HEADER_BYTES : 0;
  /** Where a stream whose header (if any) goes at or after `pos` starts. */
  const startAt = (pos: number) => {
    if (!framed) return pos;
    let h = Math.ceil(pos / STREAM_ALIGN) * STREAM_ALIGN;
    if ((h + frame) % clusterSize === 0) h += STREAM_ALIGN; // header and stream in one cluster
    return h + frame;
  };
  let pos = 0;
  for (const len of lengths) {
    if (len <= 0 || len >= clusterSize) throw new InternalError(`packStreams: stream of ${len} bytes in ${clusterSize}-byte clusters`);
    let start = startAt(pos);
    let first = Math.floor(start / clusterSize);
    // A cluster at its maximum takes no more: start at the next one.
    if ((touches[first] ?? 0) >= maxTouches) {
      first++;
      start = startAt(first * clusterSize);
    }
    const last = Math.floor((start + len - 1) / clusterSize);
    for (let c = first; c <= last; c++) touches[c] = (touches[c] ?? 0) + 1;
    offsets.push(start);
    if (framed) headers.push(start - frame);
    pos = start + len;
  }
  return { offsets, headers, clusters: touches.length, touches };
}
