// QEMU's image locks (block/file-posix.c, raw_apply_lock_bytes / raw_check_lock_bytes):
// which bytes, what they mean, and take/check/release on an open file.
//
// A user of an image holds a set of permissions ("perm") and lets others hold a set
// ("shared"). QEMU publishes both as shared read locks of one byte (OFD locks, see
// ./ofd-lock.ts) in the image file itself:
//   byte 100 + bit   for each permission it holds,
//   byte 200 + bit   for each permission it does NOT share.
// A conflict is a lock held by someone else on the opposite byte: holding permission
// `bit` conflicts with someone's 200 + bit; refusing to share `bit` conflicts with
// someone's 100 + bit. Locks are taken first, then checked (F_OFD_GETLK), so of two
// openers racing, at least one sees the other; on a conflict the locks are dropped.
//
// The profiles below are what QEMU 7.2's tools take, read from strace of qemu-img/qemu-io
// (docs/COMMANDS.md "Using qdedup beside QEMU" lists the bytes):
//   qemu-img info             perm {}                          locks 201 203
//   qemu-img check, qemu-io -r perm {consistent read}           locks 100 201 203
//   qemu-io, qemu-img check -r perm {consistent read, write, resize}  100 101 103 201 203
//   qemu-img create           perm {write, resize}, refuses resize    101 103 203
//   -U (force-share)          shares everything: locks only the perm bytes
// Backing files are opened like `qemu-img check` (read-only, refusing write and resize).
//
// The lock lives on the open file description of the image's own file descriptor, so
// it goes away when that descriptor is closed (or the process dies).

import { IoError } from '../errors.ts';
import { ERRNO, ofdLocks, type OfdLocks } from './ofd-lock.ts';

/** BLK_PERM_* (include/block/block-common.h, QEMU 7.2; graph-mod, bit 4, was dropped in 7.0). */
export const BLK_PERM_CONSISTENT_READ = 0x01;
export const BLK_PERM_WRITE = 0x02;
export const BLK_PERM_WRITE_UNCHANGED = 0x04;
export const BLK_PERM_RESIZE = 0x08;
export const BLK_PERM_ALL = 0x0f;
/** First byte of the "holds permission" locks and of the "does not share" locks. */
export const RAW_LOCK_PERM_BASE = 100;
export const RAW_LOCK_SHARED_BASE = 200;

/** QEMU's bdrv_perm_names: the words of its messages. */
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];

/** What an opener holds and what it lets others hold (BLK_PERM_* masks). */
export interface LockRequest {
  perm: number;
  shared: number;
}

const SHARED_NOT_WRITE = BLK_PERM_ALL & ~(BLK_PERM_WRITE | BLK_PERM_RESIZE);
/** `qemu-img info`: reads only metadata, holds nothing, refuses writers. */
export const LOCK_INFO: LockRequest = { perm: 0, shared: SHARED_NOT_WRITE };
/** `qemu-img check`, `qemu-io -r`, backing files: consistent reads, refuses writers. */
export const LOCK_READ: LockRequest = { perm: BLK_PERM_CONSISTENT_READ, shared: SHARED_NOT_WRITE };
/** `qemu-io`, `qemu-img check -r`: the one writer. */
export const LOCK_WRITE: LockRequest = { perm: BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE, shared: SHARED_NOT_WRITE };
/** `qemu-img create` (raw_co_create): write and resize, refusing only resize to others. */
export const LOCK_CREATE: LockRequest = { perm: BLK_PERM_WRITE | BLK_PERM_RESIZE, shared: BLK_PERM_ALL & ~BLK_PERM_RESIZE };

/** `-U`/`--force-share` on a read-only open: the same permissions, everything shared. */
export function forceShare(r: LockRequest): LockRequest {
  return { perm: r.perm, shared: BLK_PERM_ALL };
}

/** The bytes an opener locks: 100 + each held permission, 200 + each refused one. Pure. */
export function lockBytes(r: LockRequest): number[] {
  const out: number[] = [];
  for (let bit = 0; 1 << bit <= BLK_PERM_ALL; bit++) if (r.perm & (1 << bit)) out.push(RAW_LOCK_PERM_BASE + bit);
  for (let bit = 0; 1 << bit <= BLK_PERM_ALL; bit++) if (!(r.shared & (1 << bit))) out.push(RAW_LOCK_SHARED_BASE + bit);
  return out;
}

