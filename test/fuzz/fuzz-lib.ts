// Malformed-image fuzzing, in process (issue 4 item 5, BRIEF I4): a seeded mutation
// fuzzer over small valid QCOW2 images held in MemFiles. Each mutant is derived from one
// integer seed alone (base image, mutations, write offset), so `QDEDUP_FUZZ_SEED=S`
// rebuilds exactly the mutant the full run reported.
//
// For each mutant (runMutant):
//   1. read-only: Image.open (backing chain followed) + a bounded read of the guest disk +
//      checkOpenImage without repair; the file's bytes must not change;
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

import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { IoError, QdedupError } from '../../src/errors.ts';
import type { BlockFile } from '../../src/image/block-file.ts';
import { MemFile } from '../../src/image/mem-file.ts';
import { Image } from '../../src/image/image.ts';
import { checkOpenImage, type ImageCheck } from '../../src/image/check.ts';
import { createImage, type CreateOptions } from '../../src/image/create.ts';

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
    const img = await Image.open(p, { file: mem, writable: true });
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
  bases.push(await made('made-v3-64k', { size: 1 << 20, clusterBits: 16, version: 3, refcountOrder: 4, lazyRefcounts: false }, async (img) => {
    await img.write(0, pattern(65536, 1));
    await img.write(3 * 65536 + 512, pattern(4096, 2));
    await img.writeZeroes(5 * 65536, 65536);
  }));
  bases.push(await made('made-v2-512', { size: 256 * 1024, clusterBits: 9, version: 2, refcountOrder: 4, lazyRefcounts: false }, async (img) => {
    await img.write(0, pattern(8192, 3));
    await img.write(200 * 1024, pattern(1024, 4));
  }));
  bases.push(await made('made-v3-4k-rc1', { size: 512 * 1024, clusterBits: 12, version: 3, refcountOrder: 0, lazyRefcounts: false }, async (img) => {
    await img.write(4096, pattern(12288, 5));
    await img.writeZeroes(0, 4096);
  }));
  bases.push(await made('made-v3-1k-rc64', { size: 128 * 1024, clusterBits: 10, version: 3, refcountOrder: 6, lazyRefcounts: true }, async (img) => {
    await img.write(0, pattern(3000, 6));
    await img.write(64 * 1024, pattern(2048, 7));
  }));
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
    [0, 4, 'magic'], [4, 4, 'version'], [8, 8, 'backing_file_offset'], [16, 4, 'backing_file_size'],
    [20, 4, 'cluster_bits'], [24, 8, 'size'], [32, 4, 'crypt_method'], [36, 4, 'l1_size'],
    [40, 8, 'l1_table_offset'], [48, 8, 'refcount_table_offset'], [56, 4, 'refcount_table_clusters'],
    [60, 4, 'nb_snapshots'], [64, 8, 'snapshots_offset'],
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
      [0, 8, 'l1_table_offset'], [8, 4, 'l1_size'], [12, 2, 'id_str_size'], [14, 2, 'name_size'],
      [16, 4, 'date_sec'], [32, 4, 'vm_state_size'], [36, 4, 'extra_data_size'],
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
  0n, 1n, 0x1ffn, 0x200n, 0xffff_ffffn, 0x1_0000_0000n, (1n << 53n) - 1n, (1n << 53n) + 1n, 1n << 53n,
  1n << 55n, (1n << 56n) - 512n, 1n << 56n, 1n << 62n, 1n << 63n, (1n << 64n) - 1n, (1n << 64n) - 512n,
];
const EXTREME32 = [0, 1, 8, 9, 21, 22, 64, 72, 104, 112, 0x7f, 0xff, 0xffff, 0x10000, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];

function readField(b: Buffer, f: Field): bigint {
  switch (f.width) {
    case 1: return BigInt(b[f.off]);
    case 2: return BigInt(b.readUInt16BE(f.off));
    case 4: return BigInt(b.readUInt32BE(f.off));
    default: return b.readBigUInt64BE(f.off);
  }
}

function writeField(b: Buffer, f: Field, v: bigint): void {
  const bits = BigInt(f.width * 8);
  v &= (1n << bits) - 1n;
  switch (f.width) {
    case 1: b[f.off] = Number(v); break;
    case 2: b.writeUInt16BE(Number(v), f.off); break;
    case 4: b.writeUInt32BE(Number(v), f.off); break;
    default: b.writeBigUInt64BE(v, f.off);
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
      case 0: return flags | (BigInt(rng.pick(layout.offsets)) & OFF_MASK);
      case 1: return flags | ((old & OFF_MASK) + BigInt(rng.pick([-1, 1, 2, 1000, -1000])) * cs);
      case 2: return old ^ (1n << BigInt(rng.pick([0, 1, 8, 9, 55, 56, 61, 62, 63])));
      case 3: return flags | BigInt(fileLen + rng.int(4) * layout.clusterSize);
      default: return (old & OFF_MASK) | (old & OFF_MASK) + BigInt(rng.int(512));
    }
  }
  switch (r) {
    case 0: case 1: case 2:
      return bits === 64 ? rng.pick(EXTREME64) : BigInt(rng.pick(EXTREME32));
    case 3: return old ^ (1n << BigInt(rng.int(bits)));
    case 4: return old + BigInt(rng.pick([-1, 1, -8, 8, 512, -512]));
    case 5: return BigInt(rng.pick(layout.offsets));
    case 6: return old + cs * BigInt(rng.pick([-1, 1, 2]));
    case 7: return rng.u64();
    case 8: return old * 2n + 1n;
    case 9: return BigInt(fileLen);
    case 10: return old >> BigInt(1 + rng.int(8));
    default: return (1n << BigInt(bits)) - 1n;
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
    case 0: sectors = sectorsMask; break;
    case 1: sectors = 0n; break;
    case 2: off = BigInt(Math.max(0, fileLen - 1 - rng.int(64))); break;
    case 3: off = offMask; break;
    case 4: off = BigInt(rng.int(fileLen + 4096)); break;
    default: off ^= 1n << BigInt(rng.int(Number(x)));
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
  constructor(readonly path: string, bytes: Buffer, private readonly deadline: number, private readonly label: string) {
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
    if (!(pos >= 0) || (pos < 2 ** 53 && !Number.isInteger(pos)) || !Number.isSafeInteger(length) || length < 0) this.note(`read(${pos}, ${length}): bad arguments`);
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
  if (/internal/i.test(err.message) || err.code === 'EINTERNAL') out.push(`${step}: internal error: ${err.message} ${(err.stack ?? '').split('\n').slice(1, 4).join(' | ')}`);
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

async function steps(m: Mutant, failures: string[], deadline: number): Promise<string> {
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
      pre = await checkOpenImage({ path: m.base.path, file: img.file, header: img.header, l1: img.l1, writable: false }, {});
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
    wimg = await quiet(() => Image.open(m.base.path, { file: rw, writable: true, backing: false }));
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
      const c = await checkOpenImage({ path: m.base.path, file: v.file, header: v.header, l1: v.l1, writable: false }, {});
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
    repaired = await checkOpenImage({ path: m.base.path, file: rimg.file, header: rimg.header, l1: rimg.l1, writable: true }, { repair: 'all' });
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
      const c = await checkOpenImage({ path: m.base.path, file: v.file, header: v.header, l1: v.l1, writable: false }, {});
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
  return [`seed ${m.seed} (base ${m.base.name}; QDEDUP_FUZZ_SEED=${m.seed} npm test -- fuzz):`, ...m.steps.map((s) => `  mutation: ${s}`), ...o.failures.map((f) => `  FAIL ${f}`)].join('\n');
}
