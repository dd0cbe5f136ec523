// The `compressed-import` row of `npm run bench` (scripts/bench.ts): a raw ext4 image of real
// files (mkfs.ext4 -d of --fs-source, default /usr/share, in --fs-size, default 1G; built once and
// cached in --dir) converted by qemu-img convert -c (64 KiB and 4 KiB clusters), qdedup convert -c
// -o dedup=off (compression alone), qdedup convert (dedup alone) and qdedup convert -c (dedup and
// compression: printed "not yet supported" while the CLI refuses it). Medians of alternating runs,
// file sizes (stat and allocated), ratios against qemu-img convert -c, and the dedup ratio.

import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readSync, renameSync, rmSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';

export interface SummaryEntry {
  row: string;
  ratio: number;
  aim: number;
  /** The aim is an upper bound (a size ratio), not a lower one. */
  atMost?: boolean;
  /** Printed instead of the ratio (a row that could not run). */
  note?: string;
}

export interface CompressedContext {
  bin: string;
  /** The run's temporary folder (removed at the end). */
  workDir: string;
  /** --dir: where the filesystem image is cached between runs. */
  cacheDir: string;
  fsSource: string;
  fsSize: number;
  runs: number;
  haveQemu: boolean;
  summary: SummaryEntry[];
  timed: (fn: () => void) => number;
  median: (xs: number[]) => number;
  sh: (cmd: string, argv: string[]) => void;
  fmtSize: (bytes: number) => string;
}

const NOT_YET = 'compressed writes (-c) into a dedup image are not supported yet';
const SIZE_AIM = 0.95;
const SPEED_AIM = 1.5;

/** The cached raw ext4 image of `source` in `size` bytes: built (about a minute for /usr/share) unless already there. */
function filesystemImage(c: CompressedContext): string {
  const source = resolve(c.fsSource);
  if (!existsSync(source) || !statSync(source).isDirectory()) throw new Error(`--fs-source: '${source}' is not a directory`);
  const path = join(c.cacheDir, `qdedup-bench-fs${source.replace(/[^A-Za-z0-9]+/g, '_')}-${c.fsSize}.raw`);
  if (existsSync(path)) {
    console.log(`filesystem image: reusing ${path} (delete it to rebuild)`);
    return path;
  }
  const building = `${path}.building`;
  rmSync(building, { force: true });
  console.log(`filesystem image: mkfs.ext4 -d ${source} into ${c.fmtSize(c.fsSize)} (about a minute for /usr/share)…`);
  const t0 = Date.now();
  const steps: [string, string[]][] = [
    ['truncate', ['-s', String(c.fsSize), building]],
    ['mkfs.ext4', ['-q', '-d', source, building]],
  ];
  for (const [cmd, argv] of steps) {
    const r = spawnSync(cmd, argv, { stdio: ['ignore', 'ignore', 'pipe'] });
    if (r.status === 0) continue;
    rmSync(building, { force: true });
    const du = spawnSync('du', ['-sb', source]).stdout?.toString().split('\t')[0] ?? '?';
    const stderr = r.stderr?.toString().trim() ?? String(r.error);
    const full = /could not allocate|no space|inode/i.test(stderr);
    const hint = full ? `: ${source} (${du} bytes of files) does not fit in --fs-size ${c.fsSize}; give a larger --fs-size` : '';
    throw new Error(`${cmd} ${argv.join(' ')} failed (${r.status ?? r.signal})${hint}\n${stderr}`);
  }
  renameSync(building, path);
  console.log(`filesystem image: built in ${((Date.now() - t0) / 1000).toFixed(0)} s: ${path}`);
  return path;
}

/** Reads the image (into the page cache, as the inputs of the other rows) and counts its non-zero 4 KiB blocks. */
function nonZeroBlocks(path: string): number {
  const fd = openSync(path, 'r');
  const buf = Buffer.alloc(16 * 1024 * 1024);
  const zero = Buffer.alloc(4096);
  let count = 0;
  try {
    for (let n = readSync(fd, buf); n > 0; n = readSync(fd, buf)) {
      for (let off = 0; off < n; off += 4096) if (!buf.subarray(off, Math.min(n, off + 4096)).equals(zero.subarray(0, Math.min(4096, n - off)))) count++;
    }
  } finally {
    closeSync(fd);
  }
  return count;
}

