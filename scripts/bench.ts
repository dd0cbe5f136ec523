// Benchmark: qdedup against qemu-img and qemu-io on the same data, in the same run, each
// row beside its qemu counterpart with the ratio. Usage:
//   npm run bench [-- --size 1G --dedup-sizes 256M,1G --runs 3 --dir /tmp --only NAME[,NAME…]]
// Rows (names for --only): plain-import, dedup-import, read-back, info, check, compressed-import.
// Runs alternate (ours, theirs, ours, …; each run of a row starts with another tool, in turn)
// and each figure is the median: the machine may be shared and noisy. Ratios are qemu's time
// / ours: above 1.0 qdedup is faster. Before each timed run the files it reads are read
// through (into the page cache: this machine's kernel pages out what has not been used for
// about a minute) and `sync` runs.
//
// For each cluster size (64 KiB, 4 KiB) it times, on a page-cached random input file:
//   qdedup create + qdedup write -i INPUT      (qdedup syncs before it exits)
//   qdedup convert -f raw INPUT OUT            (one process: qemu-img convert's own syntax)
//   qemu-img convert -f raw -O qcow2 + sync    (convert alone does not flush its output)
//   qemu-io -c 'write -s INPUT 0 SIZE'         (into a fresh qemu-img image)
// and prints the median wall time and MB/s (10^6 bytes/s) of each (plain images:
// -o dedup=off), plus the wall time of `qdedup info` (start-up cost).
//
// Then the dedup import, at each of --dedup-sizes: a file in which half of the 4 KiB blocks repeat
// earlier ones, written with `qdedup write -i` into a fresh dedup image and with `qdedup
// convert` (sha256, 4 KiB clusters, both), beside `qemu-img convert -o cluster_size=4096` + sync of the same file: MB/s
// of both and their ratio, both file sizes, peak RSS, index RAM per indexed cluster, and
// disk reads per lookup that hits an incarnation (from one more, in-process, import).
//
// read-back: a dedup image of that file (made once) read to a regular file with
// `qdedup read IMG > OUT` beside `qemu-img convert -O raw IMG OUT`. info: start-up, `qdedup
// info` (bin/qdedup run as a shell runs it) beside `qemu-img info` on a small image, and `node
// -e 0` without NODE_EXTRA_CA_CERTS (as bin/qdedup starts Node) and, where it is set, with it,
// timed in the same alternation. check: `qdedup check` of
// the same dedup image beside `qemu-img check` (which counts the dedup metadata as leaks).
//
// compressed-import (scripts/bench-compressed.ts; options --fs-source DIR, default /usr/share,
// --fs-size, default 1G): an ext4 image of real files (mkfs.ext4 -d, cached in --dir) through
// qemu-img convert -c (64 KiB, 4 KiB clusters), qdedup convert -c -o dedup=off, qdedup convert
// and qdedup convert -c: time, MB/s, file sizes, ratios against qemu-img convert -c.

