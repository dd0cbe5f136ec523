// Every subcommand through the real bin/qdedup: --help, --version, bad
// arguments, option validation with qemu-img's wording, exit codes (every failure is 1:
// usage errors and I/O errors alike), `info --output json` against qemu-img's JSON on the
// same images, a closed pipe (`| head`), NO_COLOR. Messages are asserted exactly where a
// script may depend on qemu-compatible wording; elsewhere on what they must name.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BIN, HAVE_QEMU, NO_QEMU, ROOT, tempDir } from '../helpers.ts';
import { colorLevel } from '../../src/cli/output.ts';

interface Ran {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a command without blocking the event loop, so tests can run concurrently. */
function exec(cmd: string, args: string[], env: Record<string, string | undefined> = {}, cwd?: string): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1', ...env } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (status, signal) => resolve({ status, signal, stdout, stderr }));
  });
}

const q = (...args: string[]) => exec(process.execPath, [BIN, ...args]);
/** Same, from inside `cwd` (file names in messages and JSON stay relative, as typed). */
const qIn = (cwd: string, ...args: string[]) => exec(process.execPath, [BIN, ...args], {}, cwd);

const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
const VERSION = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version as string;
const TRY_HELP = "Try 'qdedup --help' for more information.";

/** A failure: exit 1, stdout empty, stderr = `qdedup: <message>` (+ the --help hint for usage errors), no stack. */
function assertFails(r: Ran, message: string | RegExp, opts: { usage?: boolean } = {}): void {
  assert.equal(r.status, 1, `exit code 1; stderr: ${r.stderr}`);
  assert.doesNotMatch(r.stderr, /internal error|\n\s+at |Error: /, 'no stack trace');
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  assert.equal(lines.length, opts.usage === false ? 1 : opts.usage ? 2 : lines.length, `stderr lines: ${r.stderr}`);
  assert.ok(lines.length === 1 || (lines.length === 2 && lines[1] === TRY_HELP), `one message line (plus the --help hint): ${r.stderr}`);
  if (typeof message === 'string') assert.equal(lines[0], `qdedup: ${message}`);
  else assert.match(lines[0], message);
  assert.match(lines[0], /^qdedup: /);
  assert.equal(r.stdout, '', 'nothing on stdout');
}

const dir = tempDir('qdedup-cli-');
let serial = 0;
/** A fresh image in the test folder (bin/qdedup create -q …); returns its path. */
async function image(size = '1M', ...opts: string[]): Promise<string> {
  const file = join(dir, `img-${++serial}.qcow2`);
  const r = await q('create', '-q', ...opts, file, size);
  assert.equal(r.status, 0, r.stderr);
  return file;
}

