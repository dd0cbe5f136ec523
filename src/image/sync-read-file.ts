// A BlockFile opened for reading only and read on the calling thread, for a command that
// reads a few KiB of metadata and exits (`qdedup info`). NodeFile's reads go through libuv's
// thread pool: each one a round trip to a worker thread and back (the pool itself is created
// by the first), ~0.5 ms apiece at start, ~10 ms for the ~15 reads of an `info`; from the page
// cache the same reads take microseconds here (docs/PERFORMANCE.md, "Start-up"). Reads
// past the end of the file are zeros, as in NodeFile; errors are the same IoErrors. Any
// write is a bug.

import { closeSync, fstatSync, openSync } from 'node:fs';
import { InternalError } from '../errors.ts';
import { ioError, readSyncAt, type BlockFile } from './block-file.ts';
import { takeImageLock, type HeldLock, type LockRequest } from './image-lock.ts';

export class SyncReadFile implements BlockFile {
  readonly path: string;
  private readonly fd: number;
  /** QEMU's image locks held on this file's descriptor (./image-lock.ts), or null. */
  lock: HeldLock | null = null;

  private constructor(path: string, fd: number) {
    this.path = path;
    this.fd = fd;
  }

  /**
   * Opens an existing file for reading, taking QEMU's image locks `lock` (if given) before
   * anything is read: another holder makes this throw ImageLockError. Throws IoError.
   */
  static open(path: string, lock?: LockRequest): SyncReadFile {
    let fd: number;
    try {
      fd = openSync(path, 'r');
    } catch (err) {
      throw ioError(err, path, 'cannot open');
    }
    const file = new SyncReadFile(path, fd);
    if (lock) {
      try {
        file.lock = takeImageLock(fd, path, lock);
      } catch (err) {
        closeSync(fd);
        throw err;
      }
    }
    return file;
  }

  async read(pos: number, length: number): Promise<Buffer> {
    return this.readSync(pos, length);
  }

  readSync(pos: number, length: number): Buffer {
    return readSyncAt(this.fd, this.path, pos, length);
  }

  async size(): Promise<number> {
    return this.stat().size;
  }

  async allocatedBytes(): Promise<number> {
    return this.stat().blocks * 512;
  }

  private stat() {
    try {
      return fstatSync(this.fd);
    } catch (err) {
      throw ioError(err, this.path, 'stat failed');
    }
  }

  async write(): Promise<void> {
    throw this.readOnly('write');
  }

  async writev(): Promise<void> {
    throw this.readOnly('write');
  }

  async truncate(): Promise<void> {
    throw this.readOnly('truncate');
  }

  async sync(): Promise<void> {
    throw this.readOnly('sync');
  }

  async close(): Promise<void> {
    closeSync(this.fd);
  }

  private readOnly(what: string): InternalError {
    return new InternalError(`${this.path}: ${what} on a file opened for reading only`);
  }
}