import { spawnSync } from 'node:child_process';
import { mkdtempSync, openSync, writeSync, closeSync, rmSync, readSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { parseSize } from '../src/cli/parse.ts';
import { writeDuplicateFile } from './dup-data.ts';
import { Image } from '../src/image/image.ts';
import { createImage } from '../src/dedup/open.ts';
import { defaultStoreOrder } from '../src/dedup/dedup.ts';
import { statSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { openForWrite, dedupOf } from '../src/dedup/open.ts';
import { ChunkReader, writeChunks } from '../src/image/write-pipeline.ts';
import { compressedImport, type SummaryEntry } from './bench-compressed.ts';

const args = process.argv.slice(2);
function option(name: string, fallback: string): string {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && args[i + 1] ? args[i + 1] : fallback;
}
const size = parseSize(option('size', '1G'));
const ROWS = ['plain-import', 'dedup-import', 'read-back', 'info', 'check', 'compressed-import'];
const only = option('only', '') ? option('only', '').split(',') : ROWS;
for (const name of only) if (!ROWS.includes(name)) throw new Error(`--only: unknown row '${name}' (rows: ${ROWS.join(', ')})`);
const want = (row: string) => only.includes(row);
const runs = Number(option('runs', '3'));
const dedupSizes = option('dedup-sizes', '256M,1G')
  .split(',')
  .map((x) => parseSize(x));
const baseDir = option('dir', tmpdir());
const dir = mkdtempSync(join(baseDir, 'qdedup-bench-'));
const BIN = new URL('../bin/qdedup', import.meta.url).pathname;

function sh(cmd: string, argv: string[]): void {
  const r = spawnSync(cmd, argv, { stdio: ['ignore', 'ignore', 'pipe'] });
  if (r.status !== 0) throw new Error(`${cmd} ${argv.join(' ')} failed (${r.status}): ${r.stderr}`);
}

/** Runs `cmd`; exit codes in `ok` count as success (qemu-img check: 3 = leaks only). */
function shAllow(cmd: string, argv: string[], ok: number[], stdout: 'ignore' | number = 'ignore'): void {
  const r = spawnSync(cmd, argv, { stdio: ['ignore', stdout, 'pipe'] });
  if (!ok.includes(r.status ?? -1)) throw new Error(`${cmd} ${argv.join(' ')} failed (${r.status}): ${r.stderr}`);
}

/** Every ratio of the run, printed together at the end beside its aim (docs/PERFORMANCE.md "Aims"). */
const summary: SummaryEntry[] = [];
function record(row: string, oursSeconds: number, theirsSeconds: number, aim: number): number {
  const ratio = theirsSeconds / oursSeconds;
  summary.push({ row, ratio, aim });
  return ratio;
}

/**
 * Reads `path` through, so that it is in the page cache: this machine's kernel pages out
 * memory left unused for about a minute (DAMON's `pageout` scheme), page cache included, and
 * an input read from the disk would be charged to whichever tool ran first.
 */
function warm(path: string): void {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(16 * 1024 * 1024);
    while (readSync(fd, buf, 0, buf.length, null) > 0);
  } finally {
    closeSync(fd);
  }
}

/** Wall time of `fn`, after a sync and with the files it reads (`inputs`) in the page cache. */
function timed(fn: () => void, ...inputs: string[]): number {
  for (const f of inputs) warm(f);
  sh('sync', []);
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

/**
 * Runs `steps` (one timed command each) starting with step r mod their number: run r of a row
 * starts with another tool than run r − 1, so what the machine does to the first command after
 * a pause (it pages memory back in, among others) falls on each tool in turn.
 */
function inTurn(r: number, steps: (() => unknown)[]): void {
  for (let i = 0; i < steps.length; i++) steps[(r + i) % steps.length]();
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function peakRss(cmd: string, argv: string[]): number {
  const r = spawnSync('/usr/bin/time', ['-f', '%M', cmd, ...argv], { stdio: ['ignore', 'ignore', 'pipe'] });
  const lines = r.stderr.toString().trim().split('\n');
  return Number(lines[lines.length - 1]) * 1024;
}

// Input: random bytes (no zero runs, so qemu-img convert allocates every cluster).
const input = join(dir, 'input.raw');
if (want('plain-import')) {
  const fd = openSync(input, 'w');
  const chunk = Buffer.alloc(16 * 1024 * 1024);
  for (let done = 0; done < size; done += chunk.length) {
    randomFillSync(chunk);
    writeSync(fd, chunk, 0, Math.min(chunk.length, size - done));
  }
  closeSync(fd);
}
const haveQemu = spawnSync('qemu-img', ['--version']).status === 0;
const mb = (s: number) => (size / s / 1e6).toFixed(0);

console.log(`qdedup benchmark: ${size} bytes, ${runs} runs each, median wall time (rows: ${only.join(', ')})`);
console.log(`node ${process.version}; ${haveQemu ? spawnSync('qemu-img', ['--version']).stdout.toString().split('\n')[0] : 'qemu-img not installed'}`);
if (want('plain-import')) {
  console.log('');
  console.log('cluster   tool                              seconds     MB/s');
}
for (const cluster of want('plain-import') ? ['64k', '4k'] : []) {
  const out = join(dir, 'out.qcow2');
  const rows: [string, number[]][] = [
    ['qdedup create + write -i', []],
    ['qemu-img convert + sync', []],
    ['qemu-io write -s', []],
    ['qdedup convert', []],
  ];
  for (let r = 0; r < runs; r++) {
    inTurn(r, [
      () => {
        rmSync(out, { force: true });
        rows[0][1].push(
          timed(() => {
            sh(BIN, ['create', '-q', '-o', `cluster_size=${cluster},dedup=off`, out, String(size)]);
            sh(BIN, ['write', '-q', '-i', input, out, '0']);
          }, input),
        );
      },
      () => {
        rmSync(out, { force: true });
        rows[3][1].push(timed(() => sh(BIN, ['convert', '-q', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cluster},dedup=off`, input, out]), input));
      },
      ...(haveQemu
        ? [
            () => {
              rmSync(out, { force: true });
              rows[1][1].push(
                timed(() => {
                  sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cluster}`, input, out]);
                  sh('sync', ['-f', out]);
                }, input),
              );
            },
            () => {
              rmSync(out, { force: true });
              sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, out, String(size)]);
              rows[2][1].push(timed(() => sh('qemu-io', ['-f', 'qcow2', '-c', `write -q -s ${input} 0 ${size}`, out]), input));
            },
          ]
        : []),
    ]);
  }
  for (const [name, times] of rows) {
    if (times.length === 0) continue;
    const t = median(times);
    console.log(`${cluster.padEnd(10)}${name.padEnd(34)}${t.toFixed(2).padStart(7)}${mb(t).padStart(9)}`);
  }
  if (rows[1][1].length) {
    const write = record(`plain import ${fmtSize(size)}, ${cluster} clusters, create + write -i`, median(rows[0][1]), median(rows[1][1]), 1.0);
    const convert = record(`plain import ${fmtSize(size)}, ${cluster} clusters, convert`, median(rows[3][1]), median(rows[1][1]), 1.0);
    console.log(`${cluster.padEnd(10)}ratio qemu-img convert / qdedup: create + write -i ${write.toFixed(2)}, convert ${convert.toFixed(2)}`);
  }
  if (cluster === '4k') {
    rmSync(out, { force: true });
    sh(BIN, ['create', '-q', '-o', `cluster_size=${cluster},dedup=off`, out, String(size)]);
    console.log(`${cluster.padEnd(10)}qdedup write -i peak RSS: ${(peakRss(BIN, ['write', '-q', '-i', input, out, '0']) / 1048576).toFixed(0)} MiB`);
  }
}
// ------------------------------------------------------------------ dedup import
/** Files of 50 % duplicate blocks, by size (made once). */
const dupInputs = new Map<number, { path: string; blocks: number; unique: number }>();
function duplicateInput(bytes = size): { path: string; blocks: number; unique: number } {
  let d = dupInputs.get(bytes);
  if (!d) {
    const path = join(dir, `half-${bytes}.raw`);
    const { blocks, unique } = writeDuplicateFile(path, bytes, 0.5);
    d = { path, blocks, unique };
    dupInputs.set(bytes, d);
  }
  return d;
}
function fmtSize(bytes: number): string {
  return bytes >= 2 ** 30 ? `${bytes / 2 ** 30} GiB` : `${bytes / 2 ** 20} MiB`;
}
if (want('dedup-import')) {
  for (const bytes of dedupSizes) {
    const { path: dup, blocks, unique } = duplicateInput(bytes);
    const out = join(dir, 'dedup.qcow2');
    const ours: number[] = [];
    const converts: number[] = [];
    const theirs: number[] = [];
    let oursSize = 0;
    let convertSize = 0;
    let theirsSize = 0;
    for (let r = 0; r < runs; r++) {
      inTurn(r, [
        () => {
          rmSync(out, { force: true });
          ours.push(
            timed(() => {
              sh(BIN, ['create', '-q', out, String(bytes)]);
              sh(BIN, ['write', '-q', '-i', dup, out, '0']);
            }, dup),
          );
          oursSize = statSync(out).size;
        },
        () => {
          rmSync(out, { force: true });
          converts.push(timed(() => sh(BIN, ['convert', '-q', '-f', 'raw', '-O', 'qcow2', dup, out]), dup));
          convertSize = statSync(out).size;
        },
        ...(haveQemu
          ? [
              () => {
                rmSync(out, { force: true });
                theirs.push(
                  timed(() => {
                    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', dup, out]);
                    sh('sync', ['-f', out]);
                  }, dup),
                );
                theirsSize = statSync(out).size;
              },
            ]
          : []),
      ]);
    }
    const mbs = (t: number) => (bytes / t / 1e6).toFixed(0);
    console.log('');
    console.log(
      `dedup import: ${bytes} bytes, ${blocks} blocks of 4 KiB, ${unique} distinct (${(100 - (100 * unique) / blocks).toFixed(0)} % repeat earlier ones)`,
    );
    console.log('tool                                          seconds     MB/s   file bytes');
    console.log(
      `${'qdedup create + write -i (sha256, 4 KiB)'.padEnd(44)}${median(ours).toFixed(2).padStart(9)}${mbs(median(ours)).padStart(9)}${String(oursSize).padStart(13)}`,
    );
    console.log(
      `${'qdedup convert -f raw (sha256, 4 KiB)'.padEnd(44)}${median(converts).toFixed(2).padStart(9)}${mbs(median(converts)).padStart(9)}${String(convertSize).padStart(13)}`,
    );
    if (theirs.length) {
      console.log(
        `${'qemu-img convert -o cluster_size=4096 + sync'.padEnd(44)}${median(theirs).toFixed(2).padStart(9)}${mbs(median(theirs)).padStart(9)}${String(theirsSize).padStart(13)}`,
      );
      // The aims hold from 1 GiB (issue 10, docs/PERFORMANCE.md "Aims"): below, each process's
      // start-up and JIT warm-up (~0.4 s) weigh against qemu-img's fraction of a second.
      const aim = bytes >= 2 ** 30 ? 1.0 : 0;
      const write = record(`dedup import ${fmtSize(bytes)}, 50 % duplicates, create + write -i`, median(ours), median(theirs), aim);
      const convert = record(`dedup import ${fmtSize(bytes)}, 50 % duplicates, convert`, median(converts), median(theirs), aim);
      console.log(
        `throughput ratio qdedup / qemu-img: create + write -i ${write.toFixed(2)}, convert ${convert.toFixed(2)}; file size ratio: ${(oursSize / theirsSize).toFixed(2)}`,
      );
    }
    rmSync(out, { force: true });
    sh(BIN, ['create', '-q', out, String(bytes)]);
    console.log(`qdedup write -i peak RSS: ${(peakRss(BIN, ['write', '-q', '-i', dup, out, '0']) / 1048576).toFixed(0)} MiB`);
    // The same data again in a new session: every cluster hits an index entry read from disk,
    // which is compared byte for byte at its first hit (src/dedup/slot-bits.ts).
    const again = timed(() => sh(BIN, ['write', '-q', '-i', dup, out, '0']), dup);
    console.log(
      `${'qdedup write -i again (new session: hits compared)'.padEnd(44)}${again.toFixed(2).padStart(9)}${mbs(again).padStart(9)}${String(statSync(out).size).padStart(13)}`,
    );
    if (bytes !== dedupSizes[dedupSizes.length - 1]) continue;

    // The index's figures, from an in-process import of the same file through the write pipeline.
    rmSync(out, { force: true });
    await createImage(out, {
      size: bytes,
      clusterBits: 12,
      version: 3,
      refcountOrder: 4,
      lazyRefcounts: false,
      force: true,
      dedup: { algorithm: 'sha256', verify: false, maxIncarnations: 0, order: defaultStoreOrder(bytes, 4096), journalBlockSize: 4096 },
    });
    const image = await openForWrite(out);
    const fh = await open(dup);
    const reader = new ChunkReader({ fill: async (buf, n) => (await fh.read(buf, 0, n, null)).bytesRead }, bytes);
    await writeChunks(image, 0, reader, await reader.next(), { room: bytes });
    await fh.close();
    const st = dedupOf(image)!.store.stats();
    await image.close();
    const inIncarnations = st.indexEntries - st.logStore.entries - st.frozenEntries;
    console.log(
      `index: ${st.indexEntries} entries, ${st.incarnations.count} incarnations; filter RAM ${(st.filterRamBytes / Math.max(1, inIncarnations)).toFixed(2)} bytes per indexed cluster outside the log stores; all index RAM (slot cache included) ${(st.ramBytes / st.indexEntries).toFixed(2)} bytes per indexed cluster`,
    );
    console.log(
      `incarnation lookups: ${st.incarnationLookups}, hits ${st.incarnationHits}, slots read ${st.incarnationReads}: ${(st.incarnationReads / Math.max(1, st.incarnationHits)).toFixed(3)} per hit`,
    );
  }
}

