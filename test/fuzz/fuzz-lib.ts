// Malformed-image fuzzing, in process: a seeded mutation
// fuzzer over small valid QCOW2 images held in MemFiles. Each mutant is derived from one
// integer seed alone (base image, mutations, write offset), so `QDEDUP_FUZZ_SEED=S`
// rebuilds exactly the mutant the full run reported.
//
// For each mutant (runMutant):
//   1. read-only: Image.open (backing chain followed) + a bounded read of the guest disk +
//      checkOpenImage without repair (with the dedup hook, as `qdedup check`, for dedup
//      mutants); the file's bytes must not change;
//   2. a copy: Image.open writable (no backing) + writeZeroes + a small write + close;
//      when step 1's check found the image consistent, the write must read back and the
//      image must still check clean;
//   3. another copy: checkOpenImage with repair 'all'; when it ends with no corruption,
//      a fresh check must agree (no corruption, no leak), and when the image had only
//      leaks, the guest data must be unchanged by the repair.
// Every thrown error must be a QdedupError with a one-line message that is not an
// internal error. Time is bounded per mutant (the file layer checks a deadline on every
// I/O, and yields to the event loop so a Promise.race timer can fire), and so is memory
// (rss sampled on I/O; no single read or allocation sized from a hostile field).
//
// Dedup mutants (makeDedupMutant, runDedupMutant: the second half of this file) mutate the
// structures deduplication adds, on dedup base images, and go through these steps and more.

import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { IoError, QdedupError, UnsupportedError } from '../../src/errors.ts';
import type { BlockFile } from '../../src/image/block-file.ts';
import { MemFile } from '../doubles/mem-file.ts';
import { Image } from '../../src/image/image.ts';
import { checkOpenImage, type CheckExtension, type ImageCheck } from '../../src/image/check-image.ts';
import { createImage, type CreateOptions } from '../../src/dedup/open.ts';
import { createHasher, type SupportedHashAlgorithm } from '../../src/dedup/hasher.ts';
import type { DedupSettings } from '../../src/dedup/dedup.ts';
import { heldClusters, storedRefcounts } from '../../src/dedup/clusters.ts';
import { dedupCheckExtension } from '../../src/dedup/inspect.ts';
import { judgeStore } from '../../src/dedup/judge-store.ts';
import { guestUsage } from '../../src/dedup/stats.ts';
import { readJournals } from '../../src/dedup/journal-scan.ts';
import { AUTOCLEAR_DEDUP, decodeDedupConfig, decodeDedupExtension } from '../../src/format/dedup-ext.ts';
import { incarnationLayout } from '../../src/format/incarnation.ts';
import { compressedClusterSpan } from '../../src/format/l1l2.ts';
import { HOLDER_NAME } from '../../src/dedup/holder.ts';
import { STREAM_HEADER_BYTES, STREAM_MAGIC, framedStreamsTouching } from '../../src/format/stream-header.ts';
import { findDedupExtension } from '../dedup/cli-lib.ts';
import { openForWrite, dedupOf } from '../../src/dedup/open.ts';

export const ROOT = new URL('../..', import.meta.url).pathname;
export const FIXTURES = join(ROOT, 'fixtures');

/** Wall-clock bound for all the steps of one mutant (the slowest seen take ~1 s under load; QDEDUP_FUZZ_BOUND_MS overrides). */
export const MUTANT_BOUND_MS = Number(process.env.QDEDUP_FUZZ_BOUND_MS ?? 5000);
/** Resident memory bound, sampled during I/O and after every mutant. */
export const RSS_BOUND = 1.5 * 1024 ** 3;
/** A single read larger than this was sized from a hostile field without a bound. */
const MAX_READ = 64 * 1024 * 1024;
/** Writes past this end are refused with EFBIG (a real file would be sparse; RAM is not). */
const MAX_FILE_END = 512 * 1024 * 1024;
/** Guest bytes read from the start of the disk, plus a few samples further out. */
const READ_PREFIX = 4 * 1024 * 1024;

// ---------------------------------------------------------------- PRNG

/** mulberry32: small, fast, good enough to pick mutations. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = (seed ^ 0x9e3779b9) >>> 0;
    for (let i = 0; i < 4; i++) this.u32();
  }
  u32(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  int(n: number): number {
    return n <= 0 ? 0 : this.u32() % n;
  }
  pick<T>(a: readonly T[]): T {
    return a[this.int(a.length)];
  }
  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }
}

// ---------------------------------------------------------------- base images

export interface Base {
  name: string;
  bytes: Buffer;
  /** Path the read-only open uses (backing names resolve against its folder). */
  path: string;
}

const NOWHERE = '/nonexistent-qdedup-fuzz';

