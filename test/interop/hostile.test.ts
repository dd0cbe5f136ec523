// Hostile images (I4, docs/DESIGN.md): a table of malformed QCOW2 images, each made
// by patching bytes of a small valid image that bin/qdedup creates in the test. Every row
// runs `info`, `read` (whole disk to a file), `write -P` and `check` through the real
// bin/qdedup and asserts: the documented exit code; exactly one `qdedup: ` line on stderr
// that says what is wrong (no stack trace, no "internal error"); bounded CPU time, wall
// time and memory; and the image file (and any backing file) unchanged byte for byte for
// every command except a successful write. Where qemu-img 7.2 refuses the same image, its
// message is in the row (`qemu`) and, when qemu-img is installed, checked against it.
//
// Exit codes (README "Exit codes"): every failed command is 1; `check` adds 2 (corruptions
// found), 3 (leaks only) and 63 (not a QCOW2 image). A header qdedup refuses makes `check`
// "not completed" (1), as qemu-img check does for an image it cannot open.
//
// Set HOSTILE_DEBUG=1 to print what each command said.

import { before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, copyFileSync, existsSync, mkdirSync, openSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BIN, HAVE_QEMU, qdedup, tempDir } from '../helpers.ts';

/**
 * CPU-time bound for one command on a hostile image (a command takes ~0.3 s), enforced by
 * `ulimit -t` (SIGXCPU). CPU time, not wall time: the bound must catch a quadratic parse or
 * a loop, not a busy machine running other tests.
 */
const CPU_BOUND_S = 5;
/** Wall-clock bound, for hangs that burn no CPU (waiting on a pipe or a lock): killed after it. */
const WALL_BOUND_MS = 30000;
/** Peak resident memory bound (checked when GNU time is installed): hostile sizes must not size allocations. */
const RSS_BOUND_KB = 400 * 1024;
const GNU_TIME = existsSync('/usr/bin/time') ? '/usr/bin/time' : null;
const DEBUG = Boolean(process.env.HOSTILE_DEBUG);

type Cmd = 'info' | 'read' | 'write' | 'check';
type Expect = Record<Cmd, number>;

/** Every command refuses the image at open: 1, check "not completed". */
const REFUSED: Expect = { info: 1, read: 1, write: 1, check: 1 };
/** The header is fine; guest I/O finds the damage; check reports a corruption. */
const CORRUPT_L2: Expect = { info: 0, read: 1, write: 1, check: 2 };
/** Accepted as qemu accepts it. */
const ACCEPTED: Expect = { info: 0, read: 0, write: 0, check: 0 };

/** Offsets of the valid images the rows patch. */
interface Layout {
  l1: number;
  l2: number;
  data: number;
  reftable: number;
  refblock: number;
}

interface Ctx {
  /** Fresh 1 MiB image, 64 KiB clusters, v3: header, reftable 0x10000, refblock 0x20000, L1 0x30000. */
  empty: Buffer;
  /** `empty` after `write -P 0xab 0 64k`: one L2 table and one data cluster. */
  data: Buffer;
  L: Layout;
  /** Fresh 4 MiB image with 2 MiB clusters. */
  big: Buffer;
  /** This row's image file name (in the row's folder). */
  name: string;
  /** Writes another file next to the image (e.g. a backing file); it is hashed too. */
  extra(name: string, bytes: Buffer): void;
}

interface Row {
  name: string;
  make(ctx: Ctx): Buffer;
  expect: Expect;
  /** What every failing command's error line must say (structure, field, byte). */
  msg: RegExp;
  /**
   * For a `check` that opens the image but cannot complete (exit 1 after ERROR lines, as
   * qemu-img check does): what its stderr must say. Its last line is then `qdedup: …`.
   */
  checkMsg?: RegExp;
  /** Arguments after `write` (default: -P 0x5a FILE 0 512, i.e. a partial guest cluster 0). */
  write?: (file: string) => string[];
  /** qemu-img info -f qcow2: the message it refuses with, or null when it opens the image. */
  qemu?: string | null;
  /** qemu-io -f qcow2 (-r for a read) on the same image: a message it prints. */
  qemuIo?: { cmd: string; text: string };
  /** qemu-img check -f qcow2's exit code on the same image. */
  qemuCheck?: number;
  /** After all four commands: assertions on the image's final bytes (rows whose write succeeds). */
  after?: (bytes: Buffer) => void;
}

// ------------------------------------------------------------------ byte patching

const u8 = (b: Buffer, at: number, v: number) => void b.writeUInt8(v, at);
const u32 = (b: Buffer, at: number, v: number) => void b.writeUInt32BE(v >>> 0, at);
const u64 = (b: Buffer, at: number, v: number | bigint) => void b.writeBigUInt64BE(BigInt(v), at);
const COPIED = 1n << 63n;
const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;

/** A copy of `base` with `edit` applied. */
function patched(base: Buffer, edit: (b: Buffer) => void): Buffer {
  const b = Buffer.from(base);
  edit(b);
  return b;
}