// ------------------------------------------------------------------ read-back, info, check
/** A dedup image (4 KiB clusters, sha256) of the duplicate file, made once. */
let dedupImagePath: string | null = null;
function dedupImage(): string {
  if (!dedupImagePath) {
    dedupImagePath = join(dir, 'readback.qcow2');
    sh(BIN, ['create', '-q', dedupImagePath, String(size)]);
    sh(BIN, ['write', '-q', '-i', duplicateInput().path, dedupImagePath, '0']);
  }
  return dedupImagePath;
}

/** Alternating runs of ours and theirs; prints both medians and qemu's time / ours. */
/** `floors`: more commands timed in the same alternation (start-up: `node -e 0`), their medians printed after ours. */
function pairRow(
  label: string,
  oursName: string,
  theirsName: string,
  ours: () => void,
  theirs: () => void,
  aim: number,
  count = runs,
  floors: { name: string; run: () => void }[] = [],
  inputs: string[] = [],
): { ours: number; floors: number[] } {
  const a: number[] = [];
  const b: number[] = [];
  const f: number[][] = floors.map(() => []);
  for (let r = 0; r < count; r++) {
    inTurn(r, [
      () => a.push(timed(ours, ...inputs)),
      ...(haveQemu ? [() => b.push(timed(theirs, ...inputs))] : []),
      ...floors.map((floor, k) => () => f[k].push(timed(floor.run, ...inputs))),
    ]);
  }
  console.log('');
  console.log(label);
  const digits = median(a) < 1 ? 3 : 2;
  console.log(`  ${oursName.padEnd(46)}${median(a).toFixed(digits).padStart(8)} s`);
  floors.forEach((floor, k) => console.log(`  ${floor.name.padEnd(46)}${median(f[k]).toFixed(digits).padStart(8)} s`));
  const medians = { ours: median(a), floors: f.map(median) };
  if (!b.length) return medians;
  console.log(`  ${theirsName.padEnd(46)}${median(b).toFixed(digits).padStart(8)} s`);
  const ratio = median(b) / median(a);
  if (aim > 0) record(label.split(':')[0], median(a), median(b), aim);
  console.log(`  ratio qemu-img / qdedup: ${ratio.toFixed(2)} (above 1: qdedup faster; ${count} alternating runs each)`);
  return medians;
}

