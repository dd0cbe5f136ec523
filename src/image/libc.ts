// The few libc calls Node.js lacks — fcntl (QEMU's image locks, ./ofd-lock.ts), lseek
// (sparse raw output, src/cli/raw-output.ts) and fallocate (punching free clusters out of a
// file, ./discard.ts) — through the koffi FFI, which ships prebuilt
// binaries (no compiler at `npm ci`). koffi and libc are loaded on first use and only once;
// where that fails (not Linux, koffi missing) libc() returns null and callers go without.
// koffiModule() serves src/dedup/native-sha256.ts too.

import { closeSync, openSync, readSync } from 'node:fs';
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

/** The part of koffi's API used here and in src/dedup/native-sha256.ts. */
export interface Koffi {
  load(name: string | null): { func(proto: string): (...args: unknown[]) => number | bigint };
  errno(): number;
  address(pointer: unknown): bigint;
}

/**
 * koffi and the file it was loaded from (worker threads load it again from there). Its
 * package entry (koffi/index.cjs) spends ~12 ms at every load before it loads its prebuilt
 * binary (~2.5 ms): it reads node's ELF header to tell glibc from musl, resolves its
 * per-platform package, whose own entry reads the ELF header again, and wraps deprecated
 * functions. Every command that takes QEMU's image locks (`info` included) pays that, so on
 * glibc Linux the binary is required straight from that per-platform package
 * (@koromix/koffi-linux-ARCH/linux_ARCH/koffi.node, a dependency koffi pins to its own
 * version). Anything else — musl, another layout, a binary that does not load — goes
 * through koffi's entry as before.
 */
function loadKoffi(require: NodeJS.Require): { koffi: Koffi; path: string } {
  if (/^ld-linux/.test(nodeInterpreter().replace(/^.*\//, ''))) {
    try {
      const path = require.resolve(`@koromix/koffi-linux-${process.arch}/linux_${process.arch}/koffi.node`);
      const native = require(path) as Partial<Koffi> | null;
      if (typeof native?.load === 'function' && typeof native.errno === 'function' && typeof native.address === 'function')
        return { koffi: native as Koffi, path };
    } catch {
      // not there or does not load: koffi's entry finds its binary
    }
  }
  const path = require.resolve('koffi');
  return { koffi: require(path) as Koffi, path };
}

let koffiLoaded: { koffi: Koffi; path: string } | null | undefined;

/** koffi and the file it was loaded from, loaded on first use; null where it cannot be (not Linux, not installed). */
export function koffiModule(): { koffi: Koffi; path: string } | null {
  if (koffiLoaded !== undefined) return koffiLoaded;
  koffiLoaded = null;
  if (process.platform !== 'linux') return null;
  try {
    // createRequire: koffi is a native CommonJS package, kept out of the esbuild bundle
    // (scripts/build.mjs marks it external) and resolved from node_modules at run time.
    koffiLoaded = loadKoffi(createRequire(import.meta.url));
  } catch {
    // not installed, or its binary does not load here
  }
  return koffiLoaded;
}

/**
 * The program interpreter (ELF PT_INTERP) of the node binary: /lib64/ld-linux-x86-64.so.2
 * for glibc, /lib/ld-musl-… for musl; '' when it cannot be read (then koffi decides).
 */
function nodeInterpreter(): string {
  let fd: number | undefined;
  try {
    fd = openSync(process.execPath, 'r');
    const h = Buffer.alloc(64);
    // 64-bit little-endian ELF only (x86_64, aarch64); others are left to koffi.
    if (readSync(fd, h, 0, 64, 0) < 64 || h.readUInt32BE(0) !== 0x7f454c46 || h[4] !== 2 || h[5] !== 1) return '';
    const phoff = Number(h.readBigUInt64LE(32));
    const entry = h.readUInt16LE(54);
    const count = h.readUInt16LE(56);
    if (entry < 56 || count > 256) return '';
    const ph = Buffer.alloc(entry * count);
    if (readSync(fd, ph, 0, ph.length, phoff) < ph.length) return '';
    for (let at = 0; at < ph.length; at += entry) {
      if (ph.readUInt32LE(at) !== 3) continue; // PT_INTERP: p_offset @8, p_filesz @32
      const size = Number(ph.readBigUInt64LE(at + 32));
      if (size > 4096) return '';
      const name = Buffer.alloc(size);
      const got = readSync(fd, name, 0, size, Number(ph.readBigUInt64LE(at + 8)));
      const end = name.indexOf(0);
      return name.toString('latin1', 0, end >= 0 && end < got ? end : got);
    }
    return '';
  } catch {
    return '';
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

let loaded: Libc | null | undefined;

/** libc's calls, or null where they cannot be loaded. */
export function libc(): Libc | null {
  if (loaded !== undefined) return loaded;
  loaded = null;
  const k = koffiModule();
  if (!k) return null;
  try {
    const lib = k.koffi.load('libc.so.6');
    const fcntl = lib.func('int fcntl(int fd, int cmd, ...)');
    const lseek = lib.func('int64_t lseek(int fd, int64_t offset, int whence)');
    const fallocate = lib.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
    loaded = {
      fcntl: (fd, cmd, arg) => Number(fcntl(fd, cmd, 'void *', arg)),
      lseek: (fd, offset, whence) => Number(lseek(fd, offset, whence)),
      fallocate: (fd, mode, offset, length) => Number(fallocate(fd, mode, offset, length)),
      errno: () => k.koffi.errno(),
    };
  } catch {
    return null;
  }
  return loaded;
}