async function made(name: string, o: Omit<CreateOptions, 'force'>, fill: (img: Image) => Promise<void>): Promise<Base> {
  const dir = mkdtempSync(join(tmpdir(), 'qdedup-fuzz-'));
  try {
    const p = join(dir, 'base.qcow2');
    await createImage(p, { ...o, force: true });
    const mem = new MemFile(p, readFileSync(p));
    const img = await openForWrite(p, { file: mem });
    await fill(img);
    await img.close();
    return { name, bytes: mem.bytes(), path: `${NOWHERE}/${name}.qcow2` };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

/** The valid images every mutant starts from (deterministic: same list, same bytes). */
export async function loadBases(): Promise<Base[]> {
  const bases: Base[] = [];
  bases.push(
    await made('made-v3-64k', { size: 1 << 20, clusterBits: 16, version: 3, refcountOrder: 4, lazyRefcounts: false }, async (img) => {
      await img.write(0, pattern(65536, 1));
      await img.write(3 * 65536 + 512, pattern(4096, 2));
      await img.writeZeroes(5 * 65536, 65536);
    }),
  );
  bases.push(
    await made('made-v2-512', { size: 256 * 1024, clusterBits: 9, version: 2, refcountOrder: 4, lazyRefcounts: false }, async (img) => {
      await img.write(0, pattern(8192, 3));
      await img.write(200 * 1024, pattern(1024, 4));
    }),
  );
  bases.push(
    await made('made-v3-4k-rc1', { size: 512 * 1024, clusterBits: 12, version: 3, refcountOrder: 0, lazyRefcounts: false }, async (img) => {
      await img.write(4096, pattern(12288, 5));
      await img.writeZeroes(0, 4096);
    }),
  );
  bases.push(
    await made('made-v3-1k-rc64', { size: 128 * 1024, clusterBits: 10, version: 3, refcountOrder: 6, lazyRefcounts: true }, async (img) => {
      await img.write(0, pattern(3000, 6));
      await img.write(64 * 1024, pattern(2048, 7));
    }),
  );
  for (const f of readdirSync(FIXTURES).sort()) {
    if (!f.endsWith('.qcow2')) continue;
    bases.push({ name: f, bytes: readFileSync(join(FIXTURES, f)), path: join(FIXTURES, f) });
  }
  return bases;
}

// ---------------------------------------------------------------- structure map

type Kind = 'header' | 'feature' | 'ext' | 'l1' | 'l2' | 'compressed' | 'reft' | 'refblock' | 'snap' | 'data';

interface Field {
  kind: Kind;
  off: number;
  width: 1 | 2 | 4 | 8;
  what: string;
}

interface Layout {
  clusterSize: number;
  fields: Field[];
  /** Offsets of structures, used as "plausible but wrong" values. */
  offsets: number[];
  compressed: { off: number; entry: bigint }[];
}

const u64 = (b: Buffer, o: number): bigint => (o + 8 <= b.length ? b.readBigUInt64BE(o) : 0n);
const u32 = (b: Buffer, o: number): number => (o + 4 <= b.length ? b.readUInt32BE(o) : 0);
const OFF_MASK = 0x00ff_ffff_ffff_fe00n;

/** Walks a valid base image and lists the fields worth mutating. */
export function mapImage(b: Buffer): Layout {
  const fields: Field[] = [];
  const offsets: number[] = [];
  const compressed: Layout['compressed'] = [];
  const add = (kind: Kind, off: number, width: Field['width'], what: string) => {
    if (off + width <= b.length) fields.push({ kind, off, width, what });
  };
  const version = u32(b, 4);
  const clusterBits = u32(b, 20);
  const clusterSize = 2 ** clusterBits;
  const hdr: [number, Field['width'], string][] = [
    [0, 4, 'magic'],
    [4, 4, 'version'],
    [8, 8, 'backing_file_offset'],
    [16, 4, 'backing_file_size'],
    [20, 4, 'cluster_bits'],
    [24, 8, 'size'],
    [32, 4, 'crypt_method'],
    [36, 4, 'l1_size'],
    [40, 8, 'l1_table_offset'],
    [48, 8, 'refcount_table_offset'],
    [56, 4, 'refcount_table_clusters'],
    [60, 4, 'nb_snapshots'],
    [64, 8, 'snapshots_offset'],
  ];
  for (const [o, w, n] of hdr) add('header', o, w, n);
  let extStart = 72;
  if (version === 3) {
    add('feature', 72, 8, 'incompatible_features');
    add('feature', 80, 8, 'compatible_features');
    add('feature', 88, 8, 'autoclear_features');
    add('header', 96, 4, 'refcount_order');
    add('header', 100, 4, 'header_length');
    add('header', 104, 1, 'compression_type');
    extStart = u32(b, 100);
  }
  // Header extensions: type, length, data (padded to 8).
  for (let pos = extStart, n = 0; pos + 8 <= Math.min(b.length, clusterSize) && n < 64; n++) {
    const type = u32(b, pos);
    const len = u32(b, pos + 4);
    add('ext', pos, 4, `ext ${n} type`);
    add('ext', pos + 4, 4, `ext ${n} length`);
    if (type === 0) break;
    for (let i = 0; i < len && i < 64; i += 8) add('ext', pos + 8 + i, 8, `ext ${n} data+${i}`);
    pos += 8 + Math.ceil(len / 8) * 8;
  }
  const backingOff = Number(u64(b, 8));
  if (backingOff && backingOff < b.length) for (let i = 0; i < u32(b, 16) && i < 64; i++) add('header', backingOff + i, 1, `backing name byte ${i}`);

  const l1Size = u32(b, 36);
  const l1Off = Number(u64(b, 40));
  const reftOff = Number(u64(b, 48));
  const reftClusters = u32(b, 56);
  const refcountOrder = version === 3 ? u32(b, 96) : 4;
  offsets.push(0, l1Off, reftOff, Number(u64(b, 64)), b.length, Math.ceil(b.length / clusterSize) * clusterSize);

  const l2Seen = new Set<number>();
  const walkL1 = (off: number, size: number, label: string) => {
    for (let i = 0; i < size && off + i * 8 + 8 <= b.length && i < 4096; i++) {
      const e = u64(b, off + i * 8);
      if (i < 4 || e) add('l1', off + i * 8, 8, `${label} L1[${i}]`);
      const l2 = Number(e & OFF_MASK);
      if (!l2 || l2Seen.has(l2) || l2 + clusterSize > b.length + clusterSize) continue;
      l2Seen.add(l2);
      offsets.push(l2);
      for (let j = 0; j < clusterSize / 8 && l2 + j * 8 + 8 <= b.length; j++) {
        const e2 = u64(b, l2 + j * 8);
        if (!e2 && j > 2) continue;
        if (e2 & (1n << 62n)) {
          add('compressed', l2 + j * 8, 8, `${label} L2@${l2}[${j}] compressed`);
          compressed.push({ off: l2 + j * 8, entry: e2 });
        } else {
          add('l2', l2 + j * 8, 8, `${label} L2@${l2}[${j}]`);
          const d = Number(e2 & OFF_MASK);
          if (d && d < b.length) {
            offsets.push(d);
            add('data', d, 8, `data@${d}`);
          }
        }
      }
    }
  };
  walkL1(l1Off, l1Size, 'active');

  // Refcount table and blocks.
  const rbWidth: Field['width'] = refcountOrder <= 3 ? 1 : refcountOrder === 4 ? 2 : refcountOrder === 5 ? 4 : 8;
  for (let i = 0; i < (reftClusters * clusterSize) / 8 && reftOff + i * 8 + 8 <= b.length && i < 4096; i++) {
    const e = u64(b, reftOff + i * 8);
    if (!e && i > 2) continue;
    add('reft', reftOff + i * 8, 8, `reftable[${i}]`);
    const rb = Number(e & OFF_MASK);
    if (!rb || rb >= b.length) continue;
    offsets.push(rb);
    const used = Math.ceil(b.length / clusterSize);
    const perByte = rbWidth === 1 && refcountOrder < 3 ? 8 >> refcountOrder : 1;
    for (let k = 0; k * rbWidth < clusterSize && k < Math.ceil(used / perByte) + 2; k++) add('refblock', rb + k * rbWidth, rbWidth, `refblock@${rb}[${k}]`);
  }

  // Snapshot table.
  const nbSnap = u32(b, 60);
  let sp = Number(u64(b, 64));
  for (let s = 0; s < nbSnap && s < 16 && sp + 40 <= b.length; s++) {
    const names: [number, Field['width'], string][] = [
      [0, 8, 'l1_table_offset'],
      [8, 4, 'l1_size'],
      [12, 2, 'id_str_size'],
      [14, 2, 'name_size'],
      [16, 4, 'date_sec'],
      [32, 4, 'vm_state_size'],
      [36, 4, 'extra_data_size'],
    ];
    for (const [o, w, n] of names) add('snap', sp + o, w, `snapshot ${s} ${n}`);
    const extra = u32(b, sp + 36);
    for (let i = 0; i + 8 <= extra && i < 24; i += 8) add('snap', sp + 40 + i, 8, `snapshot ${s} extra+${i}`);
    walkL1(Number(u64(b, sp)), u32(b, sp + 8), `snapshot ${s}`);
    const len = 40 + extra + b.readUInt16BE(sp + 12) + b.readUInt16BE(sp + 14);
    sp += Math.ceil(len / 8) * 8;
  }
  return { clusterSize, fields, offsets: offsets.filter((o) => o > 0), compressed };
}

// ---------------------------------------------------------------- mutation

const EXTREME64 = [
  0n,
  1n,
  0x1ffn,
  0x200n,
  0xffff_ffffn,
  0x1_0000_0000n,
  (1n << 53n) - 1n,
  (1n << 53n) + 1n,
  1n << 53n,
  1n << 55n,
  (1n << 56n) - 512n,
  1n << 56n,
  1n << 62n,
  1n << 63n,
  (1n << 64n) - 1n,
  (1n << 64n) - 512n,
];
const EXTREME32 = [0, 1, 8, 9, 21, 22, 64, 72, 104, 112, 0x7f, 0xff, 0xffff, 0x10000, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];

function readField(b: Buffer, f: Pick<Field, 'off' | 'width'>): bigint {
  switch (f.width) {
    case 1:
      return BigInt(b[f.off]);
    case 2:
      return BigInt(b.readUInt16BE(f.off));
    case 4:
      return BigInt(b.readUInt32BE(f.off));
    default:
      return b.readBigUInt64BE(f.off);
  }
}

function writeField(b: Buffer, f: Pick<Field, 'off' | 'width'>, v: bigint): void {
  const bits = BigInt(f.width * 8);
  v &= (1n << bits) - 1n;
  switch (f.width) {
    case 1:
      b[f.off] = Number(v);
      break;
    case 2:
      b.writeUInt16BE(Number(v), f.off);
      break;
    case 4:
      b.writeUInt32BE(Number(v), f.off);
      break;
    default:
      b.writeBigUInt64BE(v, f.off);
  }
}

function newValue(rng: Rng, f: Field, old: bigint, layout: Layout, fileLen: number): bigint {
  const bits = f.width * 8;
  const cs = BigInt(layout.clusterSize);
  const flags = old & ~OFF_MASK;
  const r = rng.int(12);
  if (f.kind === 'feature' && r < 6) return old ^ (1n << BigInt(rng.int(64)));
  if ((f.kind === 'l1' || f.kind === 'l2' || f.kind === 'reft') && r < 5) {
    // Keep the flags, point somewhere plausible but wrong, or flip a flag bit.
    switch (rng.int(5)) {
      case 0:
        return flags | (BigInt(rng.pick(layout.offsets)) & OFF_MASK);
      case 1:
        return flags | ((old & OFF_MASK) + BigInt(rng.pick([-1, 1, 2, 1000, -1000])) * cs);
      case 2:
        return old ^ (1n << BigInt(rng.pick([0, 1, 8, 9, 55, 56, 61, 62, 63])));
      case 3:
        return flags | BigInt(fileLen + rng.int(4) * layout.clusterSize);
      default:
        return (old & OFF_MASK) | ((old & OFF_MASK) + BigInt(rng.int(512)));
    }
  }
  switch (r) {
    case 0:
    case 1:
    case 2:
      return bits === 64 ? rng.pick(EXTREME64) : BigInt(rng.pick(EXTREME32));
    case 3:
      return old ^ (1n << BigInt(rng.int(bits)));
    case 4:
      return old + BigInt(rng.pick([-1, 1, -8, 8, 512, -512]));
    case 5:
      return BigInt(rng.pick(layout.offsets));
    case 6:
      return old + cs * BigInt(rng.pick([-1, 1, 2]));
    case 7:
      return rng.u64();
    case 8:
      return old * 2n + 1n;
    case 9:
      return BigInt(fileLen);
    case 10:
      return old >> BigInt(1 + rng.int(8));
    default:
      return (1n << BigInt(bits)) - 1n;
  }
}

/** A compressed descriptor with a new host offset and/or sector count. */
function mutateCompressed(rng: Rng, entry: bigint, clusterBits: number, fileLen: number): bigint {
  const x = 62n - BigInt(clusterBits - 8);
  const offMask = (1n << x) - 1n;
  const sectorsMask = (1n << (62n - x)) - 1n;
  let off = entry & offMask;
  let sectors = (entry >> x) & sectorsMask;
  switch (rng.int(6)) {
    case 0:
      sectors = sectorsMask;
      break;
    case 1:
      sectors = 0n;
      break;
    case 2:
      off = BigInt(Math.max(0, fileLen - 1 - rng.int(64)));
      break;
    case 3:
      off = offMask;
      break;
    case 4:
      off = BigInt(rng.int(fileLen + 4096));
      break;
    default:
      off ^= 1n << BigInt(rng.int(Number(x)));
  }
  return (entry & (3n << 62n)) | ((sectors & sectorsMask) << x) | (off & offMask);
}

export interface Mutant {
  seed: number;
  base: Base;
  bytes: Buffer;
  /** What was done, for the failure report. */
  steps: string[];
  /** Guest offset of the write step (chosen from the seed too). */
  writeAt: number;
  zeroAt: number;
  /** The writes of every step store unique clusters compressed (`write -c`). */
  compress?: boolean;
}

/** Builds mutant `seed` from one of `bases` (deterministic). */
export function makeMutant(seed: number, bases: Base[], layouts: Map<Base, Layout>): Mutant {
  const rng = new Rng(seed);
  const base = rng.pick(bases);
  const layout = layouts.get(base) ?? mapImage(base.bytes);
  layouts.set(base, layout);
  let bytes = Buffer.from(base.bytes);
  const steps: string[] = [];
  const n = rng.chance(0.6) ? 1 : 2 + rng.int(3);
  for (let k = 0; k < n; k++) {
    const r = rng.int(100);
    if (r < 5) {
      const cut = rng.chance(0.5) ? rng.int(bytes.length) : Math.max(0, bytes.length - layout.clusterSize * (1 + rng.int(3)));
      bytes = bytes.subarray(0, cut);
      steps.push(`truncate to ${cut}`);
    } else if (r < 13) {
      const count = 1 + rng.int(8);
      const limit = rng.chance(0.5) ? Math.min(bytes.length, layout.clusterSize) : bytes.length;
      for (let i = 0; i < count && limit > 0; i++) {
        const at = rng.int(limit);
        const bit = rng.int(8);
        bytes[at] ^= 1 << bit;
        steps.push(`flip bit ${bit} of byte ${at}`);
      }
    } else if (r < 18 && layout.compressed.length) {
      const c = rng.pick(layout.compressed);
      if (c.off + 8 > bytes.length) continue;
      const e = mutateCompressed(rng, bytes.readBigUInt64BE(c.off), Math.log2(layout.clusterSize), bytes.length);
      bytes.writeBigUInt64BE(e, c.off);
      steps.push(`compressed descriptor @${c.off} = 0x${e.toString(16)}`);
    } else if (r < 21 && layout.compressed.length) {
      // Damage the compressed stream itself.
      const c = rng.pick(layout.compressed);
      const x = 62n - BigInt(Math.log2(layout.clusterSize) - 8);
      const at = Number(c.entry & ((1n << x) - 1n)) + rng.int(64);
      if (at < bytes.length) {
        bytes[at] ^= 1 + rng.int(255);
        steps.push(`corrupt compressed stream byte ${at}`);
      }
    } else {
      const f = rng.pick(layout.fields);
      if (f.off + f.width > bytes.length) continue;
      const old = readField(bytes, f);
      const v = newValue(rng, f, old, layout, bytes.length);
      writeField(bytes, f, v);
      steps.push(`${f.kind} ${f.what} @${f.off}: 0x${old.toString(16)} -> 0x${readField(bytes, f).toString(16)}`);
    }
  }
  return { seed, base, bytes: Buffer.from(bytes), steps, writeAt: rng.int(1 << 20), zeroAt: rng.int(1 << 20) };
}

// ---------------------------------------------------------------- the guarded file

/** Thrown by the file layer when the deadline passed: not a QdedupError, so it fails. */
export class FuzzDeadline extends Error {}

/** A MemFile behind checks: deadline, read size, file growth, memory. */
export class GuardFile implements BlockFile {
  readonly mem: MemFile;
  ops = 0;
  problems: string[] = [];
  constructor(
    readonly path: string,
    bytes: Buffer,
    private readonly deadline: number,
    private readonly label: string,
  ) {
    this.mem = new MemFile(path, bytes);
  }
  private async tick(): Promise<void> {
    this.ops++;
    if (Date.now() > this.deadline) {
      this.note(`no end within ${MUTANT_BOUND_MS} ms (${this.ops} I/O operations)`);
      throw new FuzzDeadline(`${this.label}: deadline passed`);
    }
    if (this.ops % 256 === 0) {
      await new Promise((r) => setImmediate(r)); // let the Promise.race timer run
      const rss = process.memoryUsage().rss;
      if (rss > RSS_BOUND) {
        this.note(`rss ${rss} above bound`);
        throw new FuzzDeadline(`${this.label}: memory bound passed`);
      }
    }
  }
  private note(p: string): void {
    if (!this.problems.includes(p)) this.problems.push(p);
  }
  async read(pos: number, length: number): Promise<Buffer> {
    await this.tick();
    // Positions ≥ 2^53 come from hostile offsets (host offsets go up to 2^56) and read as
    // zeros, as NodeFile does; negative or fractional ones would be arithmetic bugs.
    if (!(pos >= 0) || (pos < 2 ** 53 && !Number.isInteger(pos)) || !Number.isSafeInteger(length) || length < 0)
      this.note(`read(${pos}, ${length}): bad arguments`);
    if (!Number.isSafeInteger(pos + length)) return Buffer.alloc(length);
    if (length > MAX_READ) {
      this.note(`read of ${length} bytes (unbounded)`);
      throw new FuzzDeadline(`${this.label}: read of ${length} bytes`);
    }
    return this.mem.read(pos, length);
  }
  readSync(pos: number, length: number): Buffer {
    // Only small lookup reads come here; the deadline is checked, the memory bound on async reads.
    this.ops++;
    if (Date.now() > this.deadline) throw new FuzzDeadline(`${this.label}: deadline passed`);
    if (length > MAX_READ) {
      this.note(`readSync of ${length} bytes (unbounded)`);
      throw new FuzzDeadline(`${this.label}: read of ${length} bytes`);
    }
    return this.mem.readSync(pos, length);
  }
  async write(pos: number, data: Buffer): Promise<void> {
    await this.tick();
    if (!(pos >= 0) || (pos < 2 ** 53 && !Number.isInteger(pos))) this.note(`write at ${pos}: bad offset`);
    if (pos + data.length > MAX_FILE_END) throw new IoError(`write of ${data.length} bytes at ${pos} failed: File too large`, { path: this.path }, 'EFBIG');
    return this.mem.write(pos, data);
  }
  async writev(pos: number, buffers: Buffer[]): Promise<void> {
    await this.tick();
    const total = buffers.reduce((n, b) => n + b.length, 0);
    if (pos + total > MAX_FILE_END) throw new IoError(`write of ${total} bytes at ${pos} failed: File too large`, { path: this.path }, 'EFBIG');
    return this.mem.writev(pos, buffers);
  }
  async sync(): Promise<void> {
    await this.tick();
  }
  async size(): Promise<number> {
    await this.tick();
    return this.mem.size();
  }
  async allocatedBytes(): Promise<number> {
    return this.mem.allocatedBytes();
  }
  async truncate(length: number): Promise<void> {
    await this.tick();
    if (length > MAX_FILE_END) throw new IoError('truncate failed: File too large', { path: this.path }, 'EFBIG');
    return this.mem.truncate(length);
  }
  async close(): Promise<void> {}
  bytes(): Buffer {
    return this.mem.bytes();
  }
}

// ---------------------------------------------------------------- running one mutant

export interface Outcome {
  seed: number;
  failures: string[];
  /** How far the read-only step got: 'refused' at open, or the check verdict. */
  verdict: string;
}

/** The reasons an error is not acceptable, or [] when it is a proper QdedupError. */
function badError(err: unknown, step: string): string[] {
  if (err instanceof FuzzDeadline) return [`${step}: ${err.message}`];
  if (!(err instanceof QdedupError)) {
    const e = err as Error;
    return [`${step}: non-QdedupError ${e?.name}: ${e?.message} ${(e?.stack ?? '').split('\n').slice(1, 4).join(' | ')}`];
  }
  const out: string[] = [];
  if (err.message.includes('\n')) out.push(`${step}: multi-line message: ${JSON.stringify(err.message)}`);
  if (/internal/i.test(err.message) || err.code === 'EINTERNAL')
    out.push(`${step}: internal error: ${err.message} ${(err.stack ?? '').split('\n').slice(1, 4).join(' | ')}`);
  return out;
}

/** Bounded read of the guest disk: the first READ_PREFIX bytes and a few samples further out. */
async function readDisk(img: Image, rng: Rng): Promise<Buffer> {
  const parts: Buffer[] = [];
  const prefix = Math.min(img.size, READ_PREFIX);
  for (let pos = 0; pos < prefix; pos += 256 * 1024) parts.push(await img.read(pos, Math.min(256 * 1024, prefix - pos)));
  if (img.size > prefix) {
    for (let i = 0; i < 6; i++) {
      const at = Math.floor((rng.u32() / 2 ** 32) * (img.size - 4096));
      parts.push(await img.read(Math.max(0, at - (at % 512)), Math.min(4096, img.size)));
    }
    parts.push(await img.read(img.size - Math.min(4096, img.size), Math.min(4096, img.size)));
  }
  return Buffer.concat(parts);
}

function isClean(c: ImageCheck | null): boolean {
  return c !== null && c.failure === undefined && c.corruptions === 0 && c.checkErrors === 0;
}

function checkMessages(c: ImageCheck, step: string): string[] {
  const out: string[] = [];
  if (c.failure && (/internal/i.test(c.failure) || c.failure.includes('\n'))) out.push(`${step}: check failure text: ${JSON.stringify(c.failure)}`);
  for (const m of c.messages.slice(0, 1000)) {
    if (/internal|undefined|NaN/i.test(m)) {
      out.push(`${step}: check message: ${m}`);
      break;
    }
  }
  return out;
}

/** Silences stderr (rebuildRefcounts prints its repair lines there on dirty images). */
async function quiet<T>(f: () => Promise<T>): Promise<T> {
  const write = process.stderr.write;
  process.stderr.write = (() => true) as typeof process.stderr.write;
  try {
    return await f();
  } finally {
    process.stderr.write = write;
  }
}

/**
 * The plain steps. `ext` gives the check extension of an opened image (the CLI's dedup
 * hook, for dedup mutants: `check` always passes it); without it checks know only QCOW2.
 */
async function steps(m: Mutant, failures: string[], deadline: number, ext: (img: Image) => CheckExtension | null = () => null): Promise<string> {
  const rng = new Rng(m.seed ^ 0x5bd1e995);
  let verdict = 'refused';

  // 1. Read-only: open, read, check; no byte may change.
  const ro = new GuardFile(m.base.path, m.bytes, deadline, 'read-only');
  let pre: ImageCheck | null = null;
  let guestBefore: Buffer | null = null;
  let img: Image | null = null;
  try {
    img = await Image.open(m.base.path, { file: ro });
    verdict = 'opened';
    try {
      guestBefore = await readDisk(img, new Rng(m.seed));
    } catch (err) {
      failures.push(...badError(err, 'read'));
    }
    try {
      pre = await checkOpenImage({ path: m.base.path, file: img.file, header: img.header, l1: img.l1, writable: false }, {}, ext(img));
      failures.push(...checkMessages(pre, 'check'));
      verdict = pre.failure !== undefined ? 'check-failed' : pre.corruptions ? 'corrupt' : pre.leaks ? 'leaks' : 'clean';
    } catch (err) {
      failures.push(...badError(err, 'check'));
    }
  } catch (err) {
    failures.push(...badError(err, 'open read-only'));
  } finally {
    await img?.close().catch((err) => failures.push(...badError(err, 'close read-only')));
  }
  failures.push(...ro.problems.map((p) => `read-only: ${p}`));
  if (!ro.bytes().equals(m.bytes)) failures.push('read-only open/read/check changed the file');

  // 2. Writable copy: zero a range, write a pattern, close; on a clean image it must stick.
  const rw = new GuardFile(m.base.path, m.bytes, deadline, 'write');
  let wimg: Image | null = null;
  let wrote = false;
  let at = 0;
  const data = pattern(4096, m.seed & 0xff);
  try {
    wimg = await quiet(() => openForWrite(m.base.path, { file: rw, backing: false, compress: m.compress }));
    const size = wimg.size;
    if (size >= 4096) {
      at = (m.writeAt % (size - 4096 + 1)) & ~511;
      const z = (m.zeroAt % (size - 4096 + 1)) & ~511;
      await wimg.writeZeroes(z, 4096);
      await wimg.write(at, data);
      wrote = true;
    }
    await wimg.close();
    wimg = null;
  } catch (err) {
    failures.push(...badError(err, 'write'));
    wrote = false;
  } finally {
    await wimg?.abandon().catch(() => {});
  }
  failures.push(...rw.problems.map((p) => `write: ${p}`));
  if (wrote && isClean(pre)) {
    // The image checked consistent: the write must read back, and the image stay consistent.
    const after = new GuardFile(m.base.path, rw.bytes(), deadline, 'write-verify');
    let v: Image | null = null;
    try {
      v = await Image.open(m.base.path, { file: after, backing: false });
      const back = await v.read(at, 4096);
      if (!back.equals(data)) failures.push(`write on a clean image did not read back at ${at}`);
      const c = await checkOpenImage({ path: m.base.path, file: v.file, header: v.header, l1: v.l1, writable: false }, {}, ext(v));
      if (!isClean(c)) failures.push(`write made a clean image inconsistent: ${c.failure ?? c.messages.slice(0, 2).join(' / ')}`);
    } catch (err) {
      failures.push(`write-verify: ${(err as Error).message}`);
    } finally {
      await v?.close().catch(() => {});
    }
  }

  // 3. Repair copy: check -r all; what it calls fixed must check clean again.
  const rp = new GuardFile(m.base.path, m.bytes, deadline, 'repair');
  let rimg: Image | null = null;
  let repaired: ImageCheck | null = null;
  try {
    rimg = await Image.open(m.base.path, { file: rp, backing: false });
    repaired = await checkOpenImage({ path: m.base.path, file: rimg.file, header: rimg.header, l1: rimg.l1, writable: true }, { repair: 'all' }, ext(rimg));
    failures.push(...checkMessages(repaired, 'repair'));
  } catch (err) {
    failures.push(...badError(err, 'repair'));
  } finally {
    await rimg?.close().catch((err) => failures.push(...badError(err, 'close repair')));
  }
  failures.push(...rp.problems.map((p) => `repair: ${p}`));
  if (repaired && isClean(repaired)) {
    const again = new GuardFile(m.base.path, rp.bytes(), deadline, 'repair-verify');
    let v: Image | null = null;
    try {
      v = await Image.open(m.base.path, { file: again, backing: false });
      const c = await checkOpenImage({ path: m.base.path, file: v.file, header: v.header, l1: v.l1, writable: false }, {}, ext(v));
      if (!isClean(c) || c.leaks) failures.push(`repair reported a clean image but a new check finds: ${c.failure ?? c.messages.slice(0, 2).join(' / ')}`);
      // Leaks only before: repairing them must not touch guest data (compared without backing).
      if (isClean(pre) && guestBefore && !m.base.bytes.equals(Buffer.alloc(0))) {
        const ref = new GuardFile(m.base.path, m.bytes, deadline, 'repair-ref');
        const r = await Image.open(m.base.path, { file: ref, backing: false });
        try {
          const a = await readDisk(r, new Rng(m.seed));
          const b = await readDisk(v, new Rng(m.seed));
          if (!a.equals(b)) failures.push('repairing leaks changed guest data');
        } finally {
          await r.close();
        }
      }
    } catch (err) {
      failures.push(`repair-verify: ${(err as Error).message}`);
    } finally {
      await v?.close().catch(() => {});
    }
  }
  return verdict;
}

/** Runs every step on mutant `m` within MUTANT_BOUND_MS; never throws. */
export async function runMutant(m: Mutant): Promise<Outcome> {
  const failures: string[] = [];
  const started = Date.now();
  const deadline = started + MUTANT_BOUND_MS;
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<string>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), MUTANT_BOUND_MS + 500);
  });
  let verdict: string;
  try {
    verdict = await Promise.race([steps(m, failures, deadline), timeout]);
  } catch (err) {
    verdict = 'threw';
    failures.push(`harness: ${(err as Error)?.stack ?? err}`);
  } finally {
    clearTimeout(timer);
  }
  if (verdict === 'timeout') failures.push(`no end within ${MUTANT_BOUND_MS} ms (Promise.race timeout)`);
  const rss = process.memoryUsage().rss;
  if (rss > RSS_BOUND) failures.push(`rss ${rss} above ${RSS_BOUND}`);
  return { seed: m.seed, failures: [...new Set(failures)], verdict };
}

