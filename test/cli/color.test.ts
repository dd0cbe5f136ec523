// The command line as a qemu-img user expects it, through the real
// bin/qdedup: colour (--color[=WHEN], --no-color, FORCE_COLOR, NO_COLOR; never in JSON),
// `--` ending the options, and an unknown command named as such.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BIN, qdedup, tempDir } from '../helpers.ts';

const dir = tempDir('qdedup-color-');
const ESC = /\x1b\[/;

/** bin/qdedup with exactly these colour variables (others removed); stdout and stderr are pipes. */
function q(env: Record<string, string>, ...args: string[]) {
  const base = { ...process.env };
  for (const k of ['NO_COLOR', 'FORCE_COLOR', 'TERM']) delete base[k];
  const r = spawnSync(process.execPath, [BIN, ...args], { env: { ...base, ...env }, encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function image(): string {
  const file = join(dir, `img-${Math.random().toString(36).slice(2)}.qcow2`);
  assert.equal(qdedup(['create', '-q', file, '1M']).status, 0);
  assert.equal(qdedup(['write', '-q', '-P', '1', file, '0', '8k']).status, 0);
  return file;
}

/** A plain image with one leaked cluster (check exits 3). */
function leakyImage(): string {
  const file = join(dir, `leaky-${Math.random().toString(36).slice(2)}.qcow2`);
  assert.equal(qdedup(['create', '-q', file, '1M']).status, 0);
  const bytes = readFileSync(file);
  const refblock = Number(bytes.readBigUInt64BE(Number(bytes.readBigUInt64BE(48))));
  bytes.writeUInt16BE(1, refblock + 2 * (bytes.length / 4096)); // a cluster appended below, referenced by nothing
  writeFileSync(file, Buffer.concat([bytes, Buffer.alloc(4096)]));
  return file;
}

describe('colour', () => {
  it('off on pipes by default; FORCE_COLOR and --color turn it on: check verdict green, error prefix red', () => {
    const file = image();
    const plain = q({}, 'check', file);
    assert.equal(plain.status, 0);
    assert.doesNotMatch(plain.stdout + plain.stderr, ESC);
    for (const [env, args] of [
      [{ FORCE_COLOR: '1' }, []],
      [{}, ['--color']],
      [{}, ['--color=always']],
      [{ NO_COLOR: '1' }, ['--color']],
    ] as const) {
      const r = q(env, ...args, 'check', file);
      assert.equal(r.status, 0);
      assert.equal(r.stdout.split('\n')[0], '\x1b[32m\x1b[1mNo errors were found on the image.\x1b[22m\x1b[39m', JSON.stringify(env) + args.join(' '));
      const err = q(env, ...args, 'info', join(dir, 'missing.qcow2'));
      assert.equal(err.status, 1);
      assert.match(err.stderr, /^\x1b\[31m\x1b\[1mqdedup:\x1b\[22m\x1b\[39m .*missing\.qcow2/);
    }
  });

  it('NO_COLOR, FORCE_COLOR=0, --no-color and --color=never turn it off, even when forced otherwise', () => {
    const file = leakyImage();
    for (const [env, args] of [
      [{ NO_COLOR: '1' }, []],
      [{ FORCE_COLOR: '0' }, []],
      [{ FORCE_COLOR: '1' }, ['--no-color']],
      [{ FORCE_COLOR: '1' }, ['--color=never']],
    ] as const) {
      const r = q(env, ...args, 'check', file);
      assert.equal(r.status, 3);
      assert.doesNotMatch(r.stdout + r.stderr, ESC, JSON.stringify(env) + args.join(' '));
    }
    // and on: leaks in yellow
    const r = q({ FORCE_COLOR: '1' }, 'check', file);
    assert.match(r.stdout, /\x1b\[33m\x1b\[1m1 leaked clusters were found on the image\.\x1b\[22m\x1b\[39m/);
  });

  it('corruptions in red; dedup-stats ratio coloured; --color=auto follows the stream; JSON never coloured', () => {
    const file = join(dir, 'corrupt.qcow2');
    copyFileSync(leakyImage(), file);
    const bytes = readFileSync(file);
    const refblock = Number(bytes.readBigUInt64BE(Number(bytes.readBigUInt64BE(48))));
    bytes.writeUInt16BE(0, refblock); // the header's cluster now has refcount 0
    writeFileSync(file, bytes);
    const bad = q({ FORCE_COLOR: '1' }, 'check', file);
    assert.equal(bad.status, 2);
    assert.match(bad.stdout, /\x1b\[31m\x1b\[1m\d+ errors were found on the image\.\x1b\[22m/);
    const dedup = image();
    const stats = q({ FORCE_COLOR: '1' }, 'dedup-stats', dedup);
    assert.match(stats.stdout, /dedup ratio: +\x1b\[32m\x1b\[1m2\.00\x1b\[22m\x1b\[39m/);
    assert.doesNotMatch(q({}, '--color=auto', 'dedup-stats', dedup).stdout, ESC);
    for (const cmd of ['check', 'dedup-stats', 'info', 'map']) {
      const r = q({ FORCE_COLOR: '1' }, '--color', cmd, '--output', 'json', dedup);
      assert.equal(r.status, 0, r.stderr);
      assert.doesNotMatch(r.stdout, ESC, cmd);
      JSON.parse(r.stdout);
    }
  });

  it('--color=WHEN with a bad WHEN is a usage error', () => {
    const r = q({}, '--color=sometimes', 'info', 'x.qcow2');
    assert.equal(r.status, 1);
    assert.equal(r.stderr, "qdedup: invalid argument 'sometimes' for '--color' (always, never or auto)\nTry 'qdedup --help' for more information.\n");
  });
});

describe('-- ends the options', () => {
  it('info -- FILE, and a file whose name starts with a dash', () => {
    const file = image();
    const r = qdedup(['info', '--', file]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^image: /);
    const dashed = join(dir, '-image.qcow2');
    copyFileSync(file, dashed);
    const d = spawnSync(process.execPath, [BIN, 'info', '--output', 'json', '--', '-image.qcow2'], {
      cwd: dir,
      encoding: 'utf8',
      env: { ...process.env, NO_COLOR: '1' },
    });
    assert.equal(d.status, 0, d.stderr);
    assert.equal(JSON.parse(d.stdout).filename, '-image.qcow2');
    // without --, the dash makes it an option
    assert.equal(spawnSync(process.execPath, [BIN, 'info', '-image.qcow2'], { cwd: dir }).status, 1);
    // read -P … -- FILE OFFSET LENGTH; map -- FILE
    assert.equal(qdedup(['read', '-P', '1', '--', file, '0', '8k']).status, 0);
    assert.equal(qdedup(['map', '--output', 'json', '--', file]).status, 0);
    // too many words after -- are named as typed
    const extra = qdedup(['info', '--', file, '-z']);
    assert.equal(extra.status, 1);
    assert.match(extra.stderr, /^qdedup: Unknown argument: -z\n/);
  });
});

describe('unknown commands', () => {
  it('are named, with the --help hint, exit 1; a suggestion only for a clear typo', () => {
    const cases: [string, string][] = [
      ['foo', "qdedup: unknown command 'foo'"],
      ['raed', "qdedup: unknown command 'raed' (did you mean 'read'?)"],
      ['chek', "qdedup: unknown command 'chek' (did you mean 'check'?)"],
      ['dedupstats', "qdedup: unknown command 'dedupstats' (did you mean 'dedup-stats'?)"],
      ['compare', "qdedup: unknown command 'compare'"],
    ];
    for (const [word, line] of cases) {
      const r = qdedup([word, 'disk.qcow2']);
      assert.equal(r.status, 1, word);
      assert.equal(r.stdout, '');
      assert.equal(r.stderr, `${line}\nTry 'qdedup --help' for more information.\n`);
    }
  });
});