/**
 * The bytes to test, in QEMU's order, each with the message a lock there earns: for a held
 * permission, someone refusing it (200 + bit: `Failed to get "write" lock`); for a refused
 * one, someone holding it (100 + bit: `Failed to get shared "write" lock`). Pure.
 */
export function conflictBytes(r: LockRequest): { byteOffset: number; message: string }[] {
  const out: { byteOffset: number; message: string }[] = [];
  for (let bit = 0; 1 << bit <= BLK_PERM_ALL; bit++) {
    if (r.perm & (1 << bit)) out.push({ byteOffset: RAW_LOCK_SHARED_BASE + bit, message: `Failed to get "${PERM_NAMES[bit]}" lock` });
  }
  for (let bit = 0; 1 << bit <= BLK_PERM_ALL; bit++) {
    if (!(r.shared & (1 << bit))) out.push({ byteOffset: RAW_LOCK_PERM_BASE + bit, message: `Failed to get shared "${PERM_NAMES[bit]}" lock` });
  }
  return out;
}

/** strerror for the errors a lock call meets. */
const LOCK_ERRNO_TEXT: Record<number, string> = {
  [ERRNO.EACCES]: 'Permission denied',
  [ERRNO.EINVAL]: 'Invalid argument',
  [ERRNO.ENOLCK]: 'No locks available',
  [ERRNO.ENOSYS]: 'Function not implemented',
  [ERRNO.EOPNOTSUPP]: 'Operation not supported',
};
const errnoText = (errno: number) => LOCK_ERRNO_TEXT[errno] ?? `errno ${errno}`;

/** The refusal: one line holding both of QEMU's lines (its error and its hint). */
export class ImageLockError extends IoError {
  constructor(message: string, path: string) {
    super(`${message}. Is another process using the image [${path}]?`, { path }, 'ELOCKED');
  }
}

/** Locks held on one file descriptor; release() drops them (closing the descriptor does too). */
export interface HeldLock {
  readonly bytes: readonly number[];
  release(): void;
}

/** Where locks could not be taken on this file (see takeImageLock). */
export type LockWarning = (message: string) => void;

/**
 * Takes the locks of `r` on `fd` (the image's own descriptor) and checks for conflicts, as
 * QEMU's raw_handle_perm_lock(RAW_PL_PREPARE) does. Throws ImageLockError (exit 1) when
 * another open file description holds an opposite byte; the bytes taken are dropped first.
 * Returns null, having locked nothing, where OFD locks are unavailable (the platform, or
 * this file's file system refusing them: `warn` is told why; the default prints each
 * warning once per process).
 */
export function takeImageLock(fd: number, path: string, r: LockRequest, warn: LockWarning = defaultWarn, ofd?: OfdLocks | null): HeldLock | null {
  if (lockBytes(r).length === 0 && conflictBytes(r).length === 0) return null; // `info -U`: nothing to take, koffi not loaded
  const calls = ofd === undefined ? ofdLocks() : ofd;
  if (!calls) return null;
  const taken: number[] = [];
  const dropAll = () => {
    for (const b of taken) calls.setReadLock(fd, b, false);
    taken.length = 0;
  };
  for (const byteOffset of lockBytes(r)) {
    const errno = calls.setReadLock(fd, byteOffset, true);
    if (errno !== 0) {
      dropAll();
      // EAGAIN: someone holds a write lock on the byte (QEMU never does; another tool might).
      if (errno === ERRNO.EAGAIN || errno === ERRNO.EACCES) throw new ImageLockError(`Failed to lock byte ${byteOffset}`, path);
      warn(
        `${path}: warning: Failed to lock byte ${byteOffset}: ${errnoText(errno)}; continuing without image locks (another process could write this ` +
          'image at the same time)',
      );
      return null;
    }
    taken.push(byteOffset);
  }
  for (const { byteOffset, message } of conflictBytes(r)) {
    const answer = calls.testWriteLock(fd, byteOffset);
    if (answer === 'free') continue;
    dropAll();
    if (answer === 'conflict') throw new ImageLockError(message, path);
    warn(`${path}: warning: ${message}: ${errnoText(answer)}; continuing without image locks (another process could write this image at the same time)`);
    return null;
  }
  const bytes = [...taken];
  return {
    bytes,
    release() {
      if (taken.length) dropAll();
    },
  };
}

/** Warnings already printed: a command that opens a file twice (write's probe) warns once. */
const warned = new Set<string>();

function defaultWarn(message: string): void {
  if (warned.has(message)) return;
  warned.add(message);
  process.stderr.write(`qdedup: ${message}\n`);
}