export function describe(m: Mutant, o: Outcome): string {
  return [
    `seed ${m.seed} (base ${m.base.name}; QDEDUP_FUZZ_SEED=${m.seed} npm test -- fuzz):`,
    ...m.steps.map((s) => `  mutation: ${s}`),
    ...o.failures.map((f) => `  FAIL ${f}`),
  ].join('\n');
}

// ================================================================ dedup images
//
// Issue 4 item 5 for our own structures: the dedup header extension (every field of its
// 48-byte payload), the configuration area (header, journal descriptors with "blocks
// written", incarnation and limbo records), journal blocks (magic, checksum, sequence,
// entry count and bytes, each entry's type, flags, length, hash and offsets), incarnations
// (filter tags and table slots) and the holder snapshot (its table entry, L1 and L2).
// The bases are dedup images made by createImage(…, dedup) and written through Image in
// several sessions (tiny log stores freeze into incarnations, a FIFO of incarnations sends
// the oldest to limbo, rewrites delete hashes), so every structure has live entries.
//
// Checksummed structures (configuration area, journal blocks) get their CRC-32 recomputed
// after most mutations, so that the mutation reaches the code that interprets the field
// instead of stopping at "checksum mismatch".
//
// A dedup mutant (runDedupMutant, within twice the plain time bound) goes through the plain
// steps, whose checks and repair get the dedup hook as `qdedup check` gives it, then:
//   1. read-only, file unchanged: judgeStore (plain, tolerant, store: false), readJournals
//      (journal-dump), dedup-stats' heldClusters / guestUsage / storedRefcounts, check with
//      the deep dedup hook, and a read of every guest cluster (what was readable before);
//   2. a writable copy: Image.open writable (Dedup.attach), copies of indexed contents
//      (the hashes of mutated entries first), a unique cluster, a rewrite, a partial write,
//      a zeroed cluster; close; then a read-back: I1 — the data written reads back exactly
//      and every other guest cluster that was readable before is unchanged (a violation is
//      reported in `wrongData`, with what classifies it). The open's "not trusted" notice
//      must agree with judgeStore's verdict. When the deep check found no corruption
//      before, it must find none after;
//   3. a repair copy: check -r all --deep with the dedup hook; when it ends clean, a new
//      check agrees (no corruption, no leak), guest data that was readable is unchanged, and
//      a write of indexed contents reads back exactly.
// dedupHazards() tells, from the mutant's bytes alone, which reported src/ bugs it can hit
// (fuzz-images.test.ts KNOWN_BUGS).
//
// Compressed dedup mutants (makeDedupMutant(…, 'compressed'): their own seed space) start
// from loadCompressedDedupBases(): dedup images whose unique clusters were written as framed
// deflate streams (`-c`, or `compression=on`; docs/DESIGN.md "Compressed clusters"), with
// duplicates linked to them, copies crossing host clusters, whole clusters that did not
// shrink, released copies and a freed run, and index entries naming copies in journals and
// incarnations; 4 KiB and 512-byte clusters, 16- and 4-bit refcounts, a foreign writer.
// mapCopies() finds the copies (frames in the clusters the compressed L2 entries touch) and
// what names and holds them; mutateCopy() (about two mutations in three) changes one of: a
// frame header (magic, length, position, a false frame), a stream entry (host offset,
// length bits, hash: a stale or hostile entry), a whole-cluster entry made to name a copy, a
// compressed descriptor of a copy (offset, sector count), the deflate bytes (damaged, or
// another copy's valid stream in their place), the refcount or the holder entry of a cluster
// of copies; the others are the dedup mutations above. Their writes (every step's) use -c
// three times in four. The assertions are the dedup mutants', I1 included: a hit on an
// entry that lies must be refused by the compare (the inflated copy is compared when the
// entry is unconfirmed or verify is on), never linked. Two allowances, both for damage no
// writer can see without reading everything: an index lie the deep check saw before the
// write (a copy that inflates otherwise or not at all) may outlive its cluster, as a
// whole-cluster lie may; and where the check before the write found a refcount below its
// references (QCOW2 corruption: QEMU too frees or reuses such a cluster), guest clusters
// that were not written and read from that cluster are not asserted (counted instead).

export interface DedupBase extends Base {
  clusterSize: number;
  algorithm: SupportedHashAlgorithm;
  /** Every whole cluster written while the base was made, by hash (hex, the base's algorithm). */
  contents: Map<string, Buffer>;
  /** First guest byte of a range the base never wrote (the write step puts copies there). */
  scratch: number;
  /** State of the store as made: 'trusted', 'dirty' (abandoned session) or 'foreign' (bit 60 cleared). */
  state: string;
  /** The base holds compressed copies (written with -c, or `compression=on`): the fuzzer's writes to it mix -c writes. */
  compress: boolean;
}

/**
 * Deterministic cluster content number `i` (never all zero): a 64-byte pattern of `i`,
 * repeated, so that the images kept as fixtures compress to almost nothing.
 */
export function uniqueCluster(i: number, cs: number): Buffer {
  const b = Buffer.alloc(cs);
  const k = Math.imul(i + 1, 2654435761) >>> 0;
  for (let p = 0; p < cs; p += 4) b.writeUInt32LE((k ^ Math.imul((p & 63) + 1, 40503)) >>> 0, p);
  return b;
}

/** Content numbers from TEXT on: text-like clusters, whose deflate streams take about 30% of a cluster (a run of them crosses host clusters). */
export const TEXT = 0x10000;
/** Content numbers from NOISE on: clusters that do not compress (stored whole even with -c). */
export const NOISE = 0x20000;

/** Cluster content number `i` (never all zero): below TEXT uniqueCluster(i) (compresses to ~2.5%), then text, then noise. */
export function contentCluster(i: number, cs: number): Buffer {
  if (i < TEXT) return uniqueCluster(i, cs);
  if (i >= NOISE) {
    const b = Buffer.alloc(cs);
    let x = (Math.imul(i, 2654435761) | 1) >>> 0;
    for (let p = 0; p < cs; p += 4) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      b.writeUInt32LE(x >>> 0, p);
    }
    return b;
  }
  const k = i - TEXT;
  let s = '';
  for (let r = 0; s.length < cs; r++) s += `record ${k}.${r}: ${((k * 7919 + r * 104729) % 1000003).toString(36)} ok\n`;
  return Buffer.from(s.slice(0, cs), 'latin1');
}

interface DedupWriter {
  /** Writes `contents` (cluster content numbers, contentCluster) at guest cluster `first` in one write, recording them. */
  put(first: number, contents: number[]): Promise<void>;
  zero(first: number, clusters: number): Promise<void>;
}

interface Session {
  run: (w: DedupWriter) => Promise<void>;
  /** 'abandon': flush, then abandon (the dirty flag stays set). */
  end?: 'close' | 'abandon';
  /** false: a read-write open that leaves the store alone (writes not deduplicated). */
  dedup?: boolean;
  /** true: unique clusters written as compressed copies (`write -c`). */
  compress?: boolean;
}