describe('qdedup command line', { concurrency: 4 }, () => {
  // ------------------------------------------------------------ help and version
  it('--help: exit 0, lists every command and the global options', async () => {
    for (const flag of ['--help', '-h']) {
      const r = await q(flag);
      assert.equal(r.status, 0);
      assert.equal(r.stderr, '');
      for (const cmd of ['create', 'info', 'write', 'read', 'check']) assert.match(r.stdout, new RegExp(`qdedup ${cmd}\\b`), cmd);
      for (const opt of ['--help', '--version', '--color']) assert.ok(r.stdout.includes(opt), opt);
    }
  });

  it("<command> --help: exit 0 and the command's options", async () => {
    const want: Record<string, string[]> = {
      create: ['-o', '--force', '-b', '-F', '--quiet', 'cluster_size', 'Examples'],
      info: ['--output', 'human or json', 'Examples'],
      write: ['-P', '-i', '-z', '--quiet', 'Examples'],
      read: ['-P', '-v', '--quiet', 'Examples'],
      check: ['--output', '-r'],
    };
    await Promise.all(
      Object.entries(want).map(async ([cmd, opts]) => {
        const r = await q(cmd, '--help');
        assert.equal(r.status, 0, `${cmd} --help: ${r.stderr}`);
        assert.equal(r.stderr, '');
        assert.ok(r.stdout.startsWith(`qdedup ${cmd}`), `${cmd} usage line: ${r.stdout.slice(0, 80)}`);
        for (const o of opts) assert.ok(r.stdout.includes(o), `${cmd} --help mentions ${o}`);
      }),
    );
  });

  it('--version and -V print the package version', async () => {
    // Regression: once bundled into dist/ (then dist/qdedup.mjs), yargs could not find package.json ("unknown").
    for (const flag of ['--version', '-V']) {
      const r = await q(flag);
      assert.equal(r.status, 0);
      assert.equal(r.stdout, `${VERSION}\n`);
      assert.equal(r.stderr, '');
    }
  });

  // ------------------------------------------------------------ usage errors: exit 1, never 2
  it('no command', async () => {
    assertFails(await q(), 'a command is needed', { usage: true });
  });

  it('unknown command', async () => {
    assertFails(await q('bogus'), "unknown command 'bogus'", { usage: true });
    assertFails(await q('dedup-everything', 'x.qcow2'), "unknown command 'dedup-everything'", { usage: true });
  });

  it('unknown option names the option, wherever it is', async () => {
    const file = await image();
    // Regression: an unknown option swallowed the next word, and the error was
    // "Not enough non-option arguments: got 0, need at least 1".
    assertFails(await q('info', '-x', file), 'Unknown argument: x', { usage: true });
    assertFails(await q('info', '--bogus', file), 'Unknown argument: bogus', { usage: true });
    assertFails(await q('info', file, '--bogus'), 'Unknown argument: bogus', { usage: true });
    assertFails(await q('--bogus'), 'Unknown argument: bogus', { usage: true });
    assertFails(await q('write', '-P', '1', '-Q', file, '0', '1'), 'Unknown argument: Q', { usage: true });
    assertFails(await q('create', '--cluster-size', '4k', join(dir, 'never.qcow2'), '1M'), 'Unknown argument: cluster-size', { usage: true });
    assert.ok(!existsSync(join(dir, 'never.qcow2')));
  });

  it('missing arguments', async () => {
    const file = await image();
    const notEnough = /^qdedup: Not enough non-option arguments: got \d, need at least \d$/;
    for (const args of [['info'], ['read'], ['write'], ['write', '-P', '1', file], ['check']]) {
      assertFails(await q(...args), notEnough, { usage: true });
    }
    assertFails(await q('create'), 'Expecting image file name', { usage: true }); // qemu-img's words
    assertFails(await q('create', join(dir, 'nosize.qcow2')), 'Image creation needs a size parameter', { usage: true });
    assert.ok(!existsSync(join(dir, 'nosize.qcow2')));
    assertFails(await q('write', '-P', '1', file, '0'), 'LENGTH is needed with -P and -z', { usage: true });
    assertFails(await q('write', file, '0', '1'), 'give exactly one of -P PATTERN, -i INPUT or -z', { usage: true });
    assertFails(await q('write', '-P', '1', '-z', file, '0', '1'), 'give exactly one of -P PATTERN, -i INPUT or -z', { usage: true });
    // Regression: yargs' own error for an option without its value was reported as an internal error.
    assertFails(await q('create', '-o'), 'Not enough arguments following: o', { usage: true });
    assertFails(await q('info', file, '--output'), 'Not enough arguments following: output', { usage: true });
  });

  it('bad sizes: 1.5, 1e3, 12X (qemu syntax: a fraction needs a suffix, no exponents, k/M/G/T/P/E only)', async () => {
    const file = await image();
    const before = sha256(file);
    for (const bad of ['1.5', '1e3', '12X', '-1', '1G-512', '']) {
      const target = join(dir, `bad-size-${bad || 'empty'}.qcow2`);
      assertFails(
        await q('create', target, bad),
        `invalid image size '${bad}': use a number of bytes, with an optional k, M, G, T, P or E suffix (powers of 1024)`,
        { usage: true },
      );
      assert.ok(!existsSync(target), `no file for size ${bad}`);
    }
    assertFails(await q('write', '-P', '1', file, '1e3', '1'), /^qdedup: invalid offset '1e3'/, { usage: true });
    assertFails(await q('write', '-P', '1', file, '0', '12X'), /^qdedup: invalid length '12X'/, { usage: true });
    assertFails(await q('read', file, '1.5'), /^qdedup: invalid offset '1.5'/, { usage: true });
    assert.equal(sha256(file), before);
    // …and what qemu accepts works: 1.5k, 0x200, 10b.
    const ok = await q('write', '-q', '-P', '1', file, '0x200', '1.5k');
    assert.equal(ok.status, 0, ok.stderr);
    assert.equal((await q('read', '-q', '-P', '1', file, '512', '1536')).status, 0);
  });

  it('bad pattern byte (qemu-io wording)', async () => {
    const file = await image();
    const before = sha256(file);
    for (const bad of ['0x1234', '256', 'x', '-1']) {
      assertFails(await q('write', '-P', bad, file, '0', '1'), `${bad} is not a valid pattern byte`, { usage: true });
      assertFails(await q('read', '-P', bad, file, '0', '1'), `${bad} is not a valid pattern byte`, { usage: true });
    }
    assert.equal(sha256(file), before);
  });

  it("--output other than human/json: qemu's message", async () => {
    const file = await image();
    for (const cmd of ['info', 'check']) {
      assertFails(await q(cmd, '--output', 'xml', file), '--output must be used with human or json', { usage: true });
      assertFails(await q(cmd, '--output=xml', file), '--output must be used with human or json', { usage: true });
    }
  });

  it('-f other than qcow2 is refused', async () => {
    const target = join(dir, 'raw.img');
    assertFails(await q('create', '-f', 'raw', target, '1M'), "unsupported image format 'raw' (qdedup handles qcow2 only)", { usage: true });
    assert.ok(!existsSync(target));
    const file = await image();
    assert.equal((await q('info', '-f', 'qcow2', file)).status, 0);
  });

  // ------------------------------------------------------------ create
  it('create refuses an existing file without --force, replaces it with --force', async () => {
    const file = await image('1M');
    const before = sha256(file);
    assertFails(await q('create', file, '2M'), `${file}: file exists (use --force to replace it)`, { usage: false });
    assert.equal(sha256(file), before, 'the existing file is untouched');
    const other = join(dir, 'not-an-image.txt');
    writeFileSync(other, 'precious');
    assertFails(await q('create', other, '1M'), `${other}: file exists (use --force to replace it)`, { usage: false });
    assert.equal(readFileSync(other, 'utf8'), 'precious');
    const r = await q('create', '--force', file, '2M');
    assert.equal(r.status, 0, r.stderr);
    assert.equal(
      r.stdout,
      `Formatting '${file}', fmt=qcow2 cluster_size=4096 compat=1.1 size=2097152 lazy_refcounts=off refcount_bits=16 dedup=sha256 dedup_verify=off\n`,
    );
    const info = JSON.parse((await q('info', '--output', 'json', file)).stdout);
    assert.equal(info['virtual-size'], 2 * 1024 * 1024);
  });

  it('create -o help / -o ? list the options and exit 0', async () => {
    for (const help of ['help', '?']) {
      const r = await q('create', '-o', help);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stderr, '');
      for (const opt of ['backing_file', 'backing_fmt', 'cluster_size', 'compat', 'lazy_refcounts', 'refcount_bits', 'size']) {
        assert.match(r.stdout, new RegExp(`^  ${opt}=<`, 'm'), opt);
      }
    }
  });

  it("create -o foo=1: Invalid parameter 'foo' (qemu-img's words), no file", async () => {
    const target = join(dir, 'foo.qcow2');
    assertFails(await q('create', '-o', 'foo=1', target, '1M'), "Invalid parameter 'foo'", { usage: true });
    assertFails(await q('create', '-o', 'cluster_size=4k,foo', target, '1M'), "Invalid parameter 'foo'", { usage: true });
    assert.ok(!existsSync(target));
  });

  // qemu-img create's messages (qemu-img-behaviour.md §1); each refused, no file left behind.
  const CREATE_REFUSALS: [string, string][] = [
    ['cluster_size=256', 'Cluster size must be a power of two between 512 and 2048k'],
    ['cluster_size=3000', 'Cluster size must be a power of two between 512 and 2048k'],
    ['cluster_size=4M', 'Cluster size must be a power of two between 512 and 2048k'],
    ['refcount_bits=3', 'Refcount width must be a power of two and may not exceed 64 bits'],
    ['refcount_bits=128', 'Refcount width must be a power of two and may not exceed 64 bits'],
    ['compat=0.10,refcount_bits=8', 'Different refcount widths than 16 bits require compatibility level 1.1 or above'],
    ['compat=0.10,lazy_refcounts=on', 'Lazy refcounts only supported with compatibility level 1.1 and above'],
  ];
  it('create -o validations word their refusals as qemu-img does', async () => {
    await Promise.all(
      CREATE_REFUSALS.map(async ([opts, message], i) => {
        const target = join(dir, `refused-${i}.qcow2`);
        const r = await q('create', '-o', opts, target, '1M');
        assertFails(r, new RegExp(`^qdedup: ${message.replace(/[()]/g, '\\$&')}`), { usage: true });
        assert.ok(!existsSync(target), `${opts}: no file`);
        if (HAVE_QEMU) {
          const qemuTarget = join(dir, `refused-qemu-${i}.qcow2`);
          const qr = await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, qemuTarget, '1M']);
          assert.equal(qr.status, 1, `qemu-img refuses ${opts} too`);
          assert.ok(qr.stderr.includes(message), `qemu-img says: ${qr.stderr}`);
        }
      }),
    );
    // The limits themselves are accepted.
    for (const opts of ['cluster_size=512', 'cluster_size=2M', 'refcount_bits=1', 'refcount_bits=64', 'compat=0.10']) {
      const r = await q('create', '-q', '-o', opts, join(dir, `ok-${opts.replace(/[=,.]/g, '_')}.qcow2`), '1M');
      assert.equal(r.status, 0, `${opts}: ${r.stderr}`);
    }
  });

  // ------------------------------------------------------------ write and read
  it('write past the end: exit 1, nothing written (not even the header)', async () => {
    const file = await image('1M');
    // An unknown autoclear bit: a read-write open would clear it before writing anything.
    const bytes = readFileSync(file);
    bytes.writeBigUInt64BE(1n << 40n, 88);
    writeFileSync(file, bytes);
    const before = sha256(file);
    for (const [offset, length] of [
      ['1M', '1'],
      ['0', '1049600'],
      ['1048575', '2'],
      ['2M', '0x10'],
    ]) {
      const r = await q('write', '-P', '0xab', file, offset, length);
      assertFails(r, /^qdedup: .*img-\d+\.qcow2: offset \d+ \+ length \d+ is past the end of the disk \(virtual size 1048576\)$/, { usage: false });
      assert.equal(sha256(file), before, `write ${offset} ${length} left the file unchanged`);
    }
    const z = await q('write', '-z', file, '1M', '512');
    assertFails(z, /past the end of the disk/, { usage: false });
    const input = join(dir, 'input.bin');
    writeFileSync(input, Buffer.alloc(4096, 7));
    assertFails(await q('write', '-i', input, file, '1044481'), /past the end of the disk/, { usage: false });
    assert.equal(sha256(file), before);
    // The last byte itself is fine.
    const last = await q('write', '-P', '0xab', file, '1048575', '1');
    assert.equal(last.status, 0, last.stderr);
    assert.equal(last.stdout, 'wrote 1/1 bytes at offset 1048575\n');
  });

  it('read past the end: exit 1', async () => {
    const file = await image('1M');
    assertFails(await q('read', '-P', '0', file, '1M', '1'), /past the end of the disk \(virtual size 1048576\)$/, { usage: false });
    assertFails(await q('read', file, '0', '2M'), /past the end of the disk/, { usage: false });
  });

  it('a missing file: every command exits 1 naming it', async () => {
    const cwd = tempDir('qdedup-cli-missing-');
    for (const args of [['info'], ['read'], ['write', '-P', '1'], ['check']]) {
      const extra = args[0] === 'write' ? ['0', '1'] : [];
      const r = await qIn(cwd, ...args, 'nothere.qcow2', ...extra);
      assertFails(r, 'nothere.qcow2: cannot open: No such file or directory', { usage: false });
    }
    assert.ok(!existsSync(join(cwd, 'nothere.qcow2')), 'write did not create it');
    const input = await qIn(cwd, 'write', '-i', 'no-input.bin', 'nothere.qcow2', '0');
    assertFails(input, /^qdedup: no-input\.bin: cannot read input: No such file or directory$/, { usage: false });
    assertFails(await qIn(cwd, 'create', 'no/such/dir/x.qcow2', '1M'), 'no/such/dir/x.qcow2: cannot create: No such file or directory', { usage: false });
  });

  it('--output json on a failure: the error as JSON on stdout, one line on stderr', async () => {
    const cwd = tempDir('qdedup-cli-json-');
    const r = await qIn(cwd, 'info', '--output', 'json', 'nothere.qcow2');
    assert.equal(r.status, 1);
    assert.equal(r.stderr, 'qdedup: nothere.qcow2: cannot open: No such file or directory\n');
    const doc = JSON.parse(r.stdout);
    assert.equal(doc.error.code, 'ENOENT');
    assert.equal(doc.error.path, 'nothere.qcow2');
  });

  it('write then read: qemu-io lines, -q silences them', async () => {
    const file = await image('4M');
    const w = await q('write', '-P', '0x5a', file, '1000', '70000');
    assert.equal(w.status, 0, w.stderr);
    assert.equal(w.stdout, 'wrote 70000/70000 bytes at offset 1000\n');
    const r = await q('read', '-P', '0x5a', file, '1000', '70000');
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, 'read 70000/70000 bytes at offset 1000\n');
    const bad = await q('read', '-P', '0x5a', file, '0', '2000');
    assert.equal(bad.status, 1);
    assert.equal(bad.stdout, 'Pattern verification failed at offset 0, 2000 bytes\nread 2000/2000 bytes at offset 0\n');
    assert.equal(bad.stderr, 'qdedup: first byte that differs from 0x5a is at offset 0\n');
    const quiet = await q('write', '-q', '-P', '1', file, '0', '1');
    assert.equal(quiet.stdout, '');
    assert.equal(quiet.stderr, '');
    const v = await q('read', '-v', file, '1000', '16');
    assert.equal(v.stdout, '000003e8:  5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a  ZZZZZZZZZZZZZZZZ\nread 16/16 bytes at offset 1000\n');
  });

  // ------------------------------------------------------------ info --output json vs qemu-img
  it("info --output json has qemu-img info --output=json's keys and values", { skip: NO_QEMU }, async () => {
    const cwd = tempDir('qdedup-cli-info-');
    const made: [string, string[]][] = [
      ['v3.qcow2', ['create', '-q', '-o', 'dedup=off', 'v3.qcow2', '1G']],
      ['v2.qcow2', ['create', '-q', '-o', 'compat=0.10', 'v2.qcow2', '100000']],
      ['lazy-4k.qcow2', ['create', '-q', '-o', 'lazy_refcounts=on,cluster_size=4k,refcount_bits=8,dedup=off', 'lazy-4k.qcow2', '64M']],
      ['overlay.qcow2', ['create', '-q', '-o', 'dedup=off', '-b', 'v3.qcow2', '-F', 'qcow2', 'overlay.qcow2']],
      ['overlay-raw.qcow2', ['create', '-q', '-o', 'dedup=off', '-b', 'base.raw', '-F', 'raw', 'overlay-raw.qcow2']],
      ['written.qcow2', ['create', '-q', '-o', 'dedup=off', 'written.qcow2', '8M']],
    ];
    writeFileSync(join(cwd, 'base.raw'), Buffer.alloc(1 << 20));
    for (const [, args] of made) {
      const r = await qIn(cwd, ...args);
      assert.equal(r.status, 0, `${args.join(' ')}: ${r.stderr}`);
    }
    assert.equal((await qIn(cwd, 'write', '-q', '-P', '7', 'written.qcow2', '4k', '3M')).status, 0);
    // A dirty image (incompatible bit 0), as a crash under lazy refcounts leaves it.
    const dirty = join(cwd, 'dirty.qcow2');
    const bytes = readFileSync(join(cwd, 'v3.qcow2'));
    bytes.writeBigUInt64BE(1n, 72);
    writeFileSync(dirty, bytes);
    made.push(['dirty.qcow2', []]);
    // An overlay whose backing file is missing: qemu-img info still describes it, so must we.
    const orphan = readFileSync(join(cwd, 'overlay.qcow2'));
    writeFileSync(join(cwd, 'orphan.qcow2'), orphan);
    writeFileSync(join(cwd, 'sub-overlay.qcow2'), orphan);
    made.push(['orphan.qcow2', []]);

    for (const [name] of made) {
      const ours = await qIn(cwd, 'info', '--output', 'json', name);
      const theirs = await exec('qemu-img', ['info', '-f', 'qcow2', '--output=json', name], {}, cwd);
      assert.equal(ours.status, 0, `${name}: ${ours.stderr}`);
      assert.equal(theirs.status, 0, `${name}: ${theirs.stderr}`);
      assert.deepEqual(JSON.parse(ours.stdout), JSON.parse(theirs.stdout), `${name}: same JSON as qemu-img info`);
    }
    // A path with a folder: full-backing-filename combines the image's folder and the name, like qemu.
    const ours = JSON.parse((await q('info', '--output', 'json', join(cwd, 'overlay.qcow2'))).stdout);
    const theirs = JSON.parse((await exec('qemu-img', ['info', '-f', 'qcow2', '--output=json', join(cwd, 'overlay.qcow2')])).stdout);
    assert.deepEqual(ours, theirs);
    assert.equal(ours['full-backing-filename'], join(cwd, 'v3.qcow2'));
  });

  it('info (human) on an image whose backing file is missing names the backing file', async () => {
    const cwd = tempDir('qdedup-cli-orphan-');
    assert.equal((await qIn(cwd, 'create', '-q', 'base.qcow2', '1M')).status, 0);
    assert.equal((await qIn(cwd, 'create', '-q', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2')).status, 0);
    const { rmSync } = await import('node:fs');
    rmSync(join(cwd, 'base.qcow2'));
    const r = await qIn(cwd, 'info', 'top.qcow2');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^backing file: base\.qcow2$/m);
    assert.match(r.stdout, /^backing file format: qcow2$/m);
    // Guest I/O needs the backing file: that fails, naming it.
    assertFails(
      await qIn(cwd, 'read', '-P', '0', 'top.qcow2', '0', '512'),
      /^qdedup: .*base\.qcow2: cannot open backing file 'base\.qcow2': No such file or directory$/,
      { usage: false },
    );
  });

  // ------------------------------------------------------------ pipes and colour
  it('read … | head -1 ends quietly (exit 0, no EPIPE trace)', async () => {
    const file = await image('64M');
    assert.equal((await q('write', '-q', '-P', '0xab', file, '0', '64M')).status, 0);
    for (const args of [
      ['read', '-v', file],
      ['read', file],
      ['info', file],
      ['read', '-v', file, '0', '1M'],
    ]) {
      const quoted = [process.execPath, BIN, ...args].map((a) => `'${a}'`).join(' ');
      const r = await exec('bash', ['-c', `${quoted} | head -c 1 >/dev/null; s=("\${PIPESTATUS[@]}"); echo "status=\${s[0]}"`]);
      assert.equal(r.stdout.trim(), 'status=0', `${args.join(' ')} | head: ${r.stderr}`);
      assert.equal(r.stderr, '', `${args.join(' ')} | head: nothing on stderr`);
    }
    // and through a real `head -1`, the hexdump's first line
    const r = await exec('bash', ['-c', `'${process.execPath}' '${BIN}' read -v '${file}' | head -1`]);
    assert.equal(r.stdout, '00000000:  ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab  ................\n');
    assert.equal(r.stderr, '');
  });

  it(
    'a non-blocking stdout pipe that fills up: every byte arrives, in order',
    { skip: !existsSync('/usr/bin/python3') && 'python3 not installed' },
    async () => {
      // Output.out writes descriptor 1 itself; a pipe the parent made non-blocking refuses
      // (EAGAIN) once full, and the rest must go on through the stream, which waits.
      const file = await image('1M');
      assert.equal((await q('write', '-q', '-P', '0xab', file, '0', '1M')).status, 0);
      const expected = await q('read', '-v', file);
      const script = [
        'import os, subprocess, sys, time',
        'r, w = os.pipe()',
        'os.set_blocking(w, False)',
        'p = subprocess.Popen(sys.argv[1:], stdout=w)',
        'os.close(w)',
        'time.sleep(0.5)',
        'out = b""',
        'while chunk := os.read(r, 65536): out += chunk',
        'sys.stdout.buffer.write(out)',
        'sys.exit(p.wait())',
      ].join('\n');
      const r = await exec('/usr/bin/python3', ['-c', script, process.execPath, BIN, 'read', '-v', file]);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stderr, '');
      assert.ok(expected.stdout.length > 1 << 20, 'more than a pipe holds');
      assert.equal(r.stdout, expected.stdout);
    },
  );

  it('read refuses to dump raw bytes to a terminal', { skip: !existsSync('/usr/bin/script') && 'script(1) not installed' }, async () => {
    const file = await image('1M');
    const r = await exec('script', ['-qec', `'${process.execPath}' '${BIN}' read '${file}'`, '/dev/null']);
    assert.equal(r.status, 1);
    assert.match(r.stdout, /qdedup: refusing to write raw disk bytes to a terminal/);
  });

  it('NO_COLOR: no escape sequences, even on a terminal', { skip: !existsSync('/usr/bin/script') && 'script(1) not installed' }, async () => {
    const file = await image('1M');
    // Leak a cluster (refcount 1 on a free cluster) so check has something to report.
    const bytes = readFileSync(file);
    const refblock = Number(bytes.readBigUInt64BE(Number(bytes.readBigUInt64BE(48))));
    bytes.writeUInt16BE(1, refblock + 2 * 10);
    writeFileSync(file, bytes);
    for (const args of [['info', file], ['check', file], ['read', '-P', '1', file, '0', '1'], ['info', join(dir, 'nothere.qcow2')], ['bogus']]) {
      const cmd = [process.execPath, BIN, ...args].map((a) => `'${a}'`).join(' ');
      const r = await exec('script', ['-qec', cmd, '/dev/null'], { NO_COLOR: '1', FORCE_COLOR: undefined, TERM: 'xterm-256color' });
      assert.doesNotMatch(r.stdout + r.stderr, /\x1b\[/, `${args.join(' ')}: no ANSI escapes under NO_COLOR`);
    }
    // The rule itself: --color/--no-color win, then FORCE_COLOR, then NO_COLOR, then the TTY.
    const saved = { NO_COLOR: process.env.NO_COLOR, FORCE_COLOR: process.env.FORCE_COLOR };
    try {
      delete process.env.FORCE_COLOR;
      process.env.NO_COLOR = '1';
      assert.equal(colorLevel(undefined, true), 0);
      assert.equal(colorLevel(true, true), 1);
      delete process.env.NO_COLOR;
      assert.equal(colorLevel(undefined, false), 0);
    } finally {
      for (const [k, v] of Object.entries(saved))
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
    }
  });

  it('exit codes: usage and I/O failures are 1, never 2 (2 means corruptions to scripts)', async () => {
    const file = await image('1M');
    const failures = await Promise.all([
      q(),
      q('bogus'),
      q('info'),
      q('info', '--output', 'xml', file),
      q('create', file, '1M'),
      q('write', '-P', '1', file, '2M', '1'),
      q('read', join(dir, 'missing.qcow2')),
      q('create', '-o', 'cluster_size=1k,refcount_bits=3', join(dir, 'x.qcow2'), '1M'),
    ]);
    for (const r of failures) assert.equal(r.status, 1, r.stderr);
    assert.ok(statSync(file).size > 0);
  });
});
