// A BlockFile that fails on purpose, for crash and I/O-error tests (LevelDB's ForceError,
// SQLite's crash tests). It keeps two states: what is durable (synced) and the writes
// issued since the last sync. Power loss keeps the durable state plus any chosen part of
// the unsynced writes (none, all, a seeded random subset, or torn at 512-byte sectors).
//
// Operations are numbered from 0 in issue order (reads are not counted). At operation
// `crashAt` the file "loses power": that operation and every later one throw CrashError.
// `failAt` instead makes one operation (or, `persistent`, every one from there on) throw an
// EIO or ENOSPC error as the operating system would.

import type { BlockFile } from '../../src/image/block-file.ts';
import { ioError } from '../../src/image/block-file.ts';
import { MemFile } from './mem-file.ts';

export class CrashError extends Error {
  constructor(op: number) {
    super(`simulated power loss at operation ${op}`);
    this.name = 'CrashError';
  }
}

export interface FaultPlan {
  crashAt?: number;
  failAt?: number;
  failCode?: 'EIO' | 'ENOSPC';
  persistent?: boolean;
}

export type LossMode = 'drop-unsynced' | 'keep-unsynced' | 'random-subset' | 'torn';

interface PendingWrite {
  pos: number;
  data: Buffer;
}

export class FaultyFile implements BlockFile {
  readonly path: string;
  /** Operations issued so far (writes and syncs). */
  ops = 0;
  crashed = false;
  private readonly live: MemFile;
  private readonly durable: MemFile;
  private pending: PendingWrite[] = [];

  constructor(
    path: string,
    initial: Buffer,
    private readonly plan: FaultPlan = {},
  ) {
    this.path = path;
    this.live = new MemFile(path, initial);
    this.durable = new MemFile(path, initial);
  }

  private nextOp(kind: string): void {
    const op = this.ops++;
    if (this.crashed || (this.plan.crashAt !== undefined && op >= this.plan.crashAt)) {
      this.crashed = true;
      throw new CrashError(op);
    }
    const f = this.plan.failAt;
    if (f !== undefined && (op === f || (this.plan.persistent && op > f))) {
      const code = this.plan.failCode ?? 'EIO';
      throw ioError(Object.assign(new Error(code), { code }), this.path, `${kind} failed (injected)`);
    }
  }

  read(pos: number, length: number): Promise<Buffer> {
    if (this.crashed) return Promise.reject(new CrashError(this.ops));
    return this.live.read(pos, length);
  }

  readSync(pos: number, length: number): Buffer {
    if (this.crashed) throw new CrashError(this.ops);
    return this.live.readSync(pos, length);
  }

  async write(pos: number, data: Buffer): Promise<void> {
    this.nextOp('write');
    const copy = Buffer.from(data);
    this.pending.push({ pos, data: copy });
    await this.live.write(pos, copy);
  }

  async writev(pos: number, buffers: Buffer[]): Promise<void> {
    await this.write(pos, Buffer.concat(buffers));
  }

  async sync(): Promise<void> {
    this.nextOp('sync');
    for (const w of this.pending) await this.durable.write(w.pos, w.data);
    this.pending = [];
  }

  size(): Promise<number> {
    return this.live.size();
  }

  allocatedBytes(): Promise<number> {
    return this.live.allocatedBytes();
  }

  /** A punched hole: an operation like a write of zeros (lost or kept by a power loss alike). */
  async punchHole(pos: number, length: number): Promise<boolean> {
    this.nextOp('discard');
    const end = Math.min(this.live.bytes().length, pos + length);
    if (end <= pos) return true;
    const zeros = Buffer.alloc(end - pos);
    this.pending.push({ pos, data: zeros });
    await this.live.write(pos, zeros);
    return true;
  }

  async truncate(length: number): Promise<void> {
    this.nextOp('truncate');
    await this.live.truncate(length);
    await this.durable.truncate(length);
  }

  async close(): Promise<void> {}

  /** The bytes the file holds now, as a process reopening it would see them (no power loss). */
  liveBytes(): Buffer {
    return this.live.bytes();
  }

  /**
   * The bytes a disk would hold after power loss now: the durable state plus the unsynced
   * writes `mode` keeps. `seed` makes random choices reproducible.
   */
  async afterPowerLoss(mode: LossMode, seed = 1): Promise<Buffer> {
    const disk = new MemFile(this.path, this.durable.bytes());
    let x = seed >>> 0 || 1;
    const random = () => {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      x >>>= 0;
      return x / 0x1_0000_0000;
    };
    for (const w of this.pending) {
      if (mode === 'drop-unsynced') continue;
      if (mode === 'keep-unsynced' || (mode === 'random-subset' && random() < 0.5)) {
        await disk.write(w.pos, w.data);
      } else if (mode === 'torn') {
        // Some 512-byte disk sectors of the write reach the disk, others do not.
        for (let at = w.pos; at < w.pos + w.data.length; ) {
          const end = Math.min(w.pos + w.data.length, (Math.floor(at / 512) + 1) * 512);
          if (random() < 0.5) await disk.write(at, w.data.subarray(at - w.pos, end - w.pos));
          at = end;
        }
      }
    }
    return disk.bytes();
  }
}