async function madeDedup(
  name: string,
  o: Omit<CreateOptions, 'force' | 'dedup'>,
  dedup: DedupSettings,
  scratch: number,
  sessions: Session[],
  state: string,
  finish?: (b: Buffer) => void,
): Promise<DedupBase> {
  const dir = mkdtempSync(join(tmpdir(), 'qdedup-fuzz-'));
  try {
    const p = join(dir, 'base.qcow2');
    await createImage(p, { ...o, dedup, force: true });
    const mem = new MemFile(p, readFileSync(p));
    const cs = 2 ** o.clusterBits;
    const hasher = createHasher(dedup.algorithm);
    const contents = new Map<string, Buffer>();
    for (const s of sessions) {
      const img = await openForWrite(p, { file: mem, dedup: s.dedup, compress: s.compress });
      await s.run({
        put: async (first, ids) => {
          const data = Buffer.concat(ids.map((i) => contentCluster(i, cs)));
          await img.write(first * cs, data);
          for (let k = 0; k < ids.length; k++) {
            const c = data.subarray(k * cs, (k + 1) * cs);
            contents.set(hasher.hash(c).toString('hex'), Buffer.from(c));
          }
        },
        zero: (first, clusters) => img.writeZeroes(first * cs, clusters * cs),
      });
      if (s.end === 'abandon') {
        await img.flush();
        await img.abandon();
      } else {
        await img.close();
      }
    }
    const bytes = mem.bytes();
    finish?.(bytes);
    const compress = !!dedup.compress || sessions.some((s) => s.compress);
    return { name, bytes, path: `${NOWHERE}/${name}.qcow2`, clusterSize: cs, algorithm: dedup.algorithm, contents, scratch, state, compress };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const range = (from: number, n: number, f: (i: number) => number = (i) => i): number[] => Array.from({ length: n }, (_, k) => f(from + k));

/** The sessions of the 4 KiB-cluster bases: 14 contents over 24 clusters, freezes of 8-slot stores, rewrites, zeroes. */
function sessions4k(): Session[] {
  return [
    {
      run: (w) =>
        w.put(
          0,
          range(0, 24, (c) => (c < 14 ? c : (c * 5) % 14)),
        ),
    },
    {
      run: async (w) => {
        await w.put(40, range(100, 10));
        await w.put(0, range(200, 5));
        await w.zero(6, 2);
      },
    },
    {
      run: async (w) => {
        await w.put(100, [(20 * 5) % 14]);
        await w.put(101, range(300, 3));
      },
    },
  ];
}

/** The valid dedup images dedup mutants start from (deterministic). */
export async function loadDedupBases(): Promise<DedupBase[]> {
  const v3 = { version: 3 as const, lazyRefcounts: false };
  const out: DedupBase[] = [];
  out.push(
    await madeDedup(
      'dedup-sha256-4k-o1-max2-j512',
      { size: 1 << 20, clusterBits: 12, refcountOrder: 4, ...v3 },
      { algorithm: 'sha256', verify: false, maxIncarnations: 2, order: 1, journalBlockSize: 512 },
      768 << 10,
      sessions4k(),
      'trusted',
    ),
  );
  out.push(
    await madeDedup(
      'dedup-blake3-4k-o3-verify-rc4',
      { size: 1 << 20, clusterBits: 12, refcountOrder: 2, ...v3 },
      { algorithm: 'blake3', verify: true, maxIncarnations: 0, order: 3, journalBlockSize: 4096 },
      768 << 10,
      [
        // One content 10 times: past the 4-bit refcount cap (7), later copies get clusters of their own.
        {
          run: (w) =>
            w.put(
              0,
              range(0, 40, (c) => (c % 4 === 0 ? 500 : 500 + c)),
            ),
        },
        {
          run: async (w) => {
            await w.put(1, range(600, 8));
            await w.put(60, [509, 509, 509]);
            await w.zero(12, 1);
          },
        },
      ],
      'trusted',
    ),
  );
  out.push(
    await madeDedup(
      'dedup-sha3-512-o2-max3-j512',
      { size: 256 << 10, clusterBits: 9, refcountOrder: 4, ...v3 },
      { algorithm: 'sha3-256', verify: false, maxIncarnations: 3, order: 2, journalBlockSize: 512 },
      192 << 10,
      [
        {
          run: (w) =>
            w.put(
              0,
              range(0, 60, (c) => 700 + (c % 25)),
            ),
        },
        {
          run: async (w) => {
            await w.put(0, range(800, 10));
            await w.zero(20, 4);
          },
        },
        { run: (w) => w.put(200, range(850, 20)) },
      ],
      'trusted',
    ),
  );
  out.push(
    await madeDedup(
      'dedup-sha256-64k-o1',
      { size: 2 << 20, clusterBits: 16, refcountOrder: 4, ...v3 },
      { algorithm: 'sha256', verify: false, maxIncarnations: 0, order: 1, journalBlockSize: 4096 },
      1536 << 10,
      [
        {
          run: (w) =>
            w.put(
              0,
              range(0, 10, (c) => 900 + (c % 6)),
            ),
        },
        { run: (w) => w.put(0, range(950, 2)) },
      ],
      'trusted',
    ),
  );
  // A session that set the dirty flag and never closed: the next writer must start afresh.
  out.push(
    await madeDedup(
      'dedup-sha256-4k-dirty',
      { size: 1 << 20, clusterBits: 12, refcountOrder: 4, ...v3 },
      { algorithm: 'sha256', verify: false, maxIncarnations: 2, order: 1, journalBlockSize: 512 },
      768 << 10,
      [...sessions4k(), { run: (w) => w.put(120, range(400, 5)), end: 'abandon' }],
      'dirty',
    ),
  );
  // A writer that does not deduplicate rewrote held clusters (they keep only the holder's
  // reference), then cleared bit 60, as qemu-io does: the next writer releases the orphans.
  out.push(
    await madeDedup(
      'dedup-sha256-4k-foreign',
      { size: 1 << 20, clusterBits: 12, refcountOrder: 4, ...v3 },
      { algorithm: 'sha256', verify: false, maxIncarnations: 2, order: 1, journalBlockSize: 512 },
      768 << 10,
      [...sessions4k(), { run: (w) => w.put(8, range(450, 5)), dedup: false }],
      'foreign',
      (b) => {
        b.writeBigUInt64BE(b.readBigUInt64BE(88) & ~AUTOCLEAR_DEDUP, 88);
      },
    ),
  );
  return out;
}

const T = (k: number) => TEXT + k;
const N = (k: number) => NOISE + k;

/**
 * The sessions of the compressed 4 KiB bases: -c writes of text copies packed byte-tight (runs
 * cross host clusters), small copies, whole noise clusters and repeats in one batch; copies of
 * indexed contents from disk (hits on streams); zeroes and overwrites that release copies, and a
 * run whose every guest is overwritten (its clusters freed, their hashes deleted first); a
 * session without -c that links duplicates to compressed copies.
 */
function sessionsCompressed4k(): Session[] {
  return [
    { compress: true, run: (w) => w.put(0, [T(0), T(1), 1000, T(2), 1001, T(0), T(3), N(0), 1000, T(1), T(4), T(5), 1002, T(2), N(0), T(6)]) },
    {
      compress: true,
      run: async (w) => {
        await w.put(40, [T(0), T(7), 1003, T(8), T(3), N(1)]);
        await w.put(6, [1004]);
        await w.zero(10, 2);
      },
    },
    { compress: true, run: (w) => w.put(60, [T(10), T(11), T(12), T(13)]) },
    { compress: true, run: (w) => w.put(60, [1005, 1006, 1007, 1008]) },
    {
      run: async (w) => {
        await w.put(80, [T(4), 1001, T(7), 1009]);
        await w.put(3, [1010]);
      },
    },
  ];
}

/**
 * The compressed dedup images compressed dedup mutants start from (deterministic): dedup
 * images whose unique clusters were written as framed deflate streams (docs/DESIGN.md
 * "Compressed clusters"), with index entries naming streams in journals and incarnations.
 */
export async function loadCompressedDedupBases(): Promise<DedupBase[]> {
  const v3 = { version: 3 as const, lazyRefcounts: false };
  const out: DedupBase[] = [];
  const small = { algorithm: 'sha256' as const, verify: false, maxIncarnations: 2, order: 1, journalBlockSize: 512 };
  out.push(
    await madeDedup(
      'cdedup-sha256-4k-o1-max2-j512',
      { size: 1 << 20, clusterBits: 12, refcountOrder: 4, ...v3 },
      small,
      768 << 10,
      sessionsCompressed4k(),
      'trusted',
    ),
  );
  // compression=on (every write compresses), verify on, 4-bit refcounts: one text content 10
  // times, past the cap (7): later copies get streams of their own.
  out.push(
    await madeDedup(
      'cdedup-blake3-4k-o3-verify-rc4-on',
      { size: 1 << 20, clusterBits: 12, refcountOrder: 2, ...v3 },
      { algorithm: 'blake3', verify: true, compress: true, maxIncarnations: 0, order: 3, journalBlockSize: 4096 },
      768 << 10,
      [
        {
          run: (w) =>
            w.put(
              0,
              range(0, 30, (c) => (c % 3 === 0 ? T(20) : c % 3 === 1 ? 1100 + c : T(21 + (c % 5)))),
            ),
        },
        {
          run: async (w) => {
            await w.put(1, [N(2), T(30), 1200]);
            await w.put(40, [T(20), T(20), T(22)]);
            await w.zero(12, 1);
          },
        },
      ],
      'trusted',
    ),
  );
  // 512-byte clusters: every stream is a few sectors, one-bit sector counts in descriptors.
  out.push(
    await madeDedup(
      'cdedup-sha3-512-o2-max3-j512',
      { size: 256 << 10, clusterBits: 9, refcountOrder: 4, ...v3 },
      { algorithm: 'sha3-256', verify: false, maxIncarnations: 3, order: 2, journalBlockSize: 512 },
      192 << 10,
      [
        {
          compress: true,
          run: (w) =>
            w.put(
              0,
              range(0, 40, (c) => (c % 4 === 3 ? T(40 + (c % 7)) : 1300 + (c % 15))),
            ),
        },
        {
          compress: true,
          run: async (w) => {
            await w.put(0, range(1400, 8));
            await w.zero(20, 4);
          },
        },
        { run: (w) => w.put(200, [1301, 1302, T(41), 1450]) },
      ],
      'trusted',
    ),
  );
  // A writer that does not deduplicate rewrote guests of compressed copies (their run clusters
  // keep the holder's reference and the other copies'), then cleared bit 60.
  out.push(
    await madeDedup(
      'cdedup-sha256-4k-foreign',
      { size: 1 << 20, clusterBits: 12, refcountOrder: 4, ...v3 },
      small,
      768 << 10,
      [...sessionsCompressed4k(), { run: (w) => w.put(1, [1020, 1021, 1022, 1023]), dedup: false }],
      'foreign',
      (b) => {
        b.writeBigUInt64BE(b.readBigUInt64BE(88) & ~AUTOCLEAR_DEDUP, 88);
      },
    ),
  );
  return out;
}

// ---------------------------------------------------------------- dedup structure map

type DedupKind = 'dedup-ext' | 'dedup-config' | 'journal' | 'incarnation' | 'holder';
export const DEDUP_KINDS: readonly DedupKind[] = ['dedup-ext', 'dedup-config', 'journal', 'incarnation', 'holder'];

/** How a field's new values are drawn. */
type Role = 'plain' | 'offset' | 'host' | 'holder-entry' | 'count' | 'seq' | 'flags' | 'crc';

/** A checksum over [from, to) stored as a u32 at `at`. */
interface Crc {
  from: number;
  to: number;
  at: number;
}

interface DedupField {
  kind: DedupKind;
  off: number;
  width: 1 | 2 | 4 | 8;
  what: string;
  role: Role;
  crc?: Crc;
}

/** A 48-byte hash entry (journal entry payload or incarnation slot). */
interface EntryAt {
  off: number;
  where: string;
  crc?: Crc;
  journal: boolean;
}

export interface DedupLayout {
  clusterSize: number;
  fields: DedupField[];
  byKind: Map<DedupKind, DedupField[]>;
  /** Structure offsets and data clusters: plausible but wrong values for offset fields. */
  offsets: number[];
  /** Host offsets of the active data clusters. */
  dataClusters: number[];
  /** Journal blocks that carry the journal magic. */
  blocks: { off: number; size: number; crc: Crc; journal: number; index: number; written: boolean }[];
  entries: EntryAt[];
  incarnations: { off: number; slots: number; tableOffset: number; bytes: number }[];
  config: { off: number; size: number; crc: Crc; incarnations: number; limbo: number };
  extOff: number;
  holder: { l1Off: number; l1Size: number; tables: { l1Index: number; off: number }[] } | null;
  /** Host offsets of the active L2 tables. */
  l2Tables: number[];
  /** The compressed copies and what names them (null: the base has none). */
  copies: CopyLayout | null;
}

/** A framed deflate stream of a base: its 8-byte header, its first byte, its length. */
interface Stream {
  header: number;
  offset: number;
  length: number;
}

/** The compressed copies of a dedup base (src/dedup/compressed-copies.ts) and the fields that name or hold them. */
export interface CopyLayout {
  streams: Stream[];
  /** Index entries naming a stream (host offset not cluster aligned; the guest field's low bits its length). */
  streamEntries: EntryAt[];
  /** Index entries naming a whole cluster. */
  wholeEntries: EntryAt[];
  /** Compressed L2 entries of the active table (guest clusters mapped to a copy). */
  descriptors: { off: number; entry: bigint; guest: number }[];
  /** Each host cluster a stream touches: its refcount entry and its holder L2 entry (-1: none). */
  clusters: { cluster: number; refcount: RefcountAt | null; holder: number }[];
  refcountBits: number;
}

/** Where the refcount of one cluster is: the byte, and for refcounts under 8 bits the bit shift in it. */
interface RefcountAt {
  off: number;
  width: 1 | 2 | 4 | 8;
  shift: number;
}

const OFFSET_MASK_N = 0x00ff_ffff_ffff_fe00n;

/** Walks a valid dedup base and lists every field of its dedup structures. */
export function mapDedup(b: Buffer): DedupLayout {
  const cs = 2 ** u32(b, 20);
  const fields: DedupField[] = [];
  const add = (kind: DedupKind, off: number, width: DedupField['width'], what: string, role: Role = 'plain', crc?: Crc) => {
    if (off >= 0 && off + width <= b.length) fields.push({ kind, off, width, what, role, crc });
  };
  // The extension.
  const extOff = findDedupExtension(b);
  if (extOff < 0) throw new Error('mapDedup: no dedup extension');
  const ext = decodeDedupExtension(b.subarray(extOff, extOff + 48), cs);
  for (const [o, w, what, role] of [
    [0, 1, 'version'],
    [1, 1, 'hash algorithm'],
    [2, 1, 'flags', 'flags'],
    [3, 1, 'store order'],
    [4, 4, 'journal block size'],
    [8, 4, 'maximum incarnations', 'count'],
    [12, 4, 'configuration area size', 'count'],
    [16, 8, 'configuration area offset', 'offset'],
    [24, 8, 'reserved+24'],
    [32, 8, 'reserved+32'],
    [40, 8, 'reserved+40'],
  ] as [number, DedupField['width'], string, Role?][])
    add('dedup-ext', extOff + o, w, `dedup extension ${what}`, role ?? 'plain');

  // The configuration area.
  const cfgOff = ext.configOffset;
  const cfgCrc: Crc = { from: cfgOff + 8, to: cfgOff + ext.configBytes, at: cfgOff + 4 };
  const config = decodeDedupConfig(b.subarray(cfgOff, cfgOff + ext.configBytes), cfgOff, cs);
  const cfg = (o: number, w: DedupField['width'], what: string, role: Role = 'plain') =>
    add('dedup-config', cfgOff + o, w, `config ${what}`, role, role === 'crc' ? undefined : cfgCrc);
  cfg(0, 4, 'magic');
  cfg(4, 4, 'crc32', 'crc');
  cfg(8, 4, 'incarnation count', 'count');
  cfg(12, 4, 'limbo count', 'count');
  cfg(16, 1, 'current journal');
  cfg(17, 1, 'reserved+17');
  cfg(20, 4, 'reserved+20');
  for (const j of [0, 1]) {
    const at = 24 + j * 24;
    cfg(at, 8, `journal ${j} offset`, 'offset');
    cfg(at + 8, 4, `journal ${j} blocks`, 'count');
    cfg(at + 12, 4, `journal ${j} blocks written`, 'count');
    cfg(at + 16, 8, `journal ${j} start sequence`, 'seq');
  }
  let pos = 72;
  config.incarnations.forEach((_, k) => {
    cfg(pos, 8, `incarnation ${k} offset`, 'offset');
    cfg(pos + 8, 4, `incarnation ${k} used slots`, 'count');
    cfg(pos + 12, 4, `incarnation ${k} reserved+12`);
    cfg(pos + 16, 8, `incarnation ${k} generation`, 'seq');
    cfg(pos + 24, 8, `incarnation ${k} reserved+24`);
    pos += 32;
  });
  config.limbo.forEach((_, k) => {
    cfg(pos, 8, `limbo ${k} offset`, 'offset');
    cfg(pos + 8, 4, `limbo ${k} clusters`, 'count');
    cfg(pos + 12, 4, `limbo ${k} reserved`);
    pos += 16;
  });
  if (pos + 8 <= ext.configBytes) cfg(pos, 8, 'first byte past the records');

  // Journal blocks: every block with the magic (written, or stale past "blocks written"), and the first without.
  const jbs = ext.journalBlockSize;
  const blocks: DedupLayout['blocks'] = [];
  const entries: EntryAt[] = [];
  config.journals.forEach((d, j) => {
    for (let i = 0; i < d.blocks; i++) {
      const off = d.offset + i * jbs;
      if (off + jbs > b.length) break;
      const crc: Crc = { from: off + 8, to: off + jbs, at: off + 4 };
      const label = `journal ${j} block ${i}`;
      if (u32(b, off) !== 0x51444a42) {
        add('journal', off, 4, `${label} (never written) magic`, 'plain', crc);
        add('journal', off + 8, 8, `${label} (never written) sequence`, 'seq', crc);
        break;
      }
      blocks.push({ off, size: jbs, crc, journal: j, index: i, written: i < d.written });
      add('journal', off, 4, `${label} magic`, 'plain', crc);
      add('journal', off + 4, 4, `${label} crc32`, 'crc');
      add('journal', off + 8, 8, `${label} sequence`, 'seq', crc);
      add('journal', off + 16, 2, `${label} entry count`, 'count', crc);
      add('journal', off + 18, 2, `${label} entry bytes`, 'count', crc);
      add('journal', off + 20, 4, `${label} reserved`, 'plain', crc);
      const count = b.readUInt16BE(off + 16);
      for (let e = 0, p = off + 24; e < count && p + 52 <= off + jbs; e++, p += 52) {
        const el = `${label} entry ${e}`;
        add('journal', p, 1, `${el} type`, 'plain', crc);
        add('journal', p + 1, 1, `${el} flags`, 'flags', crc);
        add('journal', p + 2, 2, `${el} payload length`, 'count', crc);
        add('journal', p + 4, 8, `${el} hash[0..7]`, 'plain', crc);
        add('journal', p + 12, 8, `${el} hash[8..15]`, 'plain', crc);
        add('journal', p + 20, 8, `${el} hash[16..23]`, 'plain', crc);
        add('journal', p + 28, 8, `${el} hash[24..31]`, 'plain', crc);
        add('journal', p + 36, 8, `${el} host offset`, 'host', crc);
        add('journal', p + 44, 8, `${el} guest offset`, 'plain', crc);
        entries.push({ off: p + 4, where: el, crc, journal: true });
      }
    }
  });

  // Incarnations: used filter tags and their table slots (plus the first empty slot of each).
  const layout = incarnationLayout(ext.order, cs);
  const incarnations: DedupLayout['incarnations'] = [];
  config.incarnations.forEach((r, k) => {
    incarnations.push({ off: r.offset, slots: layout.slots, tableOffset: layout.tableOffset, bytes: layout.clusters * cs });
    let empty = false;
    for (let s = 0; s < layout.slots; s++) {
      const tagAt = r.offset + s * 2;
      if (tagAt + 2 > b.length) break;
      const tag = b.readUInt16BE(tagAt);
      if (tag === 0 && empty) continue;
      const label = `incarnation ${k} slot ${s}`;
      add('incarnation', tagAt, 2, `${label} filter tag${tag === 0 ? ' (empty)' : ''}`);
      if (tag === 0) {
        empty = true;
        continue;
      }
      const slot = r.offset + layout.tableOffset + s * 48;
      add('incarnation', slot, 8, `${label} hash[0..7]`);
      add('incarnation', slot + 8, 8, `${label} hash[8..15]`);
      add('incarnation', slot + 16, 8, `${label} hash[16..23]`);
      add('incarnation', slot + 24, 8, `${label} hash[24..31]`);
      add('incarnation', slot + 32, 8, `${label} host offset`, 'host');
      add('incarnation', slot + 40, 8, `${label} guest offset`);
      entries.push({ off: slot, where: label, journal: false });
    }
  });

  // The holder snapshot: its table entry, L1 and L2 tables.
  let holder: DedupLayout['holder'] = null;
  const offsets: number[] = [
    cfgOff,
    ...config.journals.map((j) => j.offset),
    ...config.incarnations.map((r) => r.offset),
    ...config.limbo.map((l) => l.offset),
  ];
  let sp = Number(u64(b, 64));
  for (let s = 0; s < u32(b, 60) && sp + 40 <= b.length; s++) {
    const idLen = b.readUInt16BE(sp + 12);
    const nameLen = b.readUInt16BE(sp + 14);
    const extra = u32(b, sp + 36);
    const name = b.subarray(sp + 40 + extra + idLen, sp + 40 + extra + idLen + nameLen).toString('latin1');
    if (name === HOLDER_NAME) {
      const snap = (o: number, w: DedupField['width'], what: string, role: Role = 'plain') => add('holder', sp + o, w, `holder snapshot ${what}`, role);
      snap(0, 8, 'L1 table offset', 'offset');
      snap(8, 4, 'L1 entries', 'count');
      snap(12, 2, 'ID length', 'count');
      snap(14, 2, 'name length', 'count');
      snap(16, 4, 'date (seconds)');
      snap(20, 4, 'date (nanoseconds)');
      snap(24, 8, 'VM clock');
      snap(32, 4, 'VM state size');
      snap(36, 4, 'extra data size', 'count');
      for (let i = 0; i + 8 <= extra && i < 16; i += 8) snap(40 + i, 8, `extra+${i}`);
      snap(40 + extra, 1, 'ID byte 0');
      snap(40 + extra + idLen, 1, 'name byte 0');
      snap(40 + extra + idLen + nameLen - 1, 1, 'name last byte');
      const l1Off = Number(u64(b, sp));
      const l1Size = u32(b, sp + 8);
      const tables: { l1Index: number; off: number }[] = [];
      offsets.push(l1Off);
      for (let i = 0; i < l1Size && l1Off + i * 8 + 8 <= b.length; i++) {
        const e = u64(b, l1Off + i * 8);
        if (!e && i > 1) continue;
        add('holder', l1Off + i * 8, 8, `holder L1[${i}]`, 'offset');
        const l2 = Number(e & OFFSET_MASK_N);
        if (!l2) continue;
        tables.push({ l1Index: i, off: l2 });
        offsets.push(l2);
        for (let j = 0; j < cs / 8 && l2 + j * 8 + 8 <= b.length; j++) {
          const e2 = u64(b, l2 + j * 8);
          if (!e2 && j > 1) continue;
          add('holder', l2 + j * 8, 8, `holder L2@${l2}[${j}] (host cluster ${i * (cs / 8) + j})`, 'holder-entry');
        }
      }
      holder = { l1Off, l1Size, tables };
    }
    sp += Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
  }

  // The active data clusters and L2 tables.
  const dataClusters = new Set<number>();
  const l2Tables: number[] = [];
  const l1Off = Number(u64(b, 40));
  for (let i = 0; i < u32(b, 36); i++) {
    const l2 = Number(u64(b, l1Off + i * 8) & OFFSET_MASK_N);
    if (!l2) continue;
    l2Tables.push(l2);
    for (let j = 0; j < cs / 8; j++) {
      const d = Number(u64(b, l2 + j * 8) & OFFSET_MASK_N);
      if (d && !(u64(b, l2 + j * 8) & (1n << 62n))) dataClusters.add(d);
    }
  }
  offsets.push(...l2Tables, ...dataClusters, l1Off, Number(u64(b, 48)), Number(u64(b, 64)), b.length);
  const byKind = new Map<DedupKind, DedupField[]>();
  for (const f of fields) byKind.set(f.kind, [...(byKind.get(f.kind) ?? []), f]);
  return {
    clusterSize: cs,
    fields,
    byKind,
    offsets: offsets.filter((o) => o > 0),
    dataClusters: [...dataClusters],
    blocks,
    entries,
    incarnations,
    config: { off: cfgOff, size: ext.configBytes, crc: cfgCrc, incarnations: config.incarnations.length, limbo: config.limbo.length },
    extOff,
    holder,
    l2Tables,
    copies: mapCopies(b, cs, entries, holder),
  };
}

/** The refcount entry of host cluster `c`, or null when its refcount block is not in the file. */
function refcountAt(b: Buffer, cs: number, c: number): RefcountAt | null {
  const order = u32(b, 4) === 3 ? u32(b, 96) : 4;
  const bits = 2 ** order;
  const perBlock = (cs * 8) / bits;
  const block = Number(u64(b, Number(u64(b, 48)) + Math.floor(c / perBlock) * 8) & OFFSET_MASK_N);
  if (!block || block + cs > b.length) return null;
  const bit = (c % perBlock) * bits;
  return { off: block + Math.floor(bit / 8), width: bits <= 8 ? 1 : ((bits / 8) as 2 | 4 | 8), shift: bits < 8 ? bit % 8 : 0 };
}

/** Reads (bits < 8: the masked bits of) a refcount entry. */
function readRefcount(b: Buffer, r: RefcountAt, bits: number): bigint {
  const v = readField(b, r);
  return bits < 8 ? (v >> BigInt(r.shift)) & ((1n << BigInt(bits)) - 1n) : v;
}

function writeRefcount(b: Buffer, r: RefcountAt, bits: number, v: bigint): void {
  if (bits >= 8) {
    writeField(b, r, v);
    return;
  }
  const mask = ((1 << bits) - 1) << r.shift;
  b[r.off] = (b[r.off] & ~mask) | ((Number(v & ((1n << BigInt(bits)) - 1n)) << r.shift) & mask);
}

/** Walks the compressed copies of a valid dedup base: frames in the clusters the active compressed entries touch, the entries naming them, their clusters. */
function mapCopies(b: Buffer, cs: number, entries: EntryAt[], holder: DedupLayout['holder']): CopyLayout | null {
  const bits = u32(b, 20);
  const x = BigInt(70 - bits);
  const descriptors: CopyLayout['descriptors'] = [];
  const touched = new Set<number>();
  const l1Off = Number(u64(b, 40));
  for (let i = 0; i < u32(b, 36); i++) {
    const l2 = Number(u64(b, l1Off + i * 8) & OFFSET_MASK_N);
    if (!l2) continue;
    for (let j = 0; j < cs / 8; j++) {
      const e = u64(b, l2 + j * 8);
      if (!(e & (1n << 62n))) continue;
      const off = Number(e & ((1n << x) - 1n));
      const sectors = Number((e >> x) & ((1n << (62n - x)) - 1n)) + 1;
      descriptors.push({ off: l2 + j * 8, entry: e, guest: i * (cs / 8) + j });
      for (let c = Math.floor(off / cs); c <= Math.floor((off + sectors * 512 - (off % 512) - 1) / cs); c++) touched.add(c);
    }
  }
  if (!descriptors.length) return null;
  const found = new Map<number, Stream>();
  for (const c of touched) {
    if ((c + 1) * cs > b.length) continue;
    for (const s of framedStreamsTouching(b.subarray(c * cs, (c + 1) * cs), c * cs, cs, c))
      if (s.offset + s.length <= b.length) found.set(s.offset, { header: s.offset - STREAM_HEADER_BYTES, offset: s.offset, length: s.length });
  }
  const streams = [...found.values()].sort((p, q) => p.offset - q.offset);
  const runClusters = new Set<number>();
  for (const s of streams) for (let c = Math.floor(s.offset / cs); c <= Math.floor((s.offset + s.length - 1) / cs); c++) runClusters.add(c);
  const per = cs / 8;
  const clusters = [...runClusters]
    .sort((p, q) => p - q)
    .map((c) => {
      const t = holder?.tables.find((t) => t.l1Index === Math.floor(c / per));
      return { cluster: c, refcount: refcountAt(b, cs, c), holder: t ? t.off + (c % per) * 8 : -1 };
    });
  const isStream = (e: EntryAt) => Number(u64(b, e.off + 32)) % cs !== 0;
  return {
    streams,
    streamEntries: entries.filter(isStream),
    wholeEntries: entries.filter((e) => !isStream(e) && u64(b, e.off + 32) !== 0n),
    descriptors,
    clusters,
    refcountBits: 2 ** (u32(b, 4) === 3 ? u32(b, 96) : 4),
  };
}

// ---------------------------------------------------------------- dedup mutation

function dedupValue(rng: Rng, f: DedupField, old: bigint, d: DedupLayout, fileLen: number): bigint {
  const cs = BigInt(d.clusterSize);
  const generic = () =>
    newValue(
      rng,
      { kind: 'ext', off: f.off, width: f.width, what: f.what },
      old,
      { clusterSize: d.clusterSize, fields: [], offsets: d.offsets, compressed: [] },
      fileLen,
    );
  const r = rng.int(10);
  switch (f.role) {
    case 'host':
      // Another data cluster (held or not): the mutation that could link wrong data.
      if (r < 5 && d.dataClusters.length) return BigInt(rng.pick(d.dataClusters));
      if (r < 6) return old + cs * BigInt(rng.pick([-1, 1]));
      if (r < 7) return BigInt(rng.pick(d.offsets));
      if (r < 8) return 0n;
      return generic();
    case 'holder-entry':
      // Not the identity (another cluster), flag bits (COPIED, zero, compressed), unaligned, cleared.
      switch (r) {
        case 0:
        case 1:
          return d.dataClusters.length ? BigInt(rng.pick(d.dataClusters)) : 0n;
        case 2:
          return old | (1n << 63n);
        case 3:
          return old | 1n;
        case 4:
          return old | (1n << 62n);
        case 5:
          return old ? old + 512n : 0n;
        case 6:
          return 0n;
        default:
          return generic();
      }
    case 'offset':
      if (r < 3) return BigInt(rng.pick(d.offsets));
      if (r < 5) return old + cs * BigInt(rng.pick([-1, 1, 2]));
      if (r < 6) return old + 512n;
      if (r < 7) return BigInt(Math.ceil(fileLen / d.clusterSize) * d.clusterSize);
      return generic();
    case 'count':
      if (r < 4) return old + BigInt(rng.pick([-1, 1, -2, 2]));
      if (r < 5) return 0n;
      if (r < 6) return old * 2n;
      return generic();
    case 'seq':
      if (r < 4) return old + BigInt(rng.pick([-1, 1, 2, -2, 1000]));
      return generic();
    case 'flags':
      if (r < 6) return old ^ BigInt(1 << rng.int(8));
      return generic();
    default:
      return generic();
  }
}

/** 'dedup': a mutant of the dedup bases; 'compressed': of the compressed dedup bases (its own seed space), aimed at the copies. */
export type DedupFlavour = 'dedup' | 'compressed';

export interface DedupMutant extends Mutant {
  base: DedupBase;
  /** Hashes (hex) of entries a mutation touched: the write step writes their contents. */
  targets: string[];
  /** Absent: 'dedup'. */
  flavour?: DedupFlavour;
}

/** What a mutation of the compressed copies' structures needs from makeDedupMutant. */
interface CopyMutation {
  rng: Rng;
  bytes: Buffer;
  base: DedupBase;
  d: DedupLayout;
  c: CopyLayout;
  fix: (crc: Crc | undefined, p?: number) => void;
  fixed: (crc: Crc | undefined) => boolean;
  targets: Set<string>;
}

/**
 * One mutation aimed at the compressed copies (docs/DESIGN.md "Compressed clusters"): a frame
 * header (magic, length, position), a stream index entry (host offset, length bits, hash), a
 * whole-cluster entry made to name a stream, a compressed L2 descriptor of a copy (offset,
 * sector count), the deflate bytes (damaged, or another copy's stream put in their place: a
 * valid stream of other content under the entry's hash), the refcount or the holder entry
 * of a cluster a copy touches. The write step then writes the contents of the copies
 * touched (`targets`), with -c or not. Returns what was done, or null (nothing applicable).
 */
function mutateCopy(x: CopyMutation): string | null {
  const { rng, bytes, base, d, c, fix, fixed, targets } = x;
  const cs = d.clusterSize;
  const hex = (v: number | bigint) => `0x${v.toString(16)}`;
  /** The hashes of the entries naming the stream at `offset` in the base (the contents a write would link to it). */
  const target = (offset: number) => {
    for (const e of c.streamEntries) if (Number(u64(base.bytes, e.off + 32)) === offset) targets.add(base.bytes.subarray(e.off, e.off + 32).toString('hex'));
  };
  const crcNote = (e: EntryAt) => (e.crc && fixed(e.crc) ? ' (crc fixed)' : '');
  const st = rng.pick(c.streams);
  const other = rng.pick(c.streams);
  switch (rng.int(12)) {
    case 0: {
      // The frame's magic: a bit flipped or cleared (release no longer finds the copy: I2).
      const how = rng.int(3);
      if (how === 0) bytes[st.header + rng.int(4)] ^= 1 << rng.int(8);
      else if (how === 1) bytes.writeUInt32BE(0, st.header);
      else bytes.writeUInt32BE(STREAM_MAGIC ^ 0x20, st.header);
      target(st.offset);
      return `copy-frame magic of the copy at ${hex(st.offset)} = ${hex(bytes.readUInt32BE(st.header))}`;
    }
    case 1: {
      const v = rng.pick([
        st.length - 1,
        st.length + 1,
        st.length + 8,
        st.length - 8,
        0,
        1,
        cs - 1,
        cs,
        cs + 1,
        0xffff_ffff,
        0x8000_0000,
        other.length,
        st.length * 2,
      ]);
      bytes.writeUInt32BE(v >>> 0, st.header + 4);
      target(st.offset);
      return `copy-frame length of the copy at ${hex(st.offset)}: ${st.length} -> ${v >>> 0}`;
    }
    case 2: {
      // The frame elsewhere: moved by a few alignment steps, or a second (false) frame inside
      // another copy's bytes or in a cluster's unused tail, naming bytes that are not a copy.
      const header = Buffer.from(bytes.subarray(st.header, st.header + 8));
      const last = c.streams[c.streams.length - 1];
      const to = rng.pick([
        st.header + 8 * rng.pick([-2, -1, 1, 2]),
        other.offset + 8 * rng.int(Math.max(1, Math.floor(other.length / 8))) - (other.offset % 8),
        Math.ceil((last.offset + last.length) / 8) * 8,
        Math.floor(st.offset / cs) * cs,
      ]);
      if (to < 0 || to + 8 > bytes.length) return null;
      if (rng.chance(0.5)) bytes.fill(0, st.header, st.header + 8);
      header.copy(bytes, to);
      if (rng.chance(0.3)) bytes.writeUInt32BE(other.length, to + 4);
      target(st.offset);
      target(other.offset);
      return `copy-frame header of the copy at ${hex(st.offset)} (length ${st.length}) written at ${hex(to)}`;
    }
    case 3: {
      if (!c.streamEntries.length) return null;
      const e = rng.pick(c.streamEntries);
      const was = u64(bytes, e.off + 32);
      const v = rng.pick([
        was + 1n,
        was - 1n,
        was + 8n,
        was - 8n,
        was - BigInt(STREAM_HEADER_BYTES),
        BigInt(other.offset),
        BigInt(other.offset + Math.floor(other.length / 2)),
        (was / BigInt(cs)) * BigInt(cs),
        (was / BigInt(cs) + 1n) * BigInt(cs),
        BigInt(d.dataClusters.length ? rng.pick(d.dataClusters) + 8 + 8 * rng.int(8) : 8),
        BigInt(bytes.length - 8),
        1n << 55n,
      ]);
      bytes.writeBigUInt64BE(BigInt.asUintN(64, v), e.off + 32);
      fix(e.crc, 0.9);
      targets.add(base.bytes.subarray(e.off, e.off + 32).toString('hex'));
      return `copy-entry host offset of ${e.where}: ${hex(was)} -> ${hex(u64(bytes, e.off + 32))}${crcNote(e)}`;
    }
    case 4: {
      if (!c.streamEntries.length) return null;
      const e = rng.pick(c.streamEntries);
      const was = u64(bytes, e.off + 40);
      const guest = (was / BigInt(cs)) * BigInt(cs);
      const len = was % BigInt(cs);
      const v = rng.pick([len + 1n, len - 1n, len + 8n, 0n, 1n, BigInt(cs - 1), BigInt(other.length), len / 2n]);
      bytes.writeBigUInt64BE(BigInt.asUintN(64, guest + (((v % BigInt(cs)) + BigInt(cs)) % BigInt(cs))), e.off + 40);
      fix(e.crc, 0.9);
      targets.add(base.bytes.subarray(e.off, e.off + 32).toString('hex'));
      return `copy-entry length bits of ${e.where}: ${len} -> ${u64(bytes, e.off + 40) % BigInt(cs)}${crcNote(e)}`;
    }
    case 5: {
      // The entry of one copy claims another content: stale or hostile, a hit must inflate and compare.
      if (!c.streamEntries.length) return null;
      const e = rng.pick(c.streamEntries);
      const from = rng.pick([...c.streamEntries, ...c.wholeEntries]);
      if (from === e) return null;
      targets.add(base.bytes.subarray(e.off, e.off + 32).toString('hex'));
      targets.add(base.bytes.subarray(from.off, from.off + 32).toString('hex'));
      bytes.copy(bytes, e.off, from.off, from.off + 32);
      fix(e.crc, 0.9);
      return `copy-entry hash of ${from.where} copied into ${e.where} (a copy)${crcNote(e)}`;
    }
    case 6: {
      // A whole-cluster entry names a copy (its hash kept): an entry that lies about a stream;
      // or a deletion (of a released copy's hash, in the bases) revived as an entry naming one.
      const deletions = d.entries.filter((e) => e.journal && bytes[e.off - 3] & 1);
      const r = rng.int(3);
      const pool = r === 0 && c.wholeEntries.length ? c.wholeEntries : r === 1 && deletions.length ? deletions : c.streamEntries;
      if (!pool.length) return null;
      const e = rng.pick(pool);
      const revived = pool === deletions;
      if (revived) bytes[e.off - 3] &= ~1;
      const guest = (u64(bytes, e.off + 40) / BigInt(cs)) * BigInt(cs);
      bytes.writeBigUInt64BE(BigInt(other.offset), e.off + 32);
      bytes.writeBigUInt64BE(guest + BigInt(other.length), e.off + 40);
      fix(e.crc, 0.9);
      targets.add(base.bytes.subarray(e.off, e.off + 32).toString('hex'));
      target(other.offset);
      return `copy-entry ${e.where}${revived ? ' (a deletion, revived)' : ''} names the copy at ${hex(other.offset)} (length ${other.length})${crcNote(e)}`;
    }
    case 7: {
      // A guest's compressed descriptor: another copy, its frame header, a byte off, or a new offset / sector count.
      const g = rng.pick(c.descriptors);
      const bits = Math.log2(cs);
      const xb = BigInt(70 - bits);
      const was = u64(bytes, g.off);
      const how = rng.int(4);
      let e: bigint;
      if (how === 0) e = mutateCompressed(rng, was, bits, bytes.length);
      else {
        const at = how === 1 ? other.offset : how === 2 ? st.header : Number(was & ((1n << xb) - 1n)) + rng.pick([-1, 1, 512]);
        const len = how === 1 ? other.length : st.length + 8;
        const sectors = BigInt(Math.floor((at + len - 1) / 512) - Math.floor(at / 512));
        e = (was & (3n << 62n)) | ((sectors & ((1n << (62n - xb)) - 1n)) << xb) | (BigInt(Math.max(0, at)) & ((1n << xb) - 1n));
      }
      bytes.writeBigUInt64BE(e, g.off);
      target(Number(was & ((1n << xb) - 1n)));
      target(other.offset);
      return `copy-l2 descriptor of guest cluster ${g.guest}: ${hex(was)} -> ${hex(e)}`;
    }
    case 8: {
      // The deflate bytes: a byte changed, a range zeroed, or the stream's end cut short.
      const how = rng.int(3);
      let what: string;
      if (how === 0) {
        const at = st.offset + rng.pick([0, 1, rng.int(st.length), st.length - 1]);
        bytes[at] ^= 1 + rng.int(255);
        what = `byte ${hex(at)} changed`;
      } else if (how === 1) {
        const from = st.offset + rng.int(st.length);
        const to = Math.min(st.offset + st.length, from + 1 + rng.int(64));
        bytes.fill(0, from, to);
        what = `bytes ${hex(from)}..${hex(to)} zeroed`;
      } else {
        const keep = rng.int(st.length);
        bytes.fill(rng.chance(0.5) ? 0 : 0xff, st.offset + keep, st.offset + st.length);
        what = `cut after ${keep} bytes`;
      }
      target(st.offset);
      return `copy-deflate stream of the copy at ${hex(st.offset)}: ${what}`;
    }
    case 9: {
      // A valid stream of other content under the entry's hash (frame and length kept): only a compare tells.
      const fits = c.streams.filter((o) => o !== st && o.length <= st.length);
      if (!fits.length) return null;
      const o = rng.pick(fits);
      bytes.copy(bytes, st.offset, o.offset, o.offset + o.length);
      target(st.offset);
      target(o.offset);
      return `copy-deflate stream of the copy at ${hex(o.offset)} (${o.length} bytes) written over the copy at ${hex(st.offset)} (${st.length} bytes)`;
    }
    case 10: {
      const r = rng.pick(c.clusters);
      if (!r.refcount) return null;
      const bits = c.refcountBits;
      const max = (1n << BigInt(bits)) - 1n;
      const was = readRefcount(bytes, r.refcount, bits);
      const v = rng.pick([0n, 1n, 2n, was - 1n, was + 1n, max, max / 2n, max / 2n - 1n]);
      writeRefcount(bytes, r.refcount, bits, v < 0n ? 0n : v > max ? max : v);
      for (const s of c.streams) if (Math.floor(s.offset / cs) <= r.cluster && Math.floor((s.offset + s.length - 1) / cs) >= r.cluster) target(s.offset);
      return `copy-refcount of host cluster ${r.cluster} (holds copies): ${was} -> ${readRefcount(bytes, r.refcount, bits)}`;
    }
    default: {
      const r = rng.pick(c.clusters);
      if (r.holder < 0 || r.holder + 8 > bytes.length) return null;
      const was = u64(bytes, r.holder);
      const others = c.clusters.filter((o) => o !== r).map((o) => BigInt(o.cluster * cs));
      const v = rng.pick([0n, was | (1n << 63n), was | (1n << 62n), was | 1n, was + 512n, was + BigInt(cs), ...(others.length ? [rng.pick(others)] : [])]);
      bytes.writeBigUInt64BE(BigInt.asUintN(64, v), r.holder);
      for (const s of c.streams) if (Math.floor(s.offset / cs) <= r.cluster && Math.floor((s.offset + s.length - 1) / cs) >= r.cluster) target(s.offset);
      return `copy-holder entry of host cluster ${r.cluster} (holds copies): ${hex(was)} -> ${hex(u64(bytes, r.holder))}`;
    }
  }
}

/** Builds dedup mutant `seed` (deterministic; its own seed space: the same number as a plain mutant is another mutant). */
export function makeDedupMutant(seed: number, bases: DedupBase[], layouts: Map<Base, DedupLayout>, flavour: DedupFlavour = 'dedup'): DedupMutant {
  const compressed = flavour === 'compressed';
  const rng = new Rng(seed ^ (compressed ? 0x0c0d_ec0d : 0x0ded_0b5e));
  const base = rng.pick(bases);
  const d = layouts.get(base) ?? mapDedup(base.bytes);
  layouts.set(base, d);
  let bytes = Buffer.from(base.bytes);
  /** A truncation is applied last, after the checksums are fixed. */
  let cut = bytes.length;
  const steps: string[] = [];
  const targets = new Set<string>();
  const fixes = new Map<number, Crc>();
  const cs = d.clusterSize;
  const fix = (crc: Crc | undefined, p = 0.75) => {
    if (crc && rng.chance(p)) fixes.set(crc.at, crc);
  };
  const hashAt = (off: number) => bytes.subarray(off, off + 32).toString('hex');
  const n = rng.chance(0.6) ? 1 : 2 + rng.int(2);
  // Compressed dedup mutants: their writes mix -c (on a compression=on base every write compresses).
  const compress = compressed ? rng.chance(0.75) : undefined;
  for (let k = 0; k < n; k++) {
    if (compressed && d.copies && rng.chance(0.65)) {
      const step = mutateCopy({ rng, bytes, base, d, c: d.copies, fix, fixed: (crc) => !!crc && fixes.has(crc.at), targets });
      if (step) steps.push(step);
      continue;
    }
    if (rng.chance(0.68)) {
      const kinds = DEDUP_KINDS.filter((x) => d.byKind.get(x)?.length);
      const f = rng.pick(d.byKind.get(rng.pick(kinds))!);
      const old = readField(bytes, f);
      writeField(bytes, f, dedupValue(rng, f, old, d, bytes.length));
      fix(f.crc);
      const entry = d.entries.find((e) => f.off >= e.off - 4 && f.off < e.off + 48);
      if (entry) targets.add(Buffer.from(base.bytes.subarray(entry.off, entry.off + 32)).toString('hex'));
      steps.push(
        `${f.kind} ${f.what} @${f.off}: 0x${old.toString(16)} -> 0x${readField(bytes, f).toString(16)}${f.crc && fixes.has(f.crc.at) ? ' (crc fixed)' : ''}`,
      );
      continue;
    }
    const op = rng.int(16);
    const jEntries = d.entries.filter((e) => e.journal);
    if (op === 0 && d.blocks.length) {
      const blk = rng.pick(d.blocks);
      bytes.fill(0, blk.off, blk.off + blk.size);
      steps.push(`zero journal ${blk.journal} block ${blk.index}${blk.written ? '' : ' (past blocks written)'}`);
    } else if (op === 1 && d.blocks.length > 1) {
      const a = rng.pick(d.blocks);
      const c = rng.pick(d.blocks);
      bytes.copy(bytes, c.off, a.off, a.off + a.size);
      steps.push(`copy journal ${a.journal} block ${a.index} over journal ${c.journal} block ${c.index}`);
    } else if ((op === 2 || op === 3) && d.entries.length > 1) {
      // Swap two whole entries (journal: with their 4-byte headers): reorders inserts and deletions.
      const a = rng.pick(d.entries);
      const c = rng.pick(d.entries.filter((e) => e.journal === a.journal));
      const w = a.journal ? 52 : 48;
      const at = (e: EntryAt) => (e.journal ? e.off - 4 : e.off);
      const tmp = Buffer.from(bytes.subarray(at(a), at(a) + w));
      bytes.copy(bytes, at(a), at(c), at(c) + w);
      tmp.copy(bytes, at(c));
      fix(a.crc);
      fix(c.crc);
      targets.add(hashAt(a.off));
      targets.add(hashAt(c.off));
      steps.push(`swap ${a.where} and ${c.where}`);
    } else if (op === 4 && d.entries.length > 1) {
      const a = rng.pick(d.entries);
      const c = rng.pick(d.entries);
      bytes.copy(bytes, c.off, a.off, a.off + 32);
      fix(c.crc);
      targets.add(hashAt(c.off));
      steps.push(`hash of ${a.where} copied into ${c.where}`);
    } else if ((op === 5 || op === 6) && d.entries.length) {
      // The entry names another cluster: with verify off, only the holder and the refcount stand in the way.
      const c = rng.pick(d.entries);
      const other =
        rng.chance(0.5) && d.entries.length > 1
          ? bytes.readBigUInt64BE(rng.pick(d.entries).off + 32)
          : BigInt(rng.pick(d.dataClusters.length ? d.dataClusters : d.offsets));
      bytes.writeBigUInt64BE(other, c.off + 32);
      fix(c.crc, 0.9);
      targets.add(hashAt(c.off));
      steps.push(`host offset of ${c.where} = 0x${other.toString(16)}${c.crc && fixes.has(c.crc.at) ? ' (crc fixed)' : ''}`);
    } else if (op === 7 && jEntries.length) {
      const c = rng.pick(jEntries);
      bytes[c.off - 3] ^= 1;
      fix(c.crc, 0.9);
      targets.add(hashAt(c.off));
      steps.push(`flip the deleted flag of ${c.where}`);
    } else if (op === 8 && d.incarnations.length) {
      const inc = rng.pick(d.incarnations);
      const whole = rng.chance(0.3);
      bytes.fill(0, inc.off, Math.min(bytes.length, inc.off + (whole ? inc.bytes : inc.slots * 2)));
      steps.push(`zero incarnation at ${inc.off}${whole ? ' (whole area)' : ' (filter)'}`);
    } else if (op === 9 && d.config.incarnations > 1) {
      const a = d.config.off + 72;
      const c = a + 32 * (1 + rng.int(d.config.incarnations - 1));
      const tmp = Buffer.from(bytes.subarray(a, a + 32));
      bytes.copy(bytes, a, c, c + 32);
      tmp.copy(bytes, c);
      fix(d.config.crc, 0.9);
      steps.push('swap incarnation records 0 and ' + (c - a) / 32);
    } else if (op === 10) {
      const v = bytes.readBigUInt64BE(88) ^ AUTOCLEAR_DEDUP;
      bytes.writeBigUInt64BE(v, 88);
      steps.push(`toggle autoclear bit 60 (now ${v & AUTOCLEAR_DEDUP ? 'set' : 'clear'})`);
    } else if (op === 11) {
      const bit = rng.pick([1, 2]);
      bytes[d.extOff + 2] ^= bit;
      steps.push(`toggle the dedup ${bit === 1 ? 'dirty' : 'verify'} flag`);
    } else if (op === 12 && d.holder?.tables.length) {
      // A bogus hold: the holder claims a cluster (data it does not hold, or metadata) with the identity entry.
      const t = rng.pick(d.holder.tables);
      const per = cs / 8;
      const candidates = [...d.dataClusters, ...d.offsets.filter((o) => o % cs === 0 && o < bytes.length)]
        .map((o) => o / cs)
        .filter((c) => Math.floor(c / per) === t.l1Index);
      if (!candidates.length) continue;
      const c = rng.pick(candidates);
      const was = bytes.readBigUInt64BE(t.off + (c % per) * 8);
      bytes.writeBigUInt64BE(BigInt(c * cs), t.off + (c % per) * 8);
      steps.push(`holder holds host cluster ${c} (entry was 0x${was.toString(16)})`);
    } else if (op === 13 && d.holder?.tables.length) {
      // The holder's L1 entry points at another structure: an active L2 table, a journal, a data cluster, its own L1.
      const t = rng.pick(d.holder.tables);
      const to = rng.pick([...d.l2Tables, ...d.offsets]);
      bytes.writeBigUInt64BE(BigInt(to), d.holder.l1Off + t.l1Index * 8);
      steps.push(`holder L1[${t.l1Index}] = 0x${to.toString(16)} (was 0x${t.off.toString(16)})`);
    } else if (op === 14 && d.config.crc) {
      // Swap the two journal descriptors (the frozen journal becomes the current one).
      const a = d.config.off + 24;
      const tmp = Buffer.from(bytes.subarray(a, a + 24));
      bytes.copy(bytes, a, a + 24, a + 48);
      tmp.copy(bytes, a + 24);
      fix(d.config.crc, 0.9);
      steps.push('swap the journal descriptors');
    } else if (op === 15) {
      const areas = [d.config.off, ...d.blocks.map((x) => x.off), ...d.incarnations.map((x) => x.off)];
      cut = Math.min(cut, bytes.length, rng.pick(areas) + rng.int(cs));
      steps.push(`truncate to ${cut} (inside the dedup store)`);
    }
  }
  for (const crc of fixes.values()) bytes.writeUInt32BE(crc32(bytes.subarray(crc.from, crc.to)), crc.at);
  if (cut < bytes.length) bytes = Buffer.from(bytes.subarray(0, cut));
  if (!steps.length) steps.push('(no mutation applied)');
  const m: DedupMutant = { seed, base, bytes, steps, writeAt: rng.int(1 << 20), zeroAt: rng.int(1 << 20), targets: [...targets] };
  if (compressed) Object.assign(m, { flavour, compress });
  return m;
}

// ---------------------------------------------------------------- running a dedup mutant

export interface DedupOutcome extends Outcome {
  /** judgeStore's verdict on the mutant: 'trusted', 'untrusted', 'ext-refused', 'plain' or 'refused' (no open). */
  trust: string;
  /** The write step's session: 'wrote', or where it stopped. */
  write: string;
  /** Index hits of the write step (links to existing clusters). */
  hits: number;
  /** Index entries the write step compared with the data and found naming other bytes (no link). */
  mismatches: number;
  /**
   * I1 violations: after a successful write, written data that does not read back or other
   * guest data that changed. Each with the context that classifies it.
   */
  wrongData: { what: string; verify: boolean; deepCheckBefore: string; trust: string }[];
  /** check --deep found index entries whose cluster does not hash to them, or lies past the end of the file (before the write). */
  indexLies: boolean;
  /** Guest clusters not written that changed, on host clusters whose refcount was below their references before the write (not asserted). */
  underCounted: number;
}

/** A CheckTarget over an open image. */
function target(img: Image, writable: boolean) {
  return { path: img.path, file: img.file, header: img.header, l1: img.l1, writable };
}

/** A check verdict in one word: 'clean', 'leaks', 'corrupt', 'failed', or 'threw'. */
function verdictOf(c: ImageCheck | null): string {
  if (!c) return 'threw';
  return c.failure !== undefined || c.checkErrors ? 'failed' : c.corruptions ? 'corrupt' : c.leaks ? 'leaks' : 'clean';
}

/** Every guest cluster, read one by one: null where the read fails. */
async function readClusters(img: Image): Promise<(Buffer | null)[]> {
  const cs = img.clusterSize;
  const out: (Buffer | null)[] = [];
  for (let c = 0; c * cs < img.size && c < 4096; c++) {
    try {
      out.push(await img.read(c * cs, Math.min(cs, img.size - c * cs)));
    } catch (err) {
      if (!(err instanceof QdedupError)) throw err;
      out.push(null);
    }
  }
  return out;
}

let zeros = Buffer.alloc(0);

/** True when every byte of `b` is zero (one memcmp). */
function allZero(b: Buffer): boolean {
  if (zeros.length < b.length) zeros = Buffer.alloc(b.length);
  return zeros.subarray(0, b.length).equals(b);
}

/** Guest cluster `c`'s L2 entry, for reports: 'normal 0x…', 'compressed 0x… (+N)', 'zero', …; with the read's error when it fails. */
async function entryText(img: Image, c: number): Promise<string> {
  try {
    const e = await img.entry(c);
    const where =
      e.kind === 'normal' ? ` 0x${e.hostOffset.toString(16)}` : e.kind === 'compressed' ? ` 0x${e.compressedOffset.toString(16)} (+${e.compressedLength})` : '';
    let error = '';
    await img.read(c * img.clusterSize, img.clusterSize).catch((err: Error) => {
      error = `: ${err.message}`;
    });
    return `${e.kind}${where}${error}`;
  } catch (err) {
    return `entry unreadable: ${(err as Error).message}`;
  }
}

/** The host clusters the pre-write check found with a refcount below their references ("ERROR cluster N refcount=R reference=F"). */
function underCounted(c: ImageCheck | null): Set<number> {
  const out = new Set<number>();
  for (const x of c?.messages ?? []) {
    const r = /^ERROR cluster (\d+) refcount=(\d+) reference=(\d+)/.exec(x);
    if (r && Number(r[2]) < Number(r[3])) out.add(Number(r[1]));
  }
  return out;
}

/** The host clusters guest cluster `c` of mutant `m` (before any write) reads from; [] when unknown. */
async function hostClustersOf(m: DedupMutant, c: number, deadline: number): Promise<number[]> {
  const img = await Image.open(m.base.path, { file: new GuardFile(m.base.path, m.bytes, deadline, 'dedup host clusters'), backing: false });
  try {
    const e = await img.entry(c);
    const cs = img.clusterSize;
    if (e.kind === 'normal') return [Math.floor(e.hostOffset / cs)];
    if (e.kind !== 'compressed') return [];
    const [first, last] = compressedClusterSpan(e, img.clusterBits);
    return Array.from({ length: Math.min(last - first + 1, 4) }, (_, k) => first + k);
  } catch {
    return [];
  } finally {
    await img.close();
  }
}

/** Which known content `buf` is (for reports). */
function nameContent(base: DedupBase, buf: Buffer | null): string {
  if (!buf) return 'unreadable';
  if (allZero(buf)) return 'zeros';
  const h = createHasher(base.algorithm).hash(buf).toString('hex');
  return base.contents.has(h) ? `content ${h.slice(0, 12)}…` : `unknown bytes ${buf.subarray(0, 8).toString('hex')}…`;
}

interface WritePlan {
  /** Whole-cluster or partial writes, and zeroed clusters, in order. */
  ops: ({ at: number; data: Buffer } | { zero: number })[];
}

/** The write step's operations: copies of indexed contents (mutated entries' first), a unique cluster, a rewrite, a partial write, a zeroed cluster. */
function planWrites(m: DedupMutant, before: (Buffer | null)[], rng: Rng, clusters: number): WritePlan {
  const base = m.base;
  const cs = base.clusterSize;
  const known = [...base.contents.entries()];
  const picks: Buffer[] = [];
  for (const t of m.targets.slice(0, 4)) {
    const c = base.contents.get(t);
    if (c) picks.push(c);
  }
  for (let i = 0; i < 3; i++) picks.push(rng.pick(known)[1]);
  const ops: WritePlan['ops'] = [];
  let s = Math.floor(base.scratch / cs);
  const lastScratch = clusters - 1;
  // Copies in one write (a batch: a repeated content inside it takes the pending-miss path).
  if (rng.chance(0.3)) picks.push(picks[0]);
  const n = Math.min(picks.length, lastScratch - s - 2);
  ops.push({ at: s * cs, data: Buffer.concat(picks.slice(0, n)) });
  s += n;
  ops.push({ at: s * cs, data: uniqueCluster(0x7000 + (m.seed & 0xfff), cs) });
  s++;
  const readable = before.map((b, c) => (b && c * cs < base.scratch && !allZero(b) ? c : -1)).filter((c) => c >= 0);
  if (readable.length) {
    // A rewrite of a data cluster with another indexed content (drops a reference: release path).
    ops.push({ at: rng.pick(readable) * cs, data: rng.pick(known)[1] });
    const c = rng.pick(readable);
    const off = rng.int(cs / 512) * 512;
    ops.push({ at: c * cs + off, data: pattern(512, m.seed & 0xff) });
    ops.push({ zero: rng.pick(readable) });
  }
  return { ops };
}

/** The dedup hook of `check`, as the CLI builds it. */
function hook(img: Image, deep: boolean): CheckExtension {
  return dedupCheckExtension(img, deep);
}

async function dedupSteps(m: DedupMutant, failures: string[], out: DedupOutcome, deadline: number): Promise<void> {
  const base = m.base;
  const rng = new Rng(m.seed ^ 0x1e55_a9e5);

  // 1. Read-only: every dedup entry point a read-only subcommand uses; the file must not change.
  const ro = new GuardFile(m.base.path, m.bytes, deadline, 'dedup read-only');
  let img: Image | null = null;
  let before: (Buffer | null)[] | null = null;
  let preDeep: ImageCheck | null = null;
  try {
    img = await Image.open(m.base.path, { file: ro, backing: false });
    try {
      const insp = await judgeStore(img, { tolerant: true });
      out.trust = insp.extError ? 'ext-refused' : !insp.ext ? 'plain' : insp.trusted ? 'trusted' : 'untrusted';
      if (insp.reason && (/internal|undefined|NaN/i.test(insp.reason) || insp.reason.includes('\n')))
        failures.push(`judgeStore reason: ${JSON.stringify(insp.reason)}`);
      if (insp.holder) await heldClusters(img, insp.holder, () => {});
      await guestUsage(img);
      await storedRefcounts(img);
    } catch (err) {
      out.trust = 'threw';
      failures.push(...badError(err, 'judgeStore (tolerant) / dedup-stats'));
    }
    for (const o of [{}, { store: false, tolerant: true }]) {
      try {
        await judgeStore(img, o);
      } catch (err) {
        failures.push(...badError(err, `judgeStore ${JSON.stringify(o)}`));
      }
    }
    try {
      const j = await readJournals(img);
      if (/internal|undefined|NaN/i.test(j.indexReason)) failures.push(`readJournals reason: ${j.indexReason}`);
    } catch (err) {
      failures.push(...badError(err, 'readJournals'));
    }
    // check with the dedup hook: the plain steps ran it without --deep.
    try {
      const c = await checkOpenImage(target(img, false), {}, hook(img, true));
      failures.push(...checkMessages(c, 'check --deep'));
      preDeep = c;
      // (A compressed copy's entry lies the same ways: its stream inflates to other bytes, or to none.)
      out.indexLies = c.messages.some((x) =>
        /^ERROR dedup index: .*(cluster content hashes to|cluster is past the end of the file|compressed copy's content hashes to|compressed copy does not inflate|compressed copy inflates to|compressed copy is past the end of the file)/.test(
          x,
        ),
      );
    } catch (err) {
      failures.push(...badError(err, 'check --deep'));
    }
    try {
      before = await readClusters(img);
    } catch (err) {
      failures.push(...badError(err, 'read'));
    }
  } catch (err) {
    failures.push(...badError(err, 'dedup open read-only'));
  } finally {
    await img?.close().catch((err) => failures.push(...badError(err, 'dedup close read-only')));
  }
  failures.push(...ro.problems.map((p) => `dedup read-only: ${p}`));
  if (!ro.bytes().equals(m.bytes)) failures.push('dedup read-only steps changed the file');

  // 2. Read-write: attach, write copies of indexed contents and more, close; then I1.
  const rw = new GuardFile(m.base.path, m.bytes, deadline, 'dedup write');
  let wimg: Image | null = null;
  let verify = false;
  const cs = base.clusterSize;
  const want = before ? before.map((b) => (b ? Buffer.from(b) : null)) : null;
  const written = new Set<number>();
  out.write = 'refused at open';
  try {
    wimg = await quiet(() => openForWrite(m.base.path, { file: rw, backing: false, compress: m.compress }));
    if (dedupOf(wimg)) {
      verify = dedupOf(wimg)!.ext.verify;
      const said = dedupOf(wimg)!.notice !== null;
      if (out.trust === 'trusted' && said) failures.push(`judgeStore trusts the store but the writable open says: ${dedupOf(wimg)!.notice}`);
      if (out.trust === 'untrusted' && !said) failures.push('judgeStore does not trust the store but the writable open gave no notice');
      if (said && !/^dedup index not trusted: .+; starting a fresh index/.test(dedupOf(wimg)!.notice!)) failures.push(`notice: ${dedupOf(wimg)!.notice}`);
    }
    out.write = 'failed';
    if (want && wimg.size >= 16 * cs) {
      const plan = planWrites(m, before!, rng, want.length);
      for (const op of plan.ops) {
        if ('zero' in op) {
          await wimg.writeZeroes(op.zero * cs, cs);
          want[op.zero] = Buffer.alloc(cs);
          written.add(op.zero);
          continue;
        }
        await wimg.write(op.at, op.data);
        for (let p = 0; p < op.data.length; ) {
          const c = Math.floor((op.at + p) / cs);
          const inC = (op.at + p) % cs;
          const len = Math.min(cs - inC, op.data.length - p);
          if (want[c]) op.data.copy(want[c]!, inC, p, p + len);
          else if (len === cs) want[c] = Buffer.from(op.data.subarray(p, p + len));
          written.add(c);
          p += len;
        }
      }
    }
    out.hits = dedupOf(wimg)?.counters.hits ?? 0;
    out.mismatches = dedupOf(wimg)?.counters.mismatches ?? 0;
    await wimg.close();
    wimg = null;
    out.write = 'wrote';
  } catch (err) {
    failures.push(...badError(err, 'dedup write'));
  } finally {
    await wimg?.abandon().catch(() => {});
  }
  failures.push(...rw.problems.map((p) => `dedup write: ${p}`));
  if (out.write === 'wrote' && want) {
    const after = new GuardFile(m.base.path, rw.bytes(), deadline, 'dedup write-verify');
    let v: Image | null = null;
    try {
      v = await Image.open(m.base.path, { file: after, backing: false });
      const got = await readClusters(v);
      const bad: string[] = [];
      const under = underCounted(preDeep);
      for (let c = 0; c < want.length; c++) {
        if (!want[c]) continue;
        if (got[c] && got[c]!.equals(want[c]!)) continue;
        // A refcount below its references is QCOW2 corruption no writer sees (QEMU neither): the
        // cluster is freed or taken for new data while guests still use it. Those guests' data
        // is not asserted (written data still is).
        if (under.size && !written.has(c) && (await hostClustersOf(m, c, deadline)).some((h) => under.has(h))) {
          out.underCounted++;
          continue;
        }
        bad.push(
          `guest cluster ${c} (${written.has(c) ? 'written' : 'not written'}, ${await entryText(v, c)}): reads ${nameContent(base, got[c])}, expected ${nameContent(base, want[c])}`,
        );
      }
      if (bad.length) {
        out.wrongData.push({
          what: `${bad.length} clusters wrong after the write: ${bad.slice(0, 3).join('; ')}`,
          verify,
          deepCheckBefore: verdictOf(preDeep),
          trust: out.trust,
        });
      }
      // A store the deep check found sound must stay sound through a write.
      if (verdictOf(preDeep) === 'clean' || verdictOf(preDeep) === 'leaks') {
        const c = await checkOpenImage(target(v, false), {}, hook(v, true));
        if (c.corruptions || c.failure !== undefined)
          failures.push(
            `the deep check found no corruption before the write, and after it: ${
              c.failure ??
              c.messages
                .filter((x) => /ERROR/.test(x))
                .slice(0, 2)
                .join(' / ')
            }`,
          );
      }
    } catch (err) {
      failures.push(`dedup write-verify: ${(err as Error).message}`);
    } finally {
      await v?.close().catch(() => {});
    }
  }

  // 3. Repair with the deep dedup hook (check -r all --deep; the plain steps ran check -r all).
  const deepRepair = true;
  const rp = new GuardFile(m.base.path, m.bytes, deadline, 'dedup repair');
  let rimg: Image | null = null;
  let repaired: ImageCheck | null = null;
  try {
    rimg = await Image.open(m.base.path, { file: rp, backing: false });
    repaired = await quiet(() => checkOpenImage(target(rimg!, true), { repair: 'all' }, hook(rimg!, deepRepair)));
    failures.push(...checkMessages(repaired, 'dedup repair'));
  } catch (err) {
    failures.push(...badError(err, 'dedup repair'));
  } finally {
    await rimg?.close().catch((err) => failures.push(...badError(err, 'dedup close repair')));
  }
  failures.push(...rp.problems.map((p) => `dedup repair: ${p}`));
  if (repaired && isClean(repaired)) {
    const again = new GuardFile(m.base.path, rp.bytes(), deadline, 'dedup repair-verify');
    let v: Image | null = null;
    try {
      v = await Image.open(m.base.path, { file: again, backing: false });
      const c = await checkOpenImage(target(v, false), {}, hook(v, deepRepair));
      if (!isClean(c) || c.leaks)
        failures.push(
          `dedup repair${deepRepair ? ' --deep' : ''} reported a clean image but a new check finds: ${c.failure ?? c.messages.slice(0, 2).join(' / ')}`,
        );
      if (before) {
        const now = await readClusters(v);
        const changed = before.findIndex((b, i) => b !== null && !(now[i] && now[i]!.equals(b)));
        if (changed >= 0)
          failures.push(`dedup repair changed guest cluster ${changed}: ${nameContent(base, before[changed])} -> ${nameContent(base, now[changed])}`);
      }
    } catch (err) {
      failures.push(`dedup repair-verify: ${(err as Error).message}`);
    } finally {
      await v?.close().catch(() => {});
    }
    // A repaired image is consistent: a write of indexed contents must read back exactly
    // (after a repair that did not read the clusters, only when the write path verifies).
    const w = new GuardFile(m.base.path, again.bytes(), deadline, 'dedup repair-write');
    let wi: Image | null = null;
    try {
      wi = await quiet(() => openForWrite(m.base.path, { file: w, backing: false, compress: m.compress }));
      const at = base.scratch;
      const data = Buffer.concat([...base.contents.values()].slice(0, 4));
      if (at + data.length <= wi.size) {
        await wi.write(at, data);
        await wi.close();
        wi = null;
        const r = await Image.open(m.base.path, { file: new GuardFile(m.base.path, w.bytes(), deadline, 'dedup repair-write-verify'), backing: false });
        try {
          if (!(await r.read(at, data.length)).equals(data)) {
            out.wrongData.push({
              what: `a write after a clean repair${deepRepair ? ' --deep' : ''} did not read back`,
              verify,
              deepCheckBefore: deepRepair ? 'clean after repair --deep' : 'repaired (not deep)',
              trust: out.trust,
            });
          }
        } finally {
          await r.close();
        }
      }
    } catch (err) {
      // An algorithm number qdedup does not implement is not repaired by check: refused, rightly.
      if (!(err instanceof UnsupportedError)) failures.push(`dedup repair-write: ${(err as Error).message}`);
    } finally {
      await wi?.abandon().catch(() => {});
    }
  }
}

/** Runs the plain steps and the dedup steps on dedup mutant `m` within MUTANT_BOUND_MS; never throws. */
export async function runDedupMutant(m: DedupMutant): Promise<DedupOutcome> {
  const failures: string[] = [];
  const out: DedupOutcome = {
    seed: m.seed,
    failures,
    verdict: 'refused',
    trust: 'refused',
    write: 'not run',
    hits: 0,
    mismatches: 0,
    wrongData: [],
    indexLies: false,
    underCounted: 0,
  };
  // Twice the plain bound: a dedup mutant goes through the plain steps and as many again.
  const bound = 2 * MUTANT_BOUND_MS;
  const deadline = Date.now() + bound;
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<string>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), bound + 500);
  });
  let r: string | undefined = undefined;
  try {
    r = await Promise.race([
      (async () => {
        const plain = await steps(m, failures, deadline, (img) => dedupCheckExtension(img, false));
        await dedupSteps(m, failures, out, deadline);
        out.verdict = `${out.trust}/${plain}`;
        return undefined;
      })(),
      timeout,
    ]);
  } catch (err) {
    failures.push(`harness: ${(err as Error)?.stack ?? err}`);
  } finally {
    clearTimeout(timer);
  }
  if (r === 'timeout') failures.push(`no end within ${bound} ms (Promise.race timeout)`);
  // The plain steps call an image clean after a check without --deep, which cannot see an
  // index that lies (an entry whose cluster hashes otherwise). When the deep check saw the
  // lie, an index error after the write is that lie showing (the release path deletes by the
  // content's hash, so the lying entry outlives its cluster's hold), not damage the write did.
  if (out.indexLies) {
    for (let i = failures.length - 1; i >= 0; i--) if (/^write made a clean image inconsistent: ERROR dedup index: /.test(failures[i])) failures.splice(i, 1);
  }
  const rss = process.memoryUsage().rss;
  if (rss > RSS_BOUND) failures.push(`rss ${rss} above ${RSS_BOUND}`);
  // One line per kind: a deadline passed shows up again at every later I/O.
  out.failures = [...new Set(failures.map((f) => f.replace(/\(\d+ I\/O operations\)/, '(… I/O operations)')))];
  return out;
}

