// A dedup journal on disk: appends hash entries in whole, checksummed, sequence-numbered
// blocks and replays them. Layout and replay rule: docs/FORMAT.md "Journal".
//
// Commit rule (the review of the 2013 design): a block is written whole and never
// rewritten. flush() writes every full block and the partly filled one; the entries of a
// partly filled block are written again, with the next sequence number, in the next block
// once more entries arrive. So a torn write can only damage the block being written, never
// entries committed earlier, and replay stops there.

import { decodeJournalBlock, encodeJournalEntry, entriesPerBlock, sealJournalBlock, type BlockVerdict, type JournalEntry } from '../format/journal-block.ts';
import type { JournalDescriptor } from '../format/dedup-ext.ts';
import type { BlockFile } from '../image/block-file.ts';

export interface ReplayStop {
  /** Index of the block where replay stopped (= blocks replayed). */
  block: number;
  verdict: BlockVerdict | 'end-of-journal';
  reason: string;
}

export interface ReplayResult {
  entries: JournalEntry[];
  stop: ReplayStop;
}

/** Journal bytes read at once by a replay. */
const REPLAY_READ_BYTES = 1024 * 1024;

/** Reads blocks from block 0 until the first one that is not valid (or the end). */
export async function replayJournal(file: BlockFile, desc: JournalDescriptor, blockSize: number): Promise<ReplayResult> {
  const entries: JournalEntry[] = [];
  const perRead = Math.max(1, Math.floor(REPLAY_READ_BYTES / blockSize));
  for (let first = 0; first < desc.blocks; first += perRead) {
    const count = Math.min(perRead, desc.blocks - first);
    const buf = await file.read(desc.offset + first * blockSize, count * blockSize);
    for (let i = 0; i < count; i++) {
      const block = first + i;
      const decoded = decodeJournalBlock(buf.subarray(i * blockSize, (i + 1) * blockSize), desc.startSequence + block);
      if (decoded.verdict !== 'valid') return { entries, stop: { block, verdict: decoded.verdict, reason: decoded.reason } };
      entries.push(...decoded.entries);
    }
  }
  return { entries, stop: { block: desc.blocks, verdict: 'end-of-journal', reason: 'every block replayed' } };
}

export class Journal {
  readonly desc: JournalDescriptor;
  readonly blockSize: number;
  readonly perBlock: number;
  /** Next block index to write. */
  private nextBlock: number;
  /** The block being filled, its entries encoded as they come (no object per entry), and how many it holds. */
  private filling: Buffer;
  private pending = 0;
  /** Full blocks encoded and waiting for flush(). */
  private ready: Buffer[] = [];

  constructor(
    private readonly file: BlockFile,
    desc: JournalDescriptor,
    blockSize: number,
    blocksUsed = 0,
  ) {
    this.desc = desc;
    this.blockSize = blockSize;
    this.perBlock = entriesPerBlock(blockSize);
    this.nextBlock = blocksUsed;
    this.filling = Buffer.alloc(blockSize);
  }

  /** Blocks written or committed to being written, the partly filled one included. */
  get blocksUsed(): number {
    return this.nextBlock + this.ready.length + (this.pending ? 1 : 0);
  }

  /** Blocks written to disk so far (replay of a clean journal stops exactly here). */
  get blocksWritten(): number {
    return this.nextBlock;
  }

  /** True when `count` more entries would not fit in the journal's blocks. */
  wouldOverflow(count: number): boolean {
    const entries = this.ready.length * this.perBlock + this.pending + count;
    return this.nextBlock + Math.ceil(entries / this.perBlock) > this.desc.blocks;
  }

  /** Queues an entry: the hash at byte `hashAt` of `hash` and its offsets. The caller checks wouldOverflow() first. */
  append(hash: Uint8Array, hashAt: number, hostOffset: number, firstGuestOffset: number, deleted: boolean): void {
    if (this.wouldOverflow(1)) throw new RangeError('journal full');
    encodeJournalEntry(this.filling, this.pending++, hash, hashAt, hostOffset, firstGuestOffset, deleted);
    if (this.pending === this.perBlock) {
      sealJournalBlock(this.filling, this.sequenceOf(this.ready.length), this.pending);
      this.ready.push(this.filling);
      this.filling = Buffer.alloc(this.blockSize);
      this.pending = 0;
    }
  }

  /** The sequence number of the `k`th block after the last one written. */
  private sequenceOf(k: number): number {
    return this.desc.startSequence + this.nextBlock + k;
  }

  /**
   * Writes the full blocks and the partly filled one (the caller syncs). The partly filled
   * block's entries stay pending: they are written again, in the next block, next time.
   */
  async flush(): Promise<void> {
    const blocks = [...this.ready];
    if (this.pending) {
      const partial = Buffer.from(this.filling);
      sealJournalBlock(partial, this.sequenceOf(this.ready.length), this.pending);
      blocks.push(partial);
    }
    if (blocks.length === 0) return;
    await this.file.writev(this.desc.offset + this.nextBlock * this.blockSize, blocks);
    this.nextBlock += blocks.length;
    this.ready = [];
    // Entries of the partly filled block move on to the next block: the written one is never rewritten.
  }
}
