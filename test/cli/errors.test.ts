// Errors through the real bin/qdedup: a failing stdout is a
// one-line I/O error (exit 1), a closed pipe stays a quiet end, -q prints nothing but
// errors (check's repair and leak lines included), the usage hint comes only with usage
// errors, file names with a newline or an escape sequence cannot break the one-line error,
// and create fsyncs the new file's directory (observed through strace, skipped without it).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BIN, tempDir } from '../helpers.ts';
import { printable } from '../../src/errors.ts';

interface Ran {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** bin/qdedup with stdout to `stdoutFd` (a pipe when undefined). */
function q(args: string[], stdoutFd?: number): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', stdoutFd ?? 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1' } });
    let stdout = '';
    let stderr = '';
    child.stdout?.on('data', (d) => (stdout += d));
    child.stderr!.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}

function sh(script: string): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn('bash', ['-c', script], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1', Q: `${process.execPath} ${BIN}` } });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d) => (stdout += d));
    child.stderr!.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}

const TRY_HELP = "Try 'qdedup --help' for more information.";
const dir = tempDir('qdedup-errors-');
let serial = 0;

async function image(...opts: string[]): Promise<string> {
  const img = join(dir, `e-${++serial}.qcow2`);
  const r = await q(['create', '-q', ...opts, img, '4M']);
  assert.equal(r.status, 0, r.stderr);
  return img;
}

/** stderr lines (no empty ones). */
const lines = (r: Ran) => r.stderr.split('\n').filter((l) => l !== '');

/** A plain image whose refcount of cluster `leak` is 1 while nothing uses it (and the file reaches it). */
async function leakyImage(): Promise<string> {
  const img = await image('-o', 'dedup=off');
  const buf = readFileSync(img);
  const reftable = Number(buf.readBigUInt64BE(48));
  const refblock = Number(buf.readBigUInt64BE(reftable));
  const leak = 12; // 64 KiB clusters: a free one, inside the file once it is extended
  const out = Buffer.alloc(Math.max(buf.length, (leak + 1) * 65536));
  buf.copy(out);
  out.writeUInt16BE(1, refblock + 2 * leak);
  writeFileSync(img, out);
  return img;
}