/** Puts a backing file name at byte 120 (after the end marker at 112) and points the header at it. */
function withBackingName(base: Buffer, name: string): Buffer {
  return patched(base, (b) => {
    b.write(name, 120, 'latin1');
    u64(b, 8, 120);
    u32(b, 16, Buffer.byteLength(name, 'latin1'));
  });
}

/** Writes header extensions at header_length 112 (each padded to 8), then the end marker. */
function withExtensions(base: Buffer, exts: [number, Buffer][], endMarker = true): Buffer {
  return patched(base, (b) => {
    let pos = 112;
    for (const [type, data] of exts) {
      u32(b, pos, type);
      u32(b, pos + 4, data.length);
      data.copy(b, pos + 8);
      pos += 8 + Math.ceil(data.length / 8) * 8;
    }
    if (endMarker) b.fill(0, pos, pos + 8);
  });
}

/** One feature name table entry: type (0 incompatible), bit, 46-byte name. */
function featureEntry(type: number, bit: number, name: string): Buffer {
  const e = Buffer.alloc(48);
  e[0] = type;
  e[1] = bit;
  e.write(name, 2, 'latin1');
  return e;
}

function layoutOf(img: Buffer): Layout {
  const l1 = Number(img.readBigUInt64BE(40));
  const l2 = Number(img.readBigUInt64BE(l1) & OFFSET_MASK);
  const data = Number(img.readBigUInt64BE(l2) & OFFSET_MASK);
  const reftable = Number(img.readBigUInt64BE(48));
  const refblock = Number(img.readBigUInt64BE(reftable) & OFFSET_MASK);
  return { l1, l2, data, reftable, refblock };
}

const FEATURE_TABLE = 0x6803f857;
const BACKING_FORMAT = 0xe2792aca;

// ------------------------------------------------------------------ the table

