// Write-throughput benchmark: qdedup against qemu-img and qemu-io on the same data, in
// the same run. Usage: npm run bench [-- --size 1G --runs 3 --dir /tmp]
//
// For each cluster size (64 KiB, 4 KiB) it times, on a page-cached random input file:
//   qdedup create + qdedup write -i INPUT      (qdedup syncs before it exits)
//   qemu-img convert -f raw -O qcow2 + sync    (convert alone does not flush its output)
//   qemu-io -c 'write -s INPUT 0 SIZE'         (into a fresh qemu-img image)
// and prints the median wall time and MB/s (10^6 bytes/s) of each (plain images:
// -o dedup=off), plus the wall time of `qdedup info` (start-up cost).
//
// Then the dedup import: a file of the same size in which half of the 4 KiB blocks repeat
// earlier ones, written with `qdedup write -i` into a fresh dedup image (sha256, 4 KiB
// clusters), beside `qemu-img convert -o cluster_size=4096` + sync of the same file: MB/s
// of both and their ratio, both file sizes, peak RSS, index RAM per indexed cluster, and
// disk reads per lookup that hits an incarnation (from one more, in-process, import).

import { spawnSync } from 'node:child_process';
import { mkdtempSync, openSync, writeSync, closeSync, rmSync, readFileSync } from 'node:fs';
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

const args = process.argv.slice(2);
function option(name: string, fallback: string): string {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && args[i + 1] ? args[i + 1] : fallback;
}
const size = parseSize(option('size', '1G'));
const runs = Number(option('runs', '3'));
const dir = mkdtempSync(join(option('dir', tmpdir()), 'qdedup-bench-'));
const BIN = new URL('../bin/qdedup', import.meta.url).pathname;

function sh(cmd: string, argv: string[]): void {
  const r = spawnSync(cmd, argv, { stdio: ['ignore', 'ignore', 'pipe'] });
  if (r.status !== 0) throw new Error(`${cmd} ${argv.join(' ')} failed (${r.status}): ${r.stderr}`);
}