describe('errors', { concurrency: 2 }, () => {
  it('stdout on /dev/full: one-line I/O error, exit 1, for write, read, info, check, dedup-stats', async () => {
    const img = await image();
    const full = openSync('/dev/full', 'w');
    try {
      const cmds = [
        ['write', '-P', '0x5a', img, '0', '64k'],
        ['read', img, '0', '64k'],
        ['read', '-v', img, '0', '512'],
        ['info', img],
        ['info', '--output', 'json', img],
        ['check', img],
        ['check', '--output', 'json', img],
        ['dedup-stats', img],
      ];
      for (const args of cmds) {
        const r = await q(args, full);
        assert.equal(r.status, 1, `${args.join(' ')}: ${r.stderr}`);
        assert.deepEqual(lines(r), ['qdedup: write to standard output failed: No space left on device'], args.join(' '));
      }
    } finally {
      closeSync(full);
    }
    // The write itself was made durable before its report failed.
    const v = await q(['read', '-P', '0x5a', img, '0', '64k']);
    assert.equal(v.status, 0, v.stderr);
  });

  it('a closed pipe (| head) stays a quiet end', async () => {
    const img = await image();
    const r = await sh(`set -o pipefail; $Q read -v '${img}' | head -n 1 >/dev/null`);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stderr, '');
  });

  it('-q prints nothing but errors: write, read -P, create, check of a leaky image, check -r all rebuilding refcounts', async () => {
    const img = await image();
    for (const args of [
      ['write', '-q', '-P', '1', img, '0', '4k'],
      ['read', '-q', '-P', '1', img, '0', '4k'],
      ['create', '-q', join(dir, 'quiet.qcow2'), '1M'],
    ]) {
      const r = await q(args);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout + r.stderr, '', args.join(' '));
    }
    const leaky = await leakyImage();
    const loud = await q(['check', leaky]);
    assert.equal(loud.status, 3, loud.stderr);
    assert.match(loud.stderr, /^Leaked cluster 12 refcount=1 reference=0$/m, 'without -q the leak is listed');
    const quiet = await q(['check', '-q', leaky]);
    assert.equal(quiet.status, 3);
    assert.equal(quiet.stdout + quiet.stderr, '', 'check -q: the exit code says it');
    // Refcount table entry 0 cleared: -r all rebuilds the refcount structure.
    const broken = await leakyImage();
    const buf = readFileSync(broken);
    buf.writeBigUInt64BE(0n, Number(buf.readBigUInt64BE(48)));
    writeFileSync(broken, buf);
    const copy = join(dir, 'broken-copy.qcow2');
    writeFileSync(copy, buf);
    const rebuildLoud = await q(['check', '-r', 'all', copy]);
    assert.equal(rebuildLoud.status, 0, rebuildLoud.stderr);
    assert.match(rebuildLoud.stderr, /^Rebuilding refcount structure$/m, 'without -q the rebuild is told');
    const r = await q(['check', '-q', '-r', 'all', broken]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, '');
    for (const line of lines(r)) assert.match(line, /^ERROR /, 'only the errors found stay');
    assert.doesNotMatch(r.stderr, /Rebuilding|Repairing|Leaked/);
  });

  it('the usage hint comes with usage errors only', async () => {
    const img = await image();
    const usage = [
      ['write', '-P', '1', img, '0'], // LENGTH missing
      ['write', '-P', '1', '-z', img, '0', '4k'],
      ['read', '--bogus', img],
      ['check', '-r', 'some', img],
    ];
    for (const args of usage) {
      const r = await q(args);
      assert.equal(r.status, 1);
      assert.equal(lines(r).length, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.equal(lines(r)[1], TRY_HELP);
    }
    const input = join(dir, 'small.bin');
    writeFileSync(input, Buffer.alloc(10));
    const runtime = [
      ['write', '-i', input, img, '0', '4k'], // input shorter than LENGTH
      ['write', '-i', join(dir, 'nothing-here'), img, '0'],
      ['write', '-P', '1', img, '4M', '1'], // past the end
      ['read', img, '4M', '1'],
      ['info', join(dir, 'missing.qcow2')],
      ['write', '-P', '1', join(dir, 'missing.qcow2'), '0', '1'],
    ];
    for (const args of runtime) {
      const r = await q(args);
      assert.equal(r.status, 1, args.join(' '));
      assert.equal(lines(r).length, 1, `${args.join(' ')}: ${r.stderr}`);
      assert.doesNotMatch(r.stderr, /Try 'qdedup --help'/);
    }
    const short = await q(['write', '-i', '-', img, '0', '4k']);
    assert.equal(short.status, 1);
    assert.deepEqual(lines(short).length, 1, short.stderr);
  });

  it('file names with a newline and an escape sequence stay on one escaped line', async () => {
    const odd = join(dir, 'bad\nname\x1b[31m.qcow2');
    const shown = printable(odd);
    assert.ok(shown.includes('bad\\x0aname\\x1b[31m.qcow2'));
    for (const args of [
      ['info', odd],
      ['read', odd],
      ['check', odd],
      ['write', '-P', '1', odd, '0', '1'],
      ['dedup-stats', odd],
    ]) {
      const r = await q(args);
      assert.equal(r.status, 1, args[0]);
      assert.deepEqual(lines(r), [`qdedup: ${shown}: cannot open: No such file or directory`], args[0]);
      assert.doesNotMatch(r.stderr, /\x1b/, `${args[0]}: no raw ESC byte`);
    }
    const img = await image();
    const oddInput = join(dir, 'in\nput\x1b]0;title\x07.bin');
    const r = await q(['write', '-i', oddInput, img, '0']);
    assert.deepEqual(lines(r), [`qdedup: ${printable(oddInput)}: cannot read input: No such file or directory`]);
    writeFileSync(oddInput, Buffer.alloc(5));
    const e = await q(['write', '-i', oddInput, img, '0', '1k']);
    assert.equal(lines(e).length, 1, e.stderr);
    assert.doesNotMatch(e.stderr, /[\x00-\x09\x0b-\x1f]/, 'no control character but the final newline');
  });

  const HAVE_STRACE = spawnSync('strace', ['-qq', '-e', 'trace=none', 'true']).status === 0;
  it('create fsyncs the directory that holds the new file (seen through strace)', { skip: HAVE_STRACE ? false : 'strace missing or not permitted' }, () => {
    const sub = join(dir, 'sync-dir');
    mkdirSync(sub);
    const log = join(dir, 'strace.log');
    const r = spawnSync('strace', ['-f', '-qq', '-e', 'trace=openat,fsync', '-o', log, process.execPath, BIN, 'create', '-q', join(sub, 'new.qcow2'), '1M']);
    assert.equal(r.status, 0, r.stderr.toString());
    const calls = readFileSync(log, 'utf8').split('\n');
    const created = calls.findIndex((l) => l.includes(`"${join(sub, 'new.qcow2')}"`) && l.includes('O_CREAT'));
    assert.ok(created >= 0, 'the image was created');
    const opened = calls.findIndex((l, i) => i > created && new RegExp(`openat\\(AT_FDCWD, "${sub}", O_RDONLY`).test(l));
    assert.ok(opened > created, 'the directory is opened after the file was created');
    const fd = /= (\d+)$/.exec(calls[opened])![1];
    assert.ok(
      calls.some((l, i) => i > opened && new RegExp(`fsync\\(${fd}\\)\\s+= 0$`).test(l)),
      `fsync of the directory's fd ${fd}`,
    );
  });

  it('create: the image is there after exit 0; a missing directory is a one-line error', async () => {
    const img = join(dir, 'created.qcow2');
    const r = await q(['create', img, '1M']);
    assert.equal(r.status, 0, r.stderr);
    assert.ok(existsSync(img));
    const info = await q(['info', '--output', 'json', img]);
    assert.equal(JSON.parse(info.stdout)['virtual-size'], 1 << 20);
    const bad = await q(['create', join(dir, 'no-such-dir', 'x.qcow2'), '1M']);
    assert.equal(bad.status, 1);
    assert.equal(lines(bad).length, 1, bad.stderr);
    assert.match(bad.stderr, /cannot create: No such file or directory/);
  });
});