const ROWS: Row[] = [
  // --- magic, version, header length
  {
    name: 'magic-bad',
    make: (c) => patched(c.empty, (b) => b.write('XXXX', 0)),
    expect: { ...REFUSED, check: 63 },
    msg: /not in qcow2 format/,
    qemu: 'Image is not in qcow2 format',
  },
  {
    name: 'version-1',
    make: (c) => patched(c.empty, (b) => u32(b, 4, 1)),
    expect: REFUSED,
    msg: /unsupported qcow2 version 1\b/i,
    qemu: 'Unsupported qcow2 version 1',
  },
  {
    name: 'version-4',
    make: (c) => patched(c.empty, (b) => u32(b, 4, 4)),
    expect: REFUSED,
    msg: /unsupported qcow2 version 4\b/i,
    qemu: 'Unsupported qcow2 version 4',
  },
  {
    name: 'header-length-100',
    make: (c) => patched(c.empty, (b) => u32(b, 100, 100)),
    expect: REFUSED,
    msg: /header too short.*header_length 100/,
    qemu: 'qcow2 header too short',
  },
  // qemu 7.2 refuses 108 ("Header extension too large") only when an extension follows; here bytes 108… are zeros.
  {
    name: 'header-length-108',
    make: (c) => patched(c.empty, (b) => u32(b, 100, 108)),
    expect: REFUSED,
    msg: /header_length 108 is not a multiple of 8/,
    qemu: null,
  },
  // qemu 7.2 accepts 113 (the bytes at 113… read as an end marker); the spec wants a multiple of 8.
  {
    name: 'header-length-unaligned-113',
    make: (c) => patched(c.empty, (b) => u32(b, 100, 113)),
    expect: REFUSED,
    msg: /header_length 113 is not a multiple of 8/,
    qemu: null,
  },
  {
    name: 'header-length-past-cluster',
    make: (c) => patched(c.empty, (b) => u32(b, 100, 0x20000)),
    expect: REFUSED,
    msg: /header_length 131072 runs past the first cluster/,
    qemu: 'qcow2 header exceeds cluster size',
  },

  // --- cluster size, refcount width, encryption
  {
    name: 'cluster-bits-8',
    make: (c) => patched(c.empty, (b) => u32(b, 20, 8)),
    expect: REFUSED,
    msg: /cluster size: 2\^8\b/,
    qemu: 'Unsupported cluster size: 2^8',
  },
  {
    name: 'cluster-bits-22',
    make: (c) => patched(c.empty, (b) => u32(b, 20, 22)),
    expect: REFUSED,
    msg: /cluster size: 2\^22\b/,
    qemu: 'Unsupported cluster size: 2^22',
  },
  {
    name: 'cluster-bits-huge',
    make: (c) => patched(c.empty, (b) => u32(b, 20, 0xffffffff)),
    expect: REFUSED,
    msg: /cluster size: 2\^4294967295/,
    qemu: 'Unsupported cluster size: 2^4294967295',
  },
  {
    name: 'refcount-order-7',
    make: (c) => patched(c.empty, (b) => u32(b, 96, 7)),
    expect: REFUSED,
    msg: /refcount_order 7/,
    qemu: 'Reference count entry width too large; may not exceed 64 bits',
  },
  // qemu-img info opens encrypted images without the key; qdedup refuses to touch them.
  { name: 'crypt-method-1-aes', make: (c) => patched(c.empty, (b) => u32(b, 32, 1)), expect: REFUSED, msg: /encrypt.*crypt_method 1/, qemu: null },
  // qemu-img 7.2 info crashes (SIGSEGV) on crypt_method 2 without a LUKS header extension: no comparison.
  { name: 'crypt-method-2-luks', make: (c) => patched(c.empty, (b) => u32(b, 32, 2)), expect: REFUSED, msg: /encrypt.*crypt_method 2/ },
  {
    name: 'crypt-method-3',
    make: (c) => patched(c.empty, (b) => u32(b, 32, 3)),
    expect: REFUSED,
    msg: /unsupported encryption method 3/i,
    qemu: 'Unsupported encryption method 3',
  },

  // --- feature bits
  {
    name: 'incompat-unknown-bit-5',
    make: (c) => patched(c.empty, (b) => u64(b, 72, 1n << 5n)),
    expect: REFUSED,
    msg: /unsupported qcow2 feature\(s\): Unknown incompatible feature: 20$/i,
    qemu: 'Unsupported qcow2 feature(s): Unknown incompatible feature: 20',
  },
  {
    name: 'incompat-unknown-bit-63',
    make: (c) => patched(c.empty, (b) => u64(b, 72, 1n << 63n)),
    expect: REFUSED,
    msg: /Unknown incompatible feature: 8000000000000000$/,
    qemu: 'Unknown incompatible feature: 8000000000000000',
  },
  {
    // A feature name table entry names bit 40; bit 5 has no entry: qemu names the first and prints the mask of the rest.
    name: 'incompat-named-by-feature-table',
    make: (c) => patched(withExtensions(c.empty, [[FEATURE_TABLE, featureEntry(0, 40, 'inline dedup')]]), (b) => u64(b, 72, (1n << 40n) | (1n << 5n))),
    expect: REFUSED,
    msg: /unsupported qcow2 feature\(s\): inline dedup, Unknown incompatible feature: 20$/i,
    qemu: 'Unsupported qcow2 feature(s): inline dedup, Unknown incompatible feature: 20',
  },
  {
    // QEMU's rules: table order, the first entry naming a bit wins, the table ends at an empty name.
    name: 'incompat-feature-table-first-name-wins-and-empty-name-ends-it',
    make: (c) =>
      patched(
        withExtensions(c.empty, [
          [
            FEATURE_TABLE,
            Buffer.concat([
              featureEntry(0, 41, 'second bit'),
              featureEntry(0, 40, 'first name'),
              featureEntry(0, 40, 'shadowed name'),
              featureEntry(1, 42, 'compatible, not incompatible'),
              featureEntry(0, 0, ''),
              featureEntry(0, 43, 'after the end'),
            ]),
          ],
        ]),
        (b) => u64(b, 72, (1n << 40n) | (1n << 41n) | (1n << 42n) | (1n << 43n)),
      ),
    expect: REFUSED,
    msg: /unsupported qcow2 feature\(s\): second bit, first name, Unknown incompatible feature: c0000000000$/i,
    qemu: 'Unsupported qcow2 feature(s): second bit, first name, Unknown incompatible feature: c0000000000',
  },
  // qemu-img info opens these (it implements them); qdedup refuses them by name.
  { name: 'external-data-file-bit', make: (c) => patched(c.empty, (b) => u64(b, 72, 1n << 2n)), expect: REFUSED, msg: /external data file/, qemu: null },
  { name: 'extended-l2-bit', make: (c) => patched(c.empty, (b) => u64(b, 72, 1n << 4n)), expect: REFUSED, msg: /extended L2/, qemu: null },
  {
    name: 'compression-zstd',
    make: (c) =>
      patched(c.empty, (b) => {
        u64(b, 72, 1n << 3n);
        u8(b, 104, 1);
      }),
    expect: REFUSED,
    msg: /zstd/,
    qemu: null,
  },
  {
    name: 'compression-type-1-without-bit-3',
    make: (c) => patched(c.empty, (b) => u8(b, 104, 1)),
    expect: REFUSED,
    msg: /compression type 1 requires incompatible feature bit 3/,
    qemu: 'Compression type incompatible feature bit must be set',
  },
  {
    name: 'compression-bit-3-with-type-0',
    make: (c) => patched(c.empty, (b) => u64(b, 72, 1n << 3n)),
    expect: REFUSED,
    msg: /compression type incompatible feature bit must not be set/i,
    qemu: 'Compression type incompatible feature bit must not be set',
  },
  {
    name: 'compression-type-2',
    make: (c) =>
      patched(c.empty, (b) => {
        u64(b, 72, 1n << 3n);
        u8(b, 104, 2);
      }),
    expect: REFUSED,
    msg: /unknown compression type 2/,
    qemu: 'unknown compression type: 2',
  },

  // --- L1 table
  {
    name: 'l1-size-too-small',
    make: (c) => patched(c.empty, (b) => u32(b, 36, 0)),
    expect: REFUSED,
    msg: /L1 table is too small/,
    qemu: 'L1 table is too small',
  },
  {
    name: 'l1-size-huge',
    make: (c) => patched(c.empty, (b) => u32(b, 36, 0xffffffff)),
    expect: REFUSED,
    msg: /L1 table too large: 4294967295 entries/,
    qemu: 'Active L1 table too large',
  },
  {
    name: 'l1-offset-unaligned',
    make: (c) => patched(c.empty, (b) => u64(b, 40, 0x30200)),
    expect: REFUSED,
    msg: /L1 table offset 0x30200 is not cluster aligned/,
    qemu: 'Active L1 table offset invalid',
  },
  // qemu accepts offset 0 (the L1 would be read from the header); qdedup refuses.
  { name: 'l1-offset-zero', make: (c) => patched(c.empty, (b) => u64(b, 40, 0)), expect: REFUSED, msg: /L1 table offset is 0/, qemu: null },
  {
    name: 'l1-offset-beyond-2^56',
    make: (c) => patched(c.empty, (b) => u64(b, 40, 1n << 56n)),
    expect: REFUSED,
    msg: /L1 table offset 0x100000000000000/,
    qemu: null,
  },

  // --- refcount table
  {
    name: 'reftable-offset-unaligned',
    make: (c) => patched(c.empty, (b) => u64(b, 48, 0x10008)),
    expect: REFUSED,
    msg: /refcount table offset 0x10008 is not cluster aligned/,
    qemu: 'Reference count table offset invalid',
  },
  { name: 'reftable-offset-zero', make: (c) => patched(c.empty, (b) => u64(b, 48, 0)), expect: REFUSED, msg: /refcount table offset is 0/, qemu: null },
  {
    name: 'reftable-offset-beyond-2^56',
    make: (c) => patched(c.empty, (b) => u64(b, 48, 1n << 56n)),
    expect: REFUSED,
    msg: /refcount table offset 0x100000000000000/,
    qemu: null,
  },
  {
    name: 'reftable-clusters-0',
    make: (c) => patched(c.empty, (b) => u32(b, 56, 0)),
    expect: REFUSED,
    msg: /does not contain a reference count table/,
    qemu: 'Image does not contain a reference count table',
  },
  {
    name: 'reftable-clusters-huge',
    make: (c) => patched(c.empty, (b) => u32(b, 56, 0xffffffff)),
    expect: REFUSED,
    msg: /reference count table too large: 4294967295 clusters/,
    qemu: 'Reference count table too large',
  },

  // --- snapshot table
  {
    name: 'nb-snapshots-huge',
    make: (c) =>
      patched(c.empty, (b) => {
        u32(b, 60, 0xffffffff);
        u64(b, 64, 0x40000);
      }),
    expect: REFUSED,
    msg: /too many snapshots: 4294967295/,
    qemu: 'Snapshot table too large',
  },
  {
    name: 'snapshot-offset-unaligned',
    make: (c) =>
      patched(c.empty, (b) => {
        u32(b, 60, 1);
        u64(b, 64, 0x10200);
      }),
    expect: REFUSED,
    msg: /snapshot table offset 0x10200 is not cluster aligned/,
    qemu: 'Snapshot table offset invalid',
  },

  // --- backing file
  {
    name: 'backing-name-too-long',
    make: (c) => patched(withBackingName(c.empty, 'b.qcow2'), (b) => u32(b, 16, 2000)),
    expect: REFUSED,
    msg: /backing file name length 2000/,
    qemu: 'Backing file name too long',
  },
  {
    name: 'backing-name-outside-cluster-0',
    make: (c) =>
      patched(withBackingName(c.empty, 'b.qcow2'), (b) => {
        u64(b, 8, 0xfff0);
        u32(b, 16, 100);
      }),
    expect: REFUSED,
    msg: /backing file name at 0xfff0 \(\+100\) lies outside the header cluster/,
    qemu: 'Backing file name too long',
  },
  // qemu-img info does not open the backing chain, so it shows these images; so does qdedup info.
  {
    name: 'backing-file-missing',
    make: (c) => withBackingName(c.empty, 'nothere.qcow2'),
    expect: { info: 0, read: 1, write: 1, check: 1 },
    msg: /nothere\.qcow2.*No such file or directory/,
    qemu: null,
    qemuIo: { cmd: 'read 0 512', text: 'Could not open backing file' },
  },
  {
    name: 'backing-chain-loop-a-b-a',
    make: (c) => {
      const b = c.name.replace('.qcow2', '-b.qcow2');
      c.extra(b, withBackingName(c.empty, c.name));
      return withBackingName(c.empty, b);
    },
    expect: { info: 0, read: 1, write: 1, check: 1 },
    msg: /backing chain loops back/,
    qemu: null,
  },
  {
    name: 'backing-self-reference',
    make: (c) => withBackingName(c.empty, c.name),
    expect: { info: 0, read: 1, write: 1, check: 1 },
    msg: /backing chain loops back/,
    qemu: null,
  },

  // --- header extensions
  {
    name: 'extension-length-too-large',
    make: (c) => patched(withExtensions(c.empty, [[BACKING_FORMAT, Buffer.from('qcow2')]]), (b) => u32(b, 116, 0x10000)),
    expect: REFUSED,
    msg: /header extension 0xe2792aca at 0x70 too large: length 65536 runs past the first cluster/,
    qemu: 'Header extension too large',
  },
  {
    // The backing-format extension's data runs over the backing file name at 0x78.
    name: 'extension-overlaps-backing-name',
    make: (c) =>
      patched(withExtensions(c.empty, [[BACKING_FORMAT, Buffer.from('qcow2qcow2qcow2qcow2')]]), (b) => {
        b.write('base.qcow2', 0x78, 'latin1');
        u64(b, 8, 0x78);
        u32(b, 16, 10);
      }),
    expect: REFUSED,
    msg: /header extension 0xe2792aca at 0x70 too large: length 20 runs past the backing file name/,
    qemu: 'Header extension too large',
  },
  {
    name: 'extension-duplicated',
    make: (c) =>
      withExtensions(c.empty, [
        [BACKING_FORMAT, Buffer.from('raw')],
        [BACKING_FORMAT, Buffer.from('qcow2')],
      ]),
    expect: REFUSED,
    msg: /header extension 0xe2792aca appears twice/,
    qemu: null,
  },
  {
    name: 'extension-area-without-end-marker',
    make: (c) => patched(c.empty, (b) => b.fill(0x01, 112, 0x10000)),
    expect: REFUSED,
    msg: /header extension 0x1010101 at 0x70 too large: length 16843009 runs past the first cluster/,
    qemu: 'Header extension too large',
  },
  {
    // 262,130 distinct empty extensions fill a 2 MiB header cluster, no end marker: the parse must stay linear.
    name: 'extensions-fill-2MiB-cluster',
    make: (c) =>
      patched(c.big, (b) => {
        let type = 1;
        for (let pos = 112; pos + 8 <= 2 * 1024 * 1024; pos += 8) {
          u32(b, pos, type++);
          u32(b, pos + 4, 0);
        }
      }),
    expect: REFUSED,
    msg: /header extension at 0x200000 runs past the first cluster \(no end marker\)/,
    // qemu-img 7.2 accepts this (extensions that exactly fill cluster 0 need no end marker
    // there) after ~17 s of work; no comparison, to keep the test fast.
  },

  // --- truncated files
  {
    name: 'truncated-0-bytes',
    make: () => Buffer.alloc(0),
    expect: { ...REFUSED, check: 63 },
    msg: /not in qcow2 format/,
    qemu: 'Image is not in qcow2 format',
  },
  { name: 'truncated-50-bytes', make: (c) => c.empty.subarray(0, 50), expect: REFUSED, msg: /header truncated/, qemu: 'qcow2 header too short' },
  {
    name: 'truncated-header-only-112-bytes',
    make: (c) => c.empty.subarray(0, 112),
    expect: REFUSED,
    msg: /header extension at 0x70 runs past the end of the file \(byte 112\) \(no end marker\)/,
    qemu: null,
  },
  {
    // Cluster 0 only: the refcount table, block and L1 lie past EOF and read as zeros (as in
    // qemu). The guest reads as zeros, but allocating would take cluster 0: refused.
    name: 'truncated-after-cluster-0',
    make: (c) => c.empty.subarray(0, 0x10000),
    expect: { info: 0, read: 0, write: 1, check: 2 },
    msg: /refcount of cluster 0 is 0 but it holds the header/,
    qemu: null,
    qemuCheck: 2,
  },

  // --- L1/L2 entries, compressed clusters, refcounts
  {
    name: 'l1-entry-unaligned-l2-offset',
    make: (c) => patched(c.data, (b) => u64(b, c.L.l1, COPIED | BigInt(c.L.l2 + 0x200))),
    expect: CORRUPT_L2,
    msg: /L2 table offset 0x40200 unaligned \(L1 index: 0x0\)/,
    qemu: null,
    qemuIo: { cmd: 'read 0 512', text: 'L2 table offset 0x40200 unaligned (L1 index: 0)' },
    qemuCheck: 2,
  },
  {
    name: 'l2-entry-unaligned-data-offset',
    make: (c) => patched(c.data, (b) => u64(b, c.L.l2, COPIED | BigInt(c.L.data + 0x200))),
    expect: CORRUPT_L2,
    msg: /cluster allocation offset 0x50200 unaligned \(L2 offset: 0x40000, L2 index: 0x0\)/,
    qemu: null,
    qemuIo: { cmd: 'read 0 512', text: 'Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0)' },
    qemuCheck: 2,
  },
  {
    // Guest cluster 0 becomes a compressed cluster (1 sector at the data cluster) holding 0xff: not deflate.
    // Its refcount stays right, so check finds nothing (nor does qemu-img check: it never inflates).
    name: 'compressed-cluster-garbage-deflate',
    make: (c) =>
      patched(c.data, (b) => {
        b.fill(0xff, c.L.data, c.L.data + 512);
        u64(b, c.L.l2, (1n << 62n) | BigInt(c.L.data));
      }),
    expect: { info: 0, read: 1, write: 1, check: 0 },
    msg: /compressed cluster at 0x50000 does not inflate/,
    qemu: null,
    qemuIo: { cmd: 'read 0 512', text: 'read failed: Input/output error' },
    qemuCheck: 0,
  },
  {
    // Reads never need refcounts; any write does, and must refuse before touching the file.
    name: 'reftable-entry-reserved-bits',
    make: (c) => patched(c.data, (b) => u64(b, c.L.reftable, BigInt(c.L.refblock) | 1n)),
    expect: { info: 0, read: 0, write: 1, check: 2 },
    msg: /refcount table entry 0 has reserved bits set/,
    qemu: null,
    qemuCheck: 2,
  },
  {
    // The guest cluster claims to live in the L1 table's cluster (COPIED set, so an in-place write).
    name: 'l2-entry-points-at-l1-table',
    make: (c) => patched(c.data, (b) => u64(b, c.L.l2, COPIED | BigInt(c.L.l1))),
    expect: { info: 0, read: 0, write: 1, check: 2 },
    msg: /preventing a data write at 0x30000: it overlaps the active L1 table/,
    qemu: null,
    qemuIo: { cmd: 'write -P 0x5a 0 512', text: 'Preventing invalid write on metadata (overlaps with active L1 table)' },
    qemuCheck: 2,
  },
  {
    // The L1 table's cluster (3) has refcount 0: the first allocation (the L2 table) would land on it.
    name: 'refcount-0-on-l1-table-cluster',
    make: (c) => patched(c.empty, (b) => b.writeUInt16BE(0, 0x20000 + 2 * 3)),
    expect: { info: 0, read: 0, write: 1, check: 2 },
    msg: /refcount of cluster 3 is 0 but it holds the active L1 table/,
    qemu: null,
    qemuCheck: 2,
  },

  {
    // Regression: COPIED on an entry at 1 TiB (past EOF and every refcount block) made the
    // in-place write succeed and grow the file to 1 TiB. COPIED is now trusted only with refcount ≥ 1.
    name: 'l2-entry-copied-at-1TiB-past-eof',
    make: (c) => patched(c.data, (b) => u64(b, c.L.l2, COPIED | (1n << 40n))),
    expect: { info: 0, read: 0, write: 1, check: 2 },
    msg: /data cluster 0x10000000000 has the COPIED flag but refcount 0 \(L2 offset: 0x40000, L2 index: 0x0\)/,
    qemu: null,
    qemuCheck: 2,
  },
  {
    // Same for an L2 table: the write would have rewritten the table at 1 TiB.
    name: 'l1-entry-copied-l2-at-1TiB-past-eof',
    make: (c) => patched(c.data, (b) => u64(b, c.L.l1, COPIED | (1n << 40n))),
    expect: { info: 0, read: 0, write: 1, check: 2 },
    msg: /L2 table at 0x10000000000 has the COPIED flag but refcount 0 \(L1 index: 0x0\)/,
    qemu: null,
  },
  {
    name: 'refcount-block-unaligned',
    make: (c) => patched(c.data, (b) => u64(b, c.L.reftable, c.L.refblock + 0x200)),
    expect: { info: 0, read: 0, write: 1, check: 1 },
    msg: /refcount block 0 at 0x20200 is not cluster aligned/,
    checkMsg: /^ERROR refcount block 0 is not cluster aligned; refcount table entry corrupted$/m,
    qemu: null,
  },
  {
    // The refcount block lies at 1 TiB: every refcount reads 0, so nothing may be written.
    name: 'refcount-block-at-1TiB-past-eof',
    make: (c) => patched(c.data, (b) => u64(b, c.L.reftable, 1n << 40n)),
    expect: { info: 0, read: 0, write: 1, check: 2 },
    msg: /data cluster 0x50000 has the COPIED flag but refcount 0/,
    qemu: null,
    qemuCheck: 2,
  },
  {
    // One snapshot whose table is the data cluster (0xab bytes): its extra-data length is absurd.
    name: 'snapshot-table-garbage',
    // info reads the snapshot table (it lists the snapshots), so it refuses it, as qemu-img info does.
    make: (c) =>
      patched(c.data, (b) => {
        u32(b, 60, 1);
        u64(b, 64, c.L.data);
      }),
    expect: { info: 1, read: 0, write: 1, check: 1 },
    msg: /snapshot entry at 0x50000: extra data too large \(2880154539 bytes\)/,
    checkMsg: /^ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry 0$/m,
    qemu: 'Too much extra metadata in snapshot table entry 0',
  },

  // --- oddities qemu accepts, so qdedup must too (the write succeeds and keeps them)
  {
    name: 'accepted-header-length-104',
    make: (c) => patched(c.empty, (b) => u32(b, 100, 104)),
    expect: ACCEPTED,
    msg: /^$/,
    qemu: null,
    after: (b) => assert.equal(b.readUInt32BE(100), 104, 'header_length kept'),
  },
  {
    // The spec: keep unknown compatible bits; clear unknown autoclear bits before writing.
    name: 'accepted-unknown-compatible-and-autoclear-bits',
    make: (c) =>
      patched(c.empty, (b) => {
        u64(b, 80, 0x8000000000000008n);
        u64(b, 88, 0x8000000000000024n);
      }),
    expect: ACCEPTED,
    msg: /^$/,
    qemu: null,
    after: (b) => {
      assert.equal(b.readBigUInt64BE(80), 0x8000000000000008n, 'compatible bits kept');
      assert.equal(b.readBigUInt64BE(88), 0n, 'autoclear bits cleared');
    },
  },
  {
    name: 'accepted-unknown-extension',
    make: (c) => withExtensions(c.empty, [[0x64656475, Buffer.from('23 bytes of unknown ext')]]),
    expect: ACCEPTED,
    msg: /^$/,
    qemu: null,
    after: (b) =>
      assert.deepEqual(
        b.subarray(112, 112 + 8 + 23),
        withExtensions(Buffer.alloc(200), [[0x64656475, Buffer.from('23 bytes of unknown ext')]]).subarray(112, 112 + 8 + 23),
        'extension kept byte for byte',
      ),
  },
];