if (want('read-back')) {
  const img = dedupImage();
  const out = join(dir, 'readback.raw');
  pairRow(
    `read-back: ${size} bytes of a dedup image (4 KiB clusters, 50 % shared) to a file`,
    'qdedup read IMG > OUT',
    'qemu-img convert -O raw IMG OUT',
    () => {
      rmSync(out, { force: true });
      const fd = openSync(out, 'w');
      try {
        shAllow(BIN, ['read', img], [0], fd);
      } finally {
        closeSync(fd);
      }
    },
    () => {
      rmSync(out, { force: true });
      sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, out]);
    },
    1.0,
    runs,
    [],
    [img],
  );
  rmSync(out, { force: true });
}

if (want('info')) {
  const small = join(dir, 'small.qcow2');
  rmSync(small, { force: true });
  sh(BIN, ['create', '-q', small, '64M']);
  const n = Math.max(runs, 11);
  // In the same alternation: measured apart, the floors and qdedup saw different loads. Where
  // NODE_EXTRA_CA_CERTS is set, Node parses those certificates at every start; bin/qdedup's
  // first line drops it (qdedup makes no TLS connection), so its floor is Node without it.
  const extraCerts = process.env.NODE_EXTRA_CA_CERTS ? [{ name: 'node -e 0, NODE_EXTRA_CA_CERTS set', run: () => sh(process.execPath, ['-e', '0']) }] : [];
  const { ours, floors } = pairRow(
    'start-up: info on a small (64 MiB, empty) dedup image',
    'qdedup info (bin/qdedup, as a shell runs it)',
    'qemu-img info',
    () => sh(BIN, ['info', small]),
    () => sh('qemu-img', ['info', small]),
    0,
    n,
    [{ name: 'node -e 0 (the floor)', run: () => sh('env', ['-u', 'NODE_EXTRA_CA_CERTS', process.execPath, '-e', '0']) }, ...extraCerts],
  );
  // Its aim is a time, not a ratio: qemu-img is C with no start-up to speak of.
  const floorsShown = floors.map((t) => `${t.toFixed(3)} s`).join(extraCerts.length ? ', with NODE_EXTRA_CA_CERTS ' : '');
  summary.push({ row: `qdedup info, seconds (node -e 0: ${floorsShown})`, ratio: ours, aim: 0.15, atMost: true });
}