export function describeDedup(m: DedupMutant, o: DedupOutcome): string {
  return [
    `dedup seed ${m.seed} (base ${m.base.name}, ${m.base.state}; QDEDUP_FUZZ_SEED=${m.seed} npm test -- fuzz-images):`,
    ...m.steps.map((s) => `  mutation: ${s}`),
    `  trust ${o.trust}, verdict ${o.verdict}, write ${o.write}, ${o.hits} index hits`,
    ...o.failures.map((f) => `  FAIL ${f}`),
    ...o.wrongData.map((w) => `  WRONG DATA (verify ${w.verify ? 'on' : 'off'}, deep check before: ${w.deepCheckBefore}, store ${w.trust}): ${w.what}`),
  ].join('\n');
}

// ---------------------------------------------------------------- known hazards of a dedup mutant

export interface DedupHazards {
  /** The store would be trusted (bit 60 set, dirty clear, extension and configuration decode). */
  trustedOnDisk: boolean;
  /** The trusted configuration names store areas (journals, incarnations, limbo) far larger than the file. */
  hugeArea: string | null;
  /** A trusted store area overlaps another store area or a cluster the image uses otherwise. */
  overlap: string | null;
  /** An entry of the holder snapshot's L1 table names an L2 table at an offset that is not cluster aligned. */
  holderUnaligned: string | null;
}