/** Bytes in use according to the filesystem itself (dumpe2fs -h: block count - free blocks). */
function bytesInUse(path: string): number | null {
  const r = spawnSync('dumpe2fs', ['-h', path], { stdio: ['ignore', 'pipe', 'ignore'] });
  const text = r.stdout?.toString() ?? '';
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? Number.NaN);
  const bytes = (field('Block count') - field('Free blocks')) * field('Block size');
  return Number.isFinite(bytes) ? bytes : null;
}

interface Row {
  name: string;
  cmd: string;
  argv: (out: string) => string[];
  /** qemu-img convert does not flush its output: sync it inside the timing, as the other rows do. */
  sync: boolean;
  qemu: boolean;
  times: number[];
  size: number;
  allocated: number;
  unsupported?: boolean;
}

export function compressedImport(c: CompressedContext): void {
  const fs = filesystemImage(c);
  const blocks = nonZeroBlocks(fs);
  const inUse = bytesInUse(fs);
  const mbs = (t: number) => (c.fsSize / t / 1e6).toFixed(0);
  console.log('');
  console.log(
    `compressed import: ext4 image of ${resolve(c.fsSource)}, ${c.fmtSize(c.fsSize)}; in use ${inUse ?? '?'} bytes (dumpe2fs), ${blocks} non-zero 4 KiB blocks (${blocks * 4096} bytes)`,
  );
  const specs: Pick<Row, 'name' | 'cmd' | 'argv'>[] = [
    { name: 'qemu-img convert -c (64 KiB clusters) + sync', cmd: 'qemu-img', argv: (o) => ['convert', '-c', '-f', 'raw', '-O', 'qcow2', fs, o] },
    {
      name: 'qemu-img convert -c -o cluster_size=4096 + sync',
      cmd: 'qemu-img',
      argv: (o) => ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', fs, o],
    },
    { name: 'qdedup convert -c -o dedup=off,cluster_size=4k', cmd: c.bin, argv: (o) => ['convert', '-q', '-o', 'dedup=off,cluster_size=4k', '-c', fs, o] },
    { name: 'qdedup convert (dedup alone, sha256, 4 KiB)', cmd: c.bin, argv: (o) => ['convert', '-q', fs, o] },
    { name: 'qdedup convert -c (dedup + compression)', cmd: c.bin, argv: (o) => ['convert', '-q', '-c', fs, o] },
  ];
  const rows: Row[] = specs.map((r) => ({ ...r, sync: r.cmd === 'qemu-img', qemu: r.cmd === 'qemu-img', times: [], size: 0, allocated: 0 }));
  const [qemu64, , compressedOnly, dedupOnly, both] = rows;
  const out = join(c.workDir, 'compressed.qcow2');
  /** Of the dedup rows, from `qdedup check --output json` of their first image. */
  const dedupRatios = new Map<Row, { allocated: number; distinct: number }>();
  for (let run = 0; run < c.runs; run++) {
    for (const row of rows) {
      if (row.unsupported || (row.qemu && !c.haveQemu)) continue;
      rmSync(out, { force: true });
      let failure: { status: number | null; stderr: string } | null = null;
      const t = c.timed(() => {
        const r = spawnSync(row.cmd, row.argv(out), { stdio: ['ignore', 'ignore', 'pipe'] });
        if (r.status !== 0) failure = { status: r.status, stderr: r.stderr.toString() };
        else if (row.sync) c.sh('sync', ['-f', out]);
      });
      const failed = failure as { status: number | null; stderr: string } | null;
      if (failed) {
        if (row === both && failed.status === 1 && failed.stderr.includes(NOT_YET)) {
          row.unsupported = true;
          continue;
        }
        throw new Error(`${row.cmd} ${row.argv(out).join(' ')} failed (${failed.status}): ${failed.stderr}`);
      }
      row.times.push(t);
      const st = statSync(out);
      row.size = st.size;
      row.allocated = st.blocks * 512;
      if ((row === dedupOnly || row === both) && !dedupRatios.has(row)) {
        const r = spawnSync(c.bin, ['check', '--output', 'json', out], { stdio: ['ignore', 'pipe', 'pipe'] });
        const json = JSON.parse(r.stdout.toString());
        dedupRatios.set(row, { allocated: json['allocated-clusters'], distinct: json.dedup?.['entries-checked'] });
      }
    }
  }
  rmSync(out, { force: true });

  console.log(`tool (${c.runs} alternating runs, median)                  seconds     MB/s    file bytes     allocated`);
  for (const row of rows) {
    if (row.unsupported) console.log(`${row.name.padEnd(52)}  not yet supported (exit 1: "${NOT_YET}")`);
    else if (row.times.length) {
      const t = c.median(row.times);
      console.log(
        `${row.name.padEnd(52)}${t.toFixed(2).padStart(8)}${mbs(t).padStart(9)}${String(row.size).padStart(14)}${String(row.allocated).padStart(14)}`,
      );
    }
  }
  const ratioOf = (row: Row) => {
    const d = dedupRatios.get(row);
    return d ? d.allocated / d.distinct : Number.NaN;
  };
  for (const row of [dedupOnly, both]) {
    const d = dedupRatios.get(row);
    if (d)
      console.log(
        `dedup ratio, ${row.name}: ${ratioOf(row).toFixed(3)} (guest clusters allocated ${d.allocated} / distinct clusters stored ${d.distinct}, from qdedup check --output json)`,
      );
  }
  if (!qemu64.times.length) return;
  const base = { time: c.median(qemu64.times), size: qemu64.size };
  console.log(`against ${qemu64.name.replace(' + sync', '')}: file size ours / theirs (aim ≤ ${SIZE_AIM}), throughput ours / theirs (aim ≥ ${SPEED_AIM})`);
  for (const row of [compressedOnly, dedupOnly, both]) {
    if (row.unsupported) {
      console.log(`  ${row.name.padEnd(50)}not yet supported`);
      continue;
    }
    if (!row.times.length) continue;
    const sizeRatio = row.size / base.size;
    const speedRatio = base.time / c.median(row.times);
    console.log(`  ${row.name.padEnd(50)}size ${sizeRatio.toFixed(2)}, throughput ${speedRatio.toFixed(2)}`);
  }
  // The summary holds the aims, which are those of dedup + compression; while it is not
  // supported, compression alone stands in (as a reference, without aims) beside the note.
  const label = `compressed import ${c.fmtSize(c.fsSize)} fs`;
  if (both.unsupported || !both.times.length) {
    c.summary.push({ row: `${label}: dedup -c`, ratio: Number.NaN, aim: 0, note: 'not yet supported' });
    if (compressedOnly.times.length) {
      c.summary.push({ row: `${label}: -c -o dedup=off, size vs qemu -c`, ratio: compressedOnly.size / base.size, aim: 0 });
      c.summary.push({ row: `${label}: -c -o dedup=off, throughput vs qemu -c`, ratio: base.time / c.median(compressedOnly.times), aim: 0 });
    }
    return;
  }
  c.summary.push({ row: `${label}: dedup -c, size vs qemu -c`, ratio: both.size / base.size, aim: SIZE_AIM, atMost: true });
  c.summary.push({ row: `${label}: dedup -c, throughput vs qemu -c`, ratio: base.time / c.median(both.times), aim: SPEED_AIM });
  if (dedupRatios.has(both) && dedupRatios.has(dedupOnly))
    c.summary.push({ row: `${label}: dedup ratio of dedup -c / of dedup alone`, ratio: ratioOf(both) / ratioOf(dedupOnly), aim: 1.0 });
}