// ------------------------------------------------------------------ running

interface Ran {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
  /** From GNU time when installed: peak RSS (KiB), user + system CPU seconds, or its "terminated by signal" note. */
  usage?: { rssKb: number; cpuS: number; note: string };
}

/**
 * Runs bin/qdedup under `ulimit -t CPU_BOUND_S` (and GNU time, to measure peak memory);
 * stdout to `stdoutFile` if given.
 */
async function runBounded(args: string[], usageFile: string, stdoutFile?: string): Promise<Ran> {
  const timed = GNU_TIME ? [GNU_TIME, '-f', '%M %U %S', '-o', usageFile] : [];
  const r = await runAsync('bash', ['-c', `ulimit -t ${CPU_BOUND_S} && exec "$@"`, 'bash', ...timed, process.execPath, BIN, ...args], stdoutFile);
  if (GNU_TIME && existsSync(usageFile)) {
    const lines = readFileSync(usageFile, 'utf8').trim().split('\n');
    const [rss, user, sys] = lines[lines.length - 1].split(' ').map(Number);
    r.usage = { rssKb: rss, cpuS: user + sys, note: lines.slice(0, -1).join(' ') };
  }
  return r;
}

/**
 * Runs a command without blocking the event loop (rows run in parallel, and a spawnSync
 * anywhere would inflate every other row's measured time); stdout to `stdoutFile` if given.
 */