if (want('check')) {
  const img = dedupImage();
  pairRow(
    `check: ${size} bytes dedup image`,
    'qdedup check',
    'qemu-img check (dedup metadata: leaks)',
    () => shAllow(BIN, ['check', img], [0, 3]),
    () => shAllow('qemu-img', ['check', img], [0, 3]),
    0,
    runs,
    [],
    [img],
  );
}

if (want('compressed-import')) {
  try {
    compressedImport({
      bin: BIN,
      workDir: dir,
      cacheDir: baseDir,
      fsSource: option('fs-source', '/usr/share'),
      fsSize: parseSize(option('fs-size', '1G')),
      runs,
      haveQemu,
      summary,
      timed,
      median,
      sh,
      fmtSize,
    });
  } catch (e) {
    // A source that does not fit in --fs-size is the user's to fix: say it plainly, leave no temporary folder.
    rmSync(dir, { recursive: true, force: true });
    console.error(`compressed-import: ${(e as Error).message}`);
    process.exit(1);
  }
}

if (summary.length) {
  console.log('');
  console.log('summary: qemu-img time / qdedup time (above 1: qdedup faster), sizes qdedup / qemu-img (below 1: smaller); aims from docs/PERFORMANCE.md');
  const width = Math.max(52, ...summary.map((s) => s.row.length + 2));
  for (const { row, ratio, aim, atMost, note } of summary) {
    const met = atMost ? ratio <= aim : ratio >= aim;
    const aimText = aim ? `   aim ${atMost ? '≤' : '≥'} ${aim.toFixed(atMost ? 2 : 1)}${met ? '' : '  (not met)'}` : '';
    console.log(`  ${row.padEnd(width)}${note ? note : `${ratio.toFixed(2).padStart(6)}${aimText}`}`);
  }
}
rmSync(dir, { recursive: true, force: true });
