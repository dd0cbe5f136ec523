// Linux open-file-description (OFD) byte-range locks through libc's fcntl: F_OFD_SETLK to
// take or drop a shared read lock on one byte, F_OFD_GETLK to ask whether a write lock on
// one byte would conflict with a lock held by another open file description (in this
// process or any other). Node has no fcntl: it comes from ./libc.ts (koffi). Only the
// system calls live here; which bytes mean what is ./image-lock.ts.
//
// libc is loaded on first use: commands that take no lock (`info -U`) and the test doubles
// (MemFile, FaultyFile) never load it. Where it cannot work — not Linux,
// an architecture whose struct flock we have not laid out, koffi missing, or a kernel
// without OFD locks (probed on /dev/null as QEMU's qemu_has_ofd_lock does) — ofdLocks()
// returns null and the caller goes on without locks, as QEMU's locking=auto does.

import { closeSync, openSync } from 'node:fs';
import { libc } from './libc.ts';

/** fcntl commands (asm-generic/fcntl.h; the same on every Linux architecture). */
const F_OFD_GETLK = 36;
const F_OFD_SETLK = 37;
/** struct flock l_type values. */
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;
const SEEK_SET = 0;

/**
 * struct flock on 64-bit Linux (x86_64 and aarch64 alike): short l_type @0, short
 * l_whence @2, 4 bytes padding, off_t l_start @8, off_t l_len @16, pid_t l_pid @24,
 * 4 bytes padding: 32 bytes, little-endian on both. l_pid must be 0 for OFD locks.
 */
const FLOCK_BYTES = 32;
const SUPPORTED_ARCHS = new Set(['x64', 'arm64']);

/** The system calls this module offers; errno values as numbers (0 = success). */
export interface OfdLocks {
  /** Takes (`lock`) or drops a shared read lock on byte `byteOffset`: 0 or an errno. */
  setReadLock(fd: number, byteOffset: number, lock: boolean): number;
  /**
   * Would a write lock on `byteOffset` conflict with a lock of another open file
   * description? 'conflict', 'free', or an errno when the test itself failed.
   */
  testWriteLock(fd: number, byteOffset: number): 'conflict' | 'free' | number;
}

/** Linux errno numbers this code names (asm-generic/errno-base.h, errno.h). */
export const ERRNO = { EAGAIN: 11, EACCES: 13, EINVAL: 22, ENOLCK: 37, ENOSYS: 38, EOPNOTSUPP: 95 } as const;

function encodeFlock(buf: Buffer, type: number, byteOffset: number): void {
  buf.fill(0);
  buf.writeInt16LE(type, 0);
  buf.writeInt16LE(SEEK_SET, 2);
  buf.writeBigInt64LE(BigInt(byteOffset), 8);
  buf.writeBigInt64LE(1n, 16); // one byte
}

let loaded: OfdLocks | null | undefined;

/** The OFD lock calls, or null where they are unavailable (see the header). Loads koffi once. */
export function ofdLocks(): OfdLocks | null {
  if (loaded !== undefined) return loaded;
  loaded = null;
  if (process.platform !== 'linux' || !SUPPORTED_ARCHS.has(process.arch)) return null;
  const c = libc();
  if (!c) return null;
  const flock = Buffer.alloc(FLOCK_BYTES);
  const calls: OfdLocks = {
    setReadLock(fd, byteOffset, lock) {
      encodeFlock(flock, lock ? F_RDLCK : F_UNLCK, byteOffset);
      return c.fcntl(fd, F_OFD_SETLK, flock) < 0 ? c.errno() : 0;
    },
    testWriteLock(fd, byteOffset) {
      encodeFlock(flock, F_WRLCK, byteOffset);
      if (c.fcntl(fd, F_OFD_GETLK, flock) < 0) return c.errno();
      return flock.readInt16LE(0) === F_UNLCK ? 'free' : 'conflict';
    },
  };
  // QEMU's qemu_probe_lock_ops: a kernel without OFD locks answers F_OFD_GETLK with EINVAL.
  let probeFd: number | undefined;
  try {
    probeFd = openSync('/dev/null', 'r');
    if (typeof calls.testWriteLock(probeFd, 0) === 'number') return null;
  } catch {
    return null;
  } finally {
    if (probeFd !== undefined) closeSync(probeFd);
  }
  loaded = calls;
  return calls;
}