function runAsync(cmd: string, args: string[], stdoutFile?: string): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const start = performance.now();
    const fd = stdoutFile ? openSync(stdoutFile, 'w') : undefined;
    const child = spawn(cmd, args, { stdio: ['ignore', fd ?? 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1' } });
    if (fd !== undefined) closeSync(fd);
    let stdout = '';
    let stderr = '';
    child.stdout?.on('data', (d) => (stdout += d));
    child.stderr!.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), WALL_BOUND_MS);
    child.on('error', reject);
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      resolve({ status, signal, stdout, stderr, ms: performance.now() - start });
    });
  });
}

const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

const dir = tempDir('qdedup-hostile-');
let ctxBase: Omit<Ctx, 'name' | 'extra'>;

before(() => {
  const empty = join(dir, 'base-empty.qcow2');
  const data = join(dir, 'base-data.qcow2');
  const big = join(dir, 'base-big.qcow2');
  for (const [args, file] of [
    [['create', '-q', '-o', 'dedup=off', empty, '1M'], empty],
    [['create', '-q', '-o', 'cluster_size=2M,dedup=off', big, '4M'], big],
  ] as const) {
    const r = qdedup([...args]);
    assert.equal(r.status, 0, `${args.join(' ')}: ${r.stderr}`);
    assert.ok(existsSync(file));
  }
  copyFileSync(empty, data);
  const w = qdedup(['write', '-q', '-P', '0xab', data, '0', '64k']);
  assert.equal(w.status, 0, w.stderr);
  const dataBytes = readFileSync(data);
  ctxBase = { empty: readFileSync(empty), data: dataBytes, L: layoutOf(dataBytes), big: readFileSync(big) };
  assert.deepEqual(ctxBase.L, { l1: 0x30000, l2: 0x40000, data: 0x50000, reftable: 0x10000, refblock: 0x20000 }, 'layout the rows patch');
  const c = qdedup(['check', empty]);
  assert.equal(c.status, 0, `check on the clean base image: ${c.stderr}`);
});

