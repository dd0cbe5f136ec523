// The write pipeline of a long write (an import): the input is read in chunks into a ring of
// buffers in shared memory, and while chunk N is written (decided, linked, written out by
// Image.write and its policy), the next AHEAD chunks are read and prepared — with inline
// dedup, hashed in place by a worker thread (src/dedup/chunk-hasher.ts). Both cores stay
// busy; no byte of input is copied between reading and writing. Every writer of a stream goes
// through here (`write -i`, `convert`). docs/DESIGN.md "Write pipeline".

import type { Image } from './image.ts';
import type { PreparedChunk } from './write-policy.ts';

/** Bytes of input per chunk. */
export const CHUNK_BYTES = 8 * 1024 * 1024;
/** Chunks read and prepared ahead of the one being written (the worker hashes that far ahead). */
const AHEAD = 2;
/** Buffers of the ring: the chunk being written, AHEAD being read and prepared, one whose writes behind may still run. */
const RING_BUFFERS = AHEAD + 2;

/** Where chunks come from: fills `buf[0…want)` as far as the input goes; returns the bytes read (fewer only at its end). */
export interface ChunkSource {
  fill(buf: Buffer, want: number): Promise<number>;
}

/**
 * Successive chunks of a source (CHUNK_BYTES; tests make them small), in a ring of
 * RING_BUFFERS shared-memory buffers used in turn: a chunk stays valid until RING_BUFFERS − 1
 * more have been asked for. Reads at most `limit` bytes in all.
 */
export class ChunkReader {
  private readonly buffers: Buffer[] = [];
  private index = 0;
  private pos = 0;

  constructor(
    private readonly source: ChunkSource,
    private readonly limit: number,
    chunkBytes = CHUNK_BYTES,
  ) {
    const size = Math.max(1, Math.min(limit, chunkBytes));
    for (let i = 0; i < RING_BUFFERS; i++) this.buffers.push(Buffer.from(new SharedArrayBuffer(size)));
  }

  /** The next chunk; empty at the end of the input or of the limit. */
  async next(): Promise<Buffer> {
    const buf = this.buffers[this.index++ % RING_BUFFERS];
    const want = Math.min(buf.length, this.limit - this.pos);
    if (want <= 0) return buf.subarray(0, 0);
    const got = await this.source.fill(buf, want);
    this.pos += got;
    return buf.subarray(0, got);
  }
}

export interface PipelineOptions {
  /** Bytes that fit on the disk from the guest offset: what is past them is not written. */
  room: number;
  /** Stops after the chunk in flight (a signal); a silent producer is not waited for. */
  signal?: AbortSignal;
  /** Called with the bytes written so far after each chunk. */
  progress?: (written: number) => void;
}

export interface PipelineResult {
  /** Bytes written from guestOffset. */
  written: number;
  /** True when the input went past `room` (what fitted was written). */
  overflow: boolean;
}

/**
 * Writes `first` (already read from `reader`) and then every further chunk of `reader` at
 * `guestOffset`, until the input ends, the room is full or `signal` aborts. Metadata is
 * committed by the image's flush()/close(), as for any write.
 */
export async function writeChunks(image: Image, guestOffset: number, reader: ChunkReader, first: Buffer, o: PipelineOptions): Promise<PipelineResult> {
  const aborted = o.signal ? whenAborted(o.signal) : new Promise<never>(() => {});
  type Ready = { chunk: Buffer; at: number; prepared: Promise<PreparedChunk> | null };
  const ready = (chunk: Buffer, at: number): Ready => {
    const prepared = chunk.length ? image.prepare(chunk, at) : null;
    prepared?.catch(() => {}); // a failure surfaces at its await below
    return { chunk, at, prepared };
  };
  // Per chunk written: resolves when its writes behind have ended, so its buffer may be refilled.
  const settled: Promise<void>[] = [];
  // Chunks read (one after another: the source is a stream) and prepared ahead, in order.
  const queue: Promise<Ready>[] = [];
  let tail: Promise<Ready> = Promise.resolve(ready(first, guestOffset));
  let requested = 0; // chunks asked of the reader after `first`
  let stop = false;
  const readAhead = () => {
    const k = ++requested; // chunk k goes into the buffer chunk k − RING_BUFFERS had
    tail = tail.then(async (prev) => {
      if (stop || prev.chunk.length === 0) return { chunk: prev.chunk.subarray(0, 0), at: prev.at, prepared: null };
      await settled[k - RING_BUFFERS];
      return ready(await reader.next(), prev.at + prev.chunk.length);
    });
    tail.catch(() => {});
    queue.push(tail);
  };
  let written = 0;
  let current: Ready | undefined = await tail;
  for (let i = 0; i < AHEAD; i++) readAhead();
  try {
    while (current?.chunk.length) {
      const chunk: Buffer = current.chunk;
      const fits = Math.min(chunk.length, o.room - written);
      if (fits > 0) await image.write(guestOffset + written, fits < chunk.length ? chunk.subarray(0, fits) : chunk, (await current.prepared) ?? undefined);
      const done = image.settled();
      done.catch(() => {}); // a failure surfaces at its await (or at the commit)
      settled.push(done);
      written += fits;
      o.progress?.(written);
      if (fits < chunk.length) return { written, overflow: true };
      if (o.signal?.aborted) break;
      readAhead();
      current = await Promise.race([queue.shift()!, aborted]);
    }
    return { written, overflow: false };
  } finally {
    stop = true; // chunks not yet asked for are not read
    await image.settled();
  }
}

/** A promise that resolves when `signal` aborts (never, if it does not). */
function whenAborted(signal: AbortSignal): Promise<undefined> {
  if (signal.aborted) return Promise.resolve(undefined);
  return new Promise((resolve) => signal.addEventListener('abort', () => resolve(undefined), { once: true }));
}

/** A ChunkSource over bytes in memory. */
export function bufferSource(data: Buffer): ChunkSource {
  let pos = 0;
  return {
    fill: async (buf, want) => {
      const n = data.copy(buf, 0, pos, pos + want);
      pos += n;
      return n;
    },
  };
}
