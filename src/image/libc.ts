// The few libc calls Node.js lacks — fcntl (QEMU's image locks, ./ofd-lock.ts), lseek
// (sparse raw output, src/cli/raw-output.ts) and fallocate (punching free clusters out of a
// file, ./discard.ts) — through the koffi FFI, which ships prebuilt
// binaries (no compiler at `npm ci`). koffi and libc are loaded on first use and only once;
// where that fails (not Linux, koffi missing) libc() returns null and callers go without.

import { createRequire } from 'node:module';

export interface Libc {
  /** fcntl(fd, cmd, struct *arg): the result, -1 on failure (then errno()). */
  fcntl(fd: number, cmd: number, arg: Buffer): number;
  /** lseek(fd, offset, whence): the new offset, -1 on failure. */
  lseek(fd: number, offset: number, whence: number): number;
  /** fallocate(fd, mode, offset, len): 0, or -1 on failure (then errno()). */
  fallocate(fd: number, mode: number, offset: number, length: number): number;
  /** errno of the last failed call. */
  errno(): number;
}

let loaded: Libc | null | undefined;

/** libc's calls, or null where they cannot be loaded. */
export function libc(): Libc | null {
  if (loaded !== undefined) return loaded;
  loaded = null;
  if (process.platform !== 'linux') return null;
  try {
    // createRequire: koffi is a native CommonJS package, kept out of the esbuild bundle
    // (scripts/build.mjs marks it external) and resolved from node_modules at run time.
    const koffi = createRequire(import.meta.url)('koffi') as {
      load(name: string): { func(proto: string): (...args: unknown[]) => number | bigint };
      errno(): number;
    };
    const lib = koffi.load('libc.so.6');
    const fcntl = lib.func('int fcntl(int fd, int cmd, ...)');
    const lseek = lib.func('int64_t lseek(int fd, int64_t offset, int whence)');
    const fallocate = lib.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
    loaded = {
      fcntl: (fd, cmd, arg) => Number(fcntl(fd, cmd, 'void *', arg)),
      lseek: (fd, offset, whence) => Number(lseek(fd, offset, whence)),
      fallocate: (fd, mode, offset, length) => Number(fallocate(fd, mode, offset, length)),
      errno: () => koffi.errno(),
    };
  } catch {
    return null;
  }
  return loaded;
}