/**
 * What a dedup mutant's trusted configuration would make qdedup do that the fuzzer knows to
 * be a reported bug (see the todo tests in fuzz-images.test.ts): store areas far past the end
 * of the file (judgeStore walks every cluster of them), and store areas on top of other
 * structures (qdedup writes journal blocks and incarnations there without the overlap guard).
 * Bounded; never throws.
 */
export function dedupHazards(b: Buffer): DedupHazards {
  const out: DedupHazards = { trustedOnDisk: false, hugeArea: null, overlap: null, holderUnaligned: null };
  try {
    out.holderUnaligned = holderUnaligned(b);
    if (b.length < 112 || u32(b, 4) !== 3) return out;
    const bits = u32(b, 20);
    if (bits < 9 || bits > 21) return out;
    const cs = 2 ** bits;
    const fileClusters = Math.ceil(b.length / cs);
    const extOff = findDedupExtension(b);
    if (extOff < 0 || extOff + 48 > b.length || !(u64(b, 88) & AUTOCLEAR_DEDUP)) return out;
    const ext = decodeDedupExtension(b.subarray(extOff, extOff + 48), cs);
    if (ext.dirty) return out;
    const config = decodeDedupConfig(
      Buffer.concat([
        b.subarray(ext.configOffset, ext.configOffset + ext.configBytes),
        Buffer.alloc(Math.max(0, ext.configOffset + ext.configBytes - b.length)),
      ]).subarray(0, ext.configBytes),
      ext.configOffset,
      cs,
    );
    out.trustedOnDisk = true;
    const inc = incarnationLayout(ext.order, cs);
    const areas: { what: string; first: number; clusters: number }[] = [
      { what: 'configuration area', first: ext.configOffset / cs, clusters: Math.ceil(ext.configBytes / cs) },
      ...config.journals.map((j, i) => ({ what: `journal ${i}`, first: j.offset / cs, clusters: Math.ceil((j.blocks * ext.journalBlockSize) / cs) })),
      ...config.incarnations.map((r, i) => ({ what: `incarnation ${i}`, first: r.offset / cs, clusters: inc.clusters })),
      ...config.limbo.map((l, i) => ({ what: `limbo ${i}`, first: l.offset / cs, clusters: l.clusters })),
    ];
    const total = areas.reduce((n, a) => n + a.clusters, 0);
    if (total > 64 * fileClusters + 65536) {
      out.hugeArea = `store areas of ${total} clusters in a file of ${fileClusters}`;
      return out;
    }
    // The clusters the image uses apart from the store: header, refcount structure, tables, data.
    const used = new Map<number, string>();
    const mark = (first: number, n: number, what: string) => {
      for (let c = first; c < first + n && c < fileClusters; c++) if (!used.has(c)) used.set(c, what);
    };
    const mask = 0x00ff_ffff_ffff_fe00n;
    mark(0, 1, 'header');
    const reft = Number(u64(b, 48)) / cs;
    mark(reft, Math.min(u32(b, 56), 1024), 'refcount table');
    for (let i = 0; i < (Math.min(u32(b, 56), 1024) * cs) / 8 && reft * cs + i * 8 + 8 <= b.length; i++) {
      const rb = Number(u64(b, reft * cs + i * 8) & mask);
      if (rb) mark(rb / cs, 1, 'refcount block');
    }
    const walk = (l1Off: number, l1Size: number, label: string, data = true) => {
      mark(Math.floor(l1Off / cs), Math.ceil((Math.min(l1Size, 1 << 20) * 8) / cs), `${label} L1 table`);
      for (let i = 0; i < l1Size && l1Off + i * 8 + 8 <= b.length; i++) {
        const l2 = Number(u64(b, l1Off + i * 8) & mask);
        if (!l2 || l2 % cs || l2 >= b.length) continue;
        mark(l2 / cs, 1, `${label} L2 table`);
        for (let j = 0; data && j < cs / 8 && l2 + j * 8 + 8 <= b.length; j++) {
          const e = u64(b, l2 + j * 8);
          if (e & (1n << 62n)) continue;
          const d = Number(e & mask);
          if (d && d % cs === 0) mark(d / cs, 1, `${label} data`);
        }
      }
    };
    walk(Number(u64(b, 40)), u32(b, 36), 'active');
    let sp = Number(u64(b, 64));
    for (let s = 0; s < u32(b, 60) && s < 64 && sp + 40 <= b.length; s++) {
      const len = Math.ceil((40 + u32(b, sp + 36) + b.readUInt16BE(sp + 12) + b.readUInt16BE(sp + 14)) / 8) * 8;
      mark(Math.floor(sp / cs), Math.floor((sp + len - 1) / cs) - Math.floor(sp / cs) + 1, 'snapshot table');
      // The holder's "data" is the clusters it holds, the store's among them: only its tables count.
      const nameAt = sp + 40 + u32(b, sp + 36) + b.readUInt16BE(sp + 12);
      const isHolder = nameAt + b.readUInt16BE(sp + 14) <= b.length && b.subarray(nameAt, nameAt + b.readUInt16BE(sp + 14)).toString('latin1') === HOLDER_NAME;
      walk(Number(u64(b, sp)), u32(b, sp + 8), isHolder ? 'holder snapshot' : `snapshot ${s}`, !isHolder);
      sp += len;
    }
    const owner = new Map<number, string>();
    for (const a of areas) {
      for (let c = a.first; c < a.first + a.clusters && c < fileClusters; c++) {
        const other = owner.get(c) ?? used.get(c);
        if (other) {
          out.overlap = `${a.what} (cluster ${c}) overlaps the ${other}`;
          return out;
        }
        owner.set(c, `dedup ${a.what}`);
      }
    }
  } catch {
    // Whatever does not decode is not trusted: no hazard.
  }
  return out;
}