function timed(fn: () => void): number {
  sh('sync', []);
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
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
{
  const fd = openSync(input, 'w');
  const chunk = Buffer.alloc(16 * 1024 * 1024);
  for (let done = 0; done < size; done += chunk.length) {
    randomFillSync(chunk);
    writeSync(fd, chunk, 0, Math.min(chunk.length, size - done));
  }
  closeSync(fd);
  readFileSync(input); // into the page cache
}
const haveQemu = spawnSync('qemu-img', ['--version']).status === 0;
const mb = (s: number) => (size / s / 1e6).toFixed(0);

console.log(`qdedup write benchmark: ${size} bytes of random data, ${runs} runs each, median wall time`);
console.log(`node ${process.version}; ${haveQemu ? spawnSync('qemu-img', ['--version']).stdout.toString().split('\n')[0] : 'qemu-img not installed'}`);
console.log('');
console.log('cluster   tool                              seconds     MB/s');
for (const cluster of ['64k', '4k']) {
  const out = join(dir, 'out.qcow2');
  const rows: [string, number[]][] = [['qdedup write -i', []], ['qemu-img convert + sync', []], ['qemu-io write -s', []]];
  for (let r = 0; r < runs; r++) {
    rmSync(out, { force: true });
    rows[0][1].push(timed(() => {
      sh(BIN, ['create', '-q', '-o', `cluster_size=${cluster},dedup=off`, out, String(size)]);
      sh(BIN, ['write', '-q', '-i', input, out, '0']);
    }));
    if (!haveQemu) continue;
    rmSync(out, { force: true });
    rows[1][1].push(timed(() => {
      sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cluster}`, input, out]);
      sh('sync', ['-f', out]);
    }));
    rmSync(out, { force: true });
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, out, String(size)]);
    rows[2][1].push(timed(() => sh('qemu-io', ['-f', 'qcow2', '-c', `write -q -s ${input} 0 ${size}`, out])));
  }
  for (const [name, times] of rows) {
    if (times.length === 0) continue;
    const t = median(times);
    console.log(`${cluster.padEnd(10)}${name.padEnd(34)}${t.toFixed(2).padStart(7)}${mb(t).padStart(9)}`);
  }
  if (cluster === '4k') {
    rmSync(out, { force: true });
    sh(BIN, ['create', '-q', '-o', `cluster_size=${cluster},dedup=off`, out, String(size)]);
    console.log(`${cluster.padEnd(10)}qdedup write -i peak RSS: ${(peakRss(BIN, ['write', '-q', '-i', input, out, '0']) / 1048576).toFixed(0)} MiB`);
  }
}
// ------------------------------------------------------------------ dedup import
{
  const dup = join(dir, 'half.raw');
  const { blocks, unique } = writeDuplicateFile(dup, size, 0.5);
  readFileSync(dup); // into the page cache
  const out = join(dir, 'dedup.qcow2');
  const ours: number[] = [];
  const theirs: number[] = [];
  let oursSize = 0;
  let theirsSize = 0;
  for (let r = 0; r < runs; r++) {
    rmSync(out, { force: true });
    ours.push(timed(() => {
      sh(BIN, ['create', '-q', out, String(size)]);
      sh(BIN, ['write', '-q', '-i', dup, out, '0']);
    }));
    oursSize = statSync(out).size;
    if (!haveQemu) continue;
    rmSync(out, { force: true });
    theirs.push(timed(() => {
      sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', dup, out]);
      sh('sync', ['-f', out]);
    }));
    theirsSize = statSync(out).size;
  }
  console.log('');
  console.log(`dedup import: ${size} bytes, ${blocks} blocks of 4 KiB, ${unique} distinct (${(100 - (100 * unique) / blocks).toFixed(0)} % repeat earlier ones)`);
  console.log('tool                                          seconds     MB/s   file bytes');
  console.log(`${'qdedup create + write -i (sha256, 4 KiB)'.padEnd(44)}${median(ours).toFixed(2).padStart(9)}${mb(median(ours)).padStart(9)}${String(oursSize).padStart(13)}`);
  if (theirs.length) {
    console.log(`${'qemu-img convert -o cluster_size=4096 + sync'.padEnd(44)}${median(theirs).toFixed(2).padStart(9)}${mb(median(theirs)).padStart(9)}${String(theirsSize).padStart(13)}`);
    console.log(`throughput ratio qdedup / qemu-img: ${(median(theirs) / median(ours)).toFixed(2)}; file size ratio: ${(oursSize / theirsSize).toFixed(2)}`);
  }
  rmSync(out, { force: true });
  sh(BIN, ['create', '-q', out, String(size)]);
  console.log(`qdedup write -i peak RSS: ${(peakRss(BIN, ['write', '-q', '-i', dup, out, '0']) / 1048576).toFixed(0)} MiB`);
  // The same data again in a new session: every cluster hits an index entry read from disk,
  // which is compared byte for byte at its first hit (src/dedup/slot-bits.ts).
  const again = timed(() => sh(BIN, ['write', '-q', '-i', dup, out, '0']));
  console.log(`${'qdedup write -i again (new session: hits compared)'.padEnd(44)}${again.toFixed(2).padStart(9)}${mb(again).padStart(9)}${String(statSync(out).size).padStart(13)}`);

  // The index's figures, from an in-process import of the same file.
  rmSync(out, { force: true });
  await createImage(out, { size, clusterBits: 12, version: 3, refcountOrder: 4, lazyRefcounts: false, force: true, dedup: { algorithm: 'sha256', verify: false, maxIncarnations: 0, order: defaultStoreOrder(size, 4096), journalBlockSize: 4096 } });
  const image = await openForWrite(out);
  const fh = await open(dup);
  const buf = Buffer.alloc(8 << 20);
  for (let off = 0; off < size; off += buf.length) {
    const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, size - off), off);
    await image.write(off, buf.subarray(0, bytesRead));
  }
  await fh.close();
  const st = dedupOf(image)!.store.stats();
  await image.close();
  const inIncarnations = st.indexEntries - st.logStore.entries - st.frozenEntries;
  console.log(`index: ${st.indexEntries} entries, ${st.incarnations.count} incarnations; filter RAM ${(st.filterRamBytes / Math.max(1, inIncarnations)).toFixed(2)} bytes per indexed cluster outside the log stores; all index RAM ${(st.ramBytes / st.indexEntries).toFixed(2)} bytes per indexed cluster`);
  console.log(`incarnation lookups: ${st.incarnationLookups}, hits ${st.incarnationHits}, disk reads ${st.incarnationReads}: ${(st.incarnationReads / Math.max(1, st.incarnationHits)).toFixed(3)} reads per hit`);
}

const image = join(dir, 'out.qcow2');
const infoTimes: number[] = [];
for (let r = 0; r < 5; r++) infoTimes.push(timed(() => sh(BIN, ['info', image])));
const nodeTimes: number[] = [];
for (let r = 0; r < 5; r++) nodeTimes.push(timed(() => sh(process.execPath, ['-e', '0'])));
console.log('');
console.log(`start-up: qdedup info ${median(infoTimes).toFixed(3)} s (node -e 0: ${median(nodeTimes).toFixed(3)} s)`);
rmSync(dir, { recursive: true, force: true });