const CMDS: Cmd[] = ['info', 'read', 'write', 'check'];

function argsFor(cmd: Cmd, row: Row, file: string): string[] {
  switch (cmd) {
    case 'info':
      return ['info', file];
    case 'read':
      return ['read', file];
    case 'write':
      return ['write', ...(row.write ? row.write(file) : ['-P', '0x5a', file, '0', '512'])];
    case 'check':
      return ['check', file];
  }
}

describe('hostile images', { concurrency: 3 }, () => {
  it(`the table has at least 30 malformed images (${ROWS.filter((r) => !r.name.startsWith('accepted-')).length})`, () => {
    assert.ok(ROWS.filter((r) => !r.name.startsWith('accepted-')).length >= 30);
    assert.equal(new Set(ROWS.map((r) => r.name)).size, ROWS.length, 'row names are unique');
  });

  for (const row of ROWS) {
    it(row.name, async (t) => {
      const rowDir = join(dir, row.name);
      mkdirSync(rowDir);
      const name = `${row.name}.qcow2`;
      const file = join(rowDir, name);
      const extras: string[] = [];
      const bytes = row.make({
        ...ctxBase,
        name,
        extra: (n, b) => {
          writeFileSync(join(rowDir, n), b);
          extras.push(join(rowDir, n));
        },
      });
      writeFileSync(file, bytes);
      const watched = [file, ...extras];
      let hashes = watched.map(sha256);

      for (const cmd of CMDS) {
        const want = row.expect[cmd];
        await t.test(cmd, async () => {
          const r = await runBounded(argsFor(cmd, row, file), join(rowDir, `${cmd}.usage`), cmd === 'read' ? join(rowDir, 'out.raw') : undefined);
          const lines = r.stderr.split('\n').filter((l) => l !== '');
          if (DEBUG)
            console.error(`[${row.name}] ${cmd} → ${r.status} (${Math.round(r.ms)} ms, ${JSON.stringify(r.usage)}) ${JSON.stringify(r.stderr.slice(0, 300))}`);
          assert.equal(r.signal, null, `${cmd} was killed (${r.signal}) after ${Math.round(r.ms)} ms of wall time`);
          assert.ok(
            r.status !== 128 + 24 && r.status !== 128 + 9 && !/signal/.test(r.usage?.note ?? ''),
            `${cmd} exceeded ${CPU_BOUND_S} s of CPU: ${r.usage?.note ?? r.status}`,
          );
          if (r.usage) {
            assert.ok(r.usage.cpuS < CPU_BOUND_S, `${cmd} used ${r.usage.cpuS} s of CPU`);
            assert.ok(r.usage.rssKb < RSS_BOUND_KB, `${cmd} peaked at ${r.usage.rssKb} KiB of memory`);
          }
          assert.doesNotMatch(r.stderr, /internal error|\n\s+at |Error: /, `${cmd}: no stack trace or internal error`);
          assert.equal(r.status, want, `${cmd} exit code; stderr: ${r.stderr}`);
          if (cmd === 'check' && want === 1 && row.checkMsg) {
            assert.match(r.stderr, row.checkMsg);
            assert.match(lines[lines.length - 1], /^qdedup: /, 'check ends with its verdict line');
          } else if (want === 1 || want === 63) {
            assert.equal(lines.length, 1, `${cmd}: exactly one line on stderr, got: ${r.stderr}`);
            assert.match(lines[0], /^qdedup: /);
            assert.ok(lines[0].includes(name) || /nothere/.test(lines[0]), `${cmd}: the message names the file: ${lines[0]}`);
            assert.match(lines[0], row.msg, `${cmd}: the message says what is wrong`);
          } else if (want === 0 && cmd !== 'check') {
            assert.equal(lines.length, 0, `${cmd}: nothing on stderr on success, got: ${r.stderr}`);
          }
          if (cmd === 'read' && want === 0) assert.equal(statSync(join(rowDir, 'out.raw')).size, 1024 * 1024, 'read: the whole disk');
          const now = watched.map(sha256);
          if (cmd === 'write' && want === 0) {
            hashes = now; // a successful write may change the image
          } else {
            assert.deepEqual(now, hashes, `${cmd} must leave the image (and its backing files) unchanged`);
          }
        });
      }

      if (row.after) row.after(readFileSync(file));

      if (HAVE_QEMU) {
        await t.test('qemu-img agrees', async () => {
          // On a fresh copy of the hostile bytes: qemu-io may mark the image corrupt.
          const copyDir = join(rowDir, 'qemu');
          mkdirSync(copyDir);
          const copy = join(copyDir, name);
          writeFileSync(copy, bytes);
          for (const x of extras) copyFileSync(x, join(copyDir, x.slice(rowDir.length + 1)));
          if (row.qemu !== undefined) {
            const q = await runAsync('qemu-img', ['info', '-f', 'qcow2', copy]);
            if (row.qemu === null) assert.equal(q.status, 0, `qemu-img info accepts it: ${q.stderr.slice(0, 300)}`);
            else {
              assert.equal(q.status, 1, 'qemu-img info refuses it');
              assert.ok(q.stderr.includes(row.qemu), `qemu-img says ${q.stderr.slice(0, 300)}`);
            }
          }
          if (row.qemuIo) {
            const ro = row.qemuIo.cmd.startsWith('read') ? ['-r'] : [];
            const q = await runAsync('qemu-io', ['-f', 'qcow2', ...ro, '-c', row.qemuIo.cmd, copy]);
            const said = q.stdout + q.stderr;
            assert.ok(said.includes(row.qemuIo.text), `qemu-io ${row.qemuIo.cmd} says ${said.slice(0, 300)}`);
          }
          if (row.qemuCheck !== undefined) {
            writeFileSync(copy, bytes);
            const q = await runAsync('qemu-img', ['check', '-f', 'qcow2', copy]);
            assert.equal(q.status, row.qemuCheck, `qemu-img check: ${q.stdout.slice(0, 200)} ${q.stderr.slice(0, 300)}`);
          }
        });
      }
    });
  }
});