/** The first holder L1 entry naming an unaligned L2 table, or null. Bounded; never throws. */
function holderUnaligned(b: Buffer): string | null {
  try {
    const bits = u32(b, 20);
    if (bits < 9 || bits > 21) return null;
    const cs = 2 ** bits;
    let sp = Number(u64(b, 64));
    for (let s = 0; s < u32(b, 60) && s < 64 && sp + 40 <= b.length; s++) {
      const extra = u32(b, sp + 36);
      const idLen = b.readUInt16BE(sp + 12);
      const nameLen = b.readUInt16BE(sp + 14);
      const at = sp + 40 + extra + idLen;
      if (at + nameLen <= b.length && b.subarray(at, at + nameLen).toString('latin1') === HOLDER_NAME) {
        const l1 = Number(u64(b, sp));
        for (let i = 0; i < Math.min(u32(b, sp + 8), 1 << 20) && l1 + i * 8 + 8 <= b.length; i++) {
          const l2 = Number(u64(b, l1 + i * 8) & 0x00ff_ffff_ffff_fe00n);
          if (l2 % cs) return `holder L1[${i}] names an L2 table at 0x${l2.toString(16)}`;
        }
      }
      sp += Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
    }
  } catch {
    // not decodable: no hazard
  }
  return null;
}
