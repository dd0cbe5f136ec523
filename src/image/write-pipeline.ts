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
const AHEAD = 4;
/** Buffers of the ring: the chunk being written, AHEAD being read and prepared, one whose writes behind may still run. */
const RING_BUFFERS = AHEAD + 2;

/** Where chunks come from: fills `buf[0…want)` as far as the input goes; returns the bytes read (fewer only at its end). */
export interface ChunkSource {
  fill(buf: Buffer, want: number): Promise<number>;
  /**
   * The same from byte `pos` of the input (a file, not a stream): calls may overlap, so
   * several chunks are read at once without waiting on one another.
   */
  fillAt?(buf: Buffer, pos: number, want: number): Promise<number>;
}

/**
 * Successive chunks of a source (CHUNK_BYTES; tests make them small), in a ring of
 * RING_BUFFERS shared-memory buffers used in turn: a chunk stays valid until RING_BUFFERS − 1
 * more have been asked for. Reads at most `limit` bytes in all. Chunk k is read from byte
 * k × chunkBytes: a source with fillAt() reads the chunks asked for at once, another one
 * after the other.
 */
export class ChunkReader {
  private readonly buffers: Buffer[] = [];
  /** Bytes of a whole chunk: a shorter one is the input's last. */
  readonly chunkBytes: number;
  private index = 0;
  /** The fill before, which a source without fillAt() must finish first. */
  private last: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly source: ChunkSource,
    private readonly limit: number,
    chunkBytes = CHUNK_BYTES,
  ) {
    this.chunkBytes = Math.max(1, Math.min(limit, chunkBytes));
    for (let i = 0; i < RING_BUFFERS; i++) this.buffers.push(Buffer.from(new SharedArrayBuffer(this.chunkBytes)));
  }

  /** The next chunk; empty at the end of the input or of the limit. */
  async next(): Promise<Buffer> {
    const k = this.index++;
    const buf = this.buffers[k % RING_BUFFERS];
    const pos = k * this.chunkBytes;
    const want = Math.min(buf.length, this.limit - pos);
    if (want <= 0) return buf.subarray(0, 0);
    const source = this.source;
    const got = source.fillAt ? source.fillAt(buf, pos, want) : this.last.then(() => source.fill(buf, want));
    this.last = got.catch(() => {});
    return buf.subarray(0, await got);
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
  // Chunks read and prepared ahead, in order. Each read starts as soon as its buffer is free
  // and the read before it has started (a file's reads then run at once, in the thread pool,
  // whatever the main thread is doing); each is prepared after the one before it.
  const queue: Promise<Ready>[] = [];
  let tail: Promise<Ready> = Promise.resolve(ready(first, guestOffset));
  let asked: Promise<unknown> = Promise.resolve(); // the read before was asked of the reader
  let requested = 0; // chunks asked of the reader after `first`
  let stop = false;
  const readAhead = () => {
    const k = ++requested; // chunk k goes into the buffer chunk k − RING_BUFFERS had
    const turn = Promise.all([asked, settled[k - RING_BUFFERS]]);
    turn.catch(() => {}); // a failed write behind surfaces at its own await (and through `read`)
    const read = turn.then(() => (stop ? null : reader.next()));
    read.catch(() => {});
    asked = turn;
    tail = Promise.all([tail, read]).then(([prev, chunk]) => {
      // After a short chunk (the input's end) nothing more is written.
      if (!chunk || prev.chunk.length < reader.chunkBytes) return { chunk: prev.chunk.subarray(0, 0), at: prev.at, prepared: null };
      return ready(chunk, prev.at + prev.chunk.length);
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

/** A ChunkSource reading with `fillAt`, whose fill() goes on from where the fill before ended. */
export function positionalSource(fillAt: (buf: Buffer, pos: number, want: number) => Promise<number>): ChunkSource {
  let pos = 0;
  return {
    fillAt,
    fill: async (buf, want) => {
      const n = await fillAt(buf, pos, want);
      pos += n;
      return n;
    },
  };
}

/** A ChunkSource over bytes in memory (positional, as a file is). */
export function bufferSource(data: Buffer): ChunkSource {
  return positionalSource(async (buf, at, want) => data.copy(buf, 0, at, at + want));
}
