// `qdedup write -i` from every kind of input, through the real bin/qdedup: a regular file, standard input from a pipe (`-` and `/dev/stdin`), a FIFO, a
// process substitution, a directory, a missing file, a stream shorter than LENGTH, an empty
// stream, a stream longer than the disk, and 512 MiB streamed with bounded memory. Every
// written range is read back byte for byte against a raw shadow (qdedup read, and
// qemu-img compare when qemu is installed); a refused input must leave the image file
// byte-identical (dedup dirty flag included).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, constants, mkdirSync, openSync, readFileSync, readlinkSync, readdirSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { BIN, HAVE_QEMU, qemuCheck, qemuCompareRaw, tempDir } from '../helpers.ts';

interface Ran {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Waits for a spawned child and collects its output. */
function collect(child: ReturnType<typeof spawn>): Promise<Ran> {
  return new Promise((resolve, reject) => {
    let stdout = '';
    let stderr = '';
    child.stdout?.on('data', (d) => (stdout += d));
    child.stderr?.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (status, signal) => resolve({ status, signal, stdout, stderr }));
  });
}

/** bin/qdedup with `input` on its standard input (a socket pair, as Node gives it). */
function q(args: string[], input?: Buffer): Promise<Ran> {
  const child = spawn(process.execPath, [BIN, ...args], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1' } });
  child.stdin!.on('error', () => {}); // a child that stops reading early closes its end
  child.stdin!.end(input ?? Buffer.alloc(0));
  return collect(child);
}

/** A bash command line (real pipes, process substitution); $Q is bin/qdedup. */
function sh(script: string): Promise<Ran> {
  const child = spawn('bash', ['-c', script], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1', Q: `${process.execPath} ${BIN}` } });
  return collect(child);
}

const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
const dir = tempDir('qdedup-input-');
let serial = 0;

/** A fresh dedup image of `size` bytes and its all-zero raw shadow. */
async function image(size = 4 << 20): Promise<{ img: string; shadow: Buffer }> {
  const img = join(dir, `img-${++serial}.qcow2`);
  const r = await q(['create', '-q', img, String(size)]);
  assert.equal(r.status, 0, r.stderr);
  return { img, shadow: Buffer.alloc(size) };
}

/** The whole guest disk through qdedup read equals `shadow`; and through qemu-img compare. */
async function assertReads(img: string, shadow: Buffer, label: string): Promise<void> {
  const r = spawnSync(process.execPath, [BIN, 'read', img], { maxBuffer: 1 << 30 });
  assert.equal(r.status, 0, `${label}: read: ${r.stderr}`);
  assert.equal(r.stdout.length, shadow.length, `${label}: read length`);
  if (!r.stdout.equals(shadow)) {
    let i = 0;
    while (r.stdout[i] === shadow[i]) i++;
    assert.fail(`${label}: first byte that differs is at offset ${i}`);
  }
  if (HAVE_QEMU) {
    const raw = join(dir, `shadow-${++serial}.raw`);
    writeFileSync(raw, shadow);
    assert.ok(qemuCompareRaw(img, raw), `${label}: qemu-img compare against the raw shadow`);
    const chk = qemuCheck(img);
    assert.equal(chk.json?.corruptions ?? 0, 0, `${label}: qemu-img check: ${chk.stderr.slice(0, 500)}`);
  }
}

/** dedup-stats --output json of an image. */
async function stats(img: string): Promise<Record<string, unknown>> {
  const r = await q(['dedup-stats', '--output', 'json', img]);
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout);
}

/** One error line on stderr, no usage hint, no stack trace. */
function assertOneLine(r: Ran, re: RegExp): void {
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  assert.equal(lines.length, 1, `one line on stderr: ${r.stderr}`);
  assert.match(lines[0], re);
  assert.doesNotMatch(r.stderr, /Try 'qdedup --help'|internal error|\n\s+at /);
}

describe('write -i: every kind of input', { concurrency: 2 }, () => {
  it('a regular file: written, read back byte-exact; LENGTH takes its first bytes', async () => {
    const { img, shadow } = await image();
    const data = randomBytes(300_000);
    const input = join(dir, 'regular.bin');
    writeFileSync(input, data);
    const r = await q(['write', '-i', input, img, '5000']);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, 'wrote 300000/300000 bytes at offset 5000\n');
    data.copy(shadow, 5000);
    const r2 = await q(['write', '-i', input, img, '1M', '70000']);
    assert.equal(r2.stdout, 'wrote 70000/70000 bytes at offset 1048576\n');
    data.copy(shadow, 1 << 20, 0, 70000);
    await assertReads(img, shadow, 'regular file');
  });

  it("standard input '-' from a socket pair (Node's spawn) and from a real pipe (bash)", async () => {
    const { img, shadow } = await image();
    const data = randomBytes(1_500_000);
    const r = await q(['write', '-i', '-', img, '4096'], data);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, 'wrote 1500000/1500000 bytes at offset 4096\n');
    data.copy(shadow, 4096);
    const input = join(dir, 'pipe.bin');
    const piped = randomBytes(600_001);
    writeFileSync(input, piped);
    const p = await sh(`cat '${input}' | $Q write -i - '${img}' 2M`);
    assert.equal(p.status, 0, p.stderr);
    assert.equal(p.stdout, 'wrote 600001/600001 bytes at offset 2097152\n');
    piped.copy(shadow, 2 << 20);
    await assertReads(img, shadow, 'stdin');
  });

  it('/dev/stdin from a pipe, and from a socket pair (which cannot be reopened)', async () => {
    const { img, shadow } = await image();
    const input = join(dir, 'devstdin.bin');
    const data = randomBytes(2_000_000);
    writeFileSync(input, data);
    const p = await sh(`cat '${input}' | $Q write -i /dev/stdin '${img}' 100`);
    assert.equal(p.status, 0, p.stderr);
    assert.equal(p.stdout, 'wrote 2000000/2000000 bytes at offset 100\n', 'the whole stream, not 0 bytes from fstat');
    data.copy(shadow, 100);
    const more = randomBytes(10_000);
    const s = await q(['write', '-i', '/dev/stdin', img, '3M'], more);
    assert.equal(s.status, 0, s.stderr);
    assert.equal(s.stdout, 'wrote 10000/10000 bytes at offset 3145728\n');
    more.copy(shadow, 3 << 20);
    await assertReads(img, shadow, '/dev/stdin');
  });

  it('process substitution <(…) (/dev/fd/N), with and without LENGTH', async () => {
    const { img, shadow } = await image();
    const input = join(dir, 'procsub.bin');
    const data = randomBytes(1_234_567);
    writeFileSync(input, data);
    const p = await sh(`$Q write -i <(cat '${input}') '${img}' 0`);
    assert.equal(p.status, 0, p.stderr);
    assert.equal(p.stdout, 'wrote 1234567/1234567 bytes at offset 0\n');
    data.copy(shadow, 0);
    const l = await sh(`$Q write -i <(cat '${input}') '${img}' 3000000 65536`);
    assert.equal(l.status, 0, l.stderr);
    assert.equal(l.stdout, 'wrote 65536/65536 bytes at offset 3000000\n', 'LENGTH limits a stream');
    data.copy(shadow, 3000000, 0, 65536);
    await assertReads(img, shadow, 'process substitution');
  });

  it('a FIFO: opened before the image, which stays untouched (not even open) while qdedup waits for a writer', async () => {
    const { img, shadow } = await image();
    const fifo = join(dir, 'input.fifo');
    assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
    const before = sha256(img);
    const child = spawn(process.execPath, [BIN, 'write', '-i', fifo, img, '64k'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const done = collect(child);
    // Synchronise on the child being blocked in open() of the FIFO (kernel wait channel).
    const deadline = Date.now() + 15_000;
    const waiting = () => {
      try {
        return readdirSync(`/proc/${child.pid}/task`).some((t) => readFileSync(`/proc/${child.pid}/task/${t}/wchan`, 'utf8') === 'wait_for_partner');
      } catch {
        return false;
      }
    };
    while (!waiting()) {
      assert.ok(Date.now() < deadline, 'qdedup never blocked opening the FIFO');
      await new Promise((r) => setTimeout(r, 20));
    }
    const open = readdirSync(`/proc/${child.pid}/fd`).map((fd) => {
      try {
        return readlinkSync(`/proc/${child.pid}/fd/${fd}`);
      } catch {
        return '';
      }
    });
    assert.ok(!open.includes(img), `the image is not open while the FIFO waits: ${open.join(' ')}`);
    assert.equal(sha256(img), before, 'image unchanged while the FIFO waits');
    const data = randomBytes(3_000_000);
    const w = openSync(fifo, constants.O_WRONLY);
    for (let at = 0; at < data.length; ) at += writeSync(w, data, at);
    closeSync(w);
    const r = await done;
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, 'wrote 3000000/3000000 bytes at offset 65536\n');
    data.copy(shadow, 65536);
    await assertReads(img, shadow, 'FIFO');
  });

  it('a directory or a missing input: one-line error, the image byte-identical (never opened for writing)', async () => {
    const { img } = await image();
    assert.equal((await q(['write', '-P', '7', img, '0', '8k'])).status, 0);
    const before = sha256(img);
    const d = join(dir, 'a-directory');
    mkdirSync(d);
    const r = await q(['write', '-i', d, img, '0']);
    assert.equal(r.status, 1);
    assertOneLine(r, new RegExp(`^qdedup: ${d}: cannot read input: Is a directory$`));
    assert.equal(sha256(img), before, 'directory input: image unchanged');
    const m = await q(['write', '-i', join(dir, 'missing.bin'), img, '0']);
    assert.equal(m.status, 1);
    assertOneLine(m, /missing\.bin: cannot read input: No such file or directory$/);
    assert.equal(sha256(img), before, 'missing input: image unchanged');
    const s = join(dir, 'short-file.bin');
    writeFileSync(s, Buffer.alloc(100, 1));
    const f = await q(['write', '-i', s, img, '0', '4k']);
    assert.equal(f.status, 1);
    assertOneLine(f, /short-file\.bin: cannot read input: it has only 100 bytes, fewer than LENGTH 4096$/);
    assert.equal(sha256(img), before, 'regular file shorter than LENGTH: image unchanged');
    assert.equal((await stats(img)).dirty, false);
  });

  it('a stream shorter than LENGTH: what came is written and committed (index kept), count reported, exit 1', async () => {
    const { img, shadow } = await image();
    const data = randomBytes(10_000);
    const r = await q(['write', '-i', '-', img, '8192', '65536'], data);
    assert.equal(r.status, 1, r.stderr);
    assert.equal(r.stdout, 'wrote 10000/65536 bytes at offset 8192\n');
    assertOneLine(r, /^qdedup: .*img-\d+\.qcow2: standard input ended after 10000 of 65536 bytes; wrote those 10000 bytes at offset 8192$/);
    data.copy(shadow, 8192);
    await assertReads(img, shadow, 'short stream');
    const st = await stats(img);
    assert.equal(st.trusted, true, 'committed and closed cleanly: the index is kept');
    assert.equal(st.dirty, false);
    // A longer stream (several chunks) that ends early, through a real pipe.
    const big = join(dir, 'short-big.bin');
    const bigData = randomBytes(9_000_000);
    writeFileSync(big, bigData);
    const p = await sh(`cat '${big}' | $Q write -i - '${img}' 0 4M`);
    assert.equal(p.status, 0, `LENGTH shorter than the stream: ${p.stderr}`);
    bigData.copy(shadow, 0, 0, 4 << 20);
    await assertReads(img, shadow, 'LENGTH limits');
  });

  it('an empty stream or empty file: exit 1, nothing written, the image byte-identical', async () => {
    const { img } = await image();
    assert.equal((await q(['write', '-P', '9', img, '0', '4k'])).status, 0);
    const before = sha256(img);
    const e = await q(['write', '-i', '-', img, '0'], Buffer.alloc(0));
    assert.equal(e.status, 1);
    assert.equal(e.stdout, '');
    assertOneLine(e, /standard input is empty: nothing to write/);
    assert.equal(sha256(img), before, 'empty stream: image unchanged');
    const l = await q(['write', '-i', '-', img, '0', '4k'], Buffer.alloc(0));
    assert.equal(l.status, 1);
    assertOneLine(l, /standard input ended after 0 of 4096 bytes; nothing was written$/);
    assert.equal(sha256(img), before, 'empty stream with LENGTH: image unchanged');
    // `producer-that-fails | qdedup write -i - …` must not claim success.
    const p = await sh(`false | $Q write -i - '${img}' 0`);
    assert.equal(p.status, 1);
    assert.equal(sha256(img), before, 'failed producer: image unchanged');
    const empty = join(dir, 'empty.bin');
    writeFileSync(empty, '');
    const f = await q(['write', '-i', empty, img, '0']);
    assert.equal(f.status, 1);
    assertOneLine(f, /img-\d+\.qcow2: input '.*empty\.bin' is empty: nothing to write/);
    assert.equal(sha256(img), before, 'empty file: image unchanged');
    const zero = await q(['write', '-i', empty, img, '0', '0']);
    assert.equal(zero.status, 0, 'LENGTH 0 asks for nothing, and gets it');
  });

  it('a stream longer than the disk: what fits is written and committed, nothing past the end, exit 1', async () => {
    const { img, shadow } = await image(1 << 20);
    const data = randomBytes(1_500_000);
    const r = await q(['write', '-i', '-', img, '512k'], data);
    assert.equal(r.status, 1);
    assert.equal(r.stdout, '');
    assertOneLine(
      r,
      /standard input goes past the end of the disk \(virtual size 1048576\): 524288 bytes fit from offset 524288; wrote those 524288 bytes, the rest of the input was not written$/,
    );
    data.copy(shadow, 512 << 10, 0, 512 << 10);
    await assertReads(img, shadow, 'too long');
    assert.equal((await stats(img)).dirty, false);
    // At the very end of the disk nothing fits: refused before the image is opened.
    const before = sha256(img);
    const e = await q(['write', '-i', '-', img, '1M'], Buffer.from('x'));
    assert.equal(e.status, 1);
    assertOneLine(e, /0 bytes fit from offset 1048576; nothing was written$/);
    assert.equal(sha256(img), before);
    // Exactly the room left: success.
    const exact = randomBytes(4096);
    const x = await q(['write', '-i', '-', img, String((1 << 20) - 4096)], exact);
    assert.equal(x.status, 0, x.stderr);
    exact.copy(shadow, (1 << 20) - 4096);
    await assertReads(img, shadow, 'exact fit');
  });

  it('512 MiB through -i - with bounded memory (peak RSS under 300 MB), read back exact', async () => {
    const size = 512 << 20;
    const { img } = await image(size);
    // 64 distinct random MiB blocks, cycled: the shadow is cheap to rebuild and half the
    // stream deduplicates.
    const blocks = Array.from({ length: 64 }, () => randomBytes(1 << 20));
    const child = spawn(process.execPath, [BIN, 'write', '-i', '-', img, '0'], { stdio: ['pipe', 'pipe', 'pipe'] });
    const done = collect(child);
    let peakKb = 0;
    const sample = () => {
      try {
        const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'));
        if (m) peakKb = Math.max(peakKb, Number(m[1]));
      } catch {
        // exited
      }
    };
    const timer = setInterval(sample, 25);
    for (let i = 0; i < 512; i++) {
      if (!child.stdin!.write(blocks[i % 64])) await new Promise((r) => child.stdin!.once('drain', r));
      if (i % 64 === 0) sample();
    }
    sample();
    child.stdin!.end();
    const r = await done;
    clearInterval(timer);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, `wrote ${size}/${size} bytes at offset 0\n`);
    assert.ok(peakKb > 0, 'peak RSS sampled');
    assert.ok(peakKb * 1024 < 300e6, `peak RSS ${(peakKb / 1024).toFixed(0)} MiB`);
    const back = spawnSync(process.execPath, [BIN, 'read', img], { maxBuffer: 1 << 30 });
    assert.equal(back.status, 0);
    for (let i = 0; i < 512; i++) {
      if (!back.stdout.subarray(i << 20, (i + 1) << 20).equals(blocks[i % 64])) assert.fail(`MiB ${i} differs`);
    }
  });
});
