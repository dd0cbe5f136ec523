// `qdedup convert` through the real bin/qdedup, qemu-img as the oracle: raw and qcow2 sources
// (compressed and zero clusters, a backing chain, several sources concatenated) into a dedup
// image, a plain image and a sparse raw file; `qemu-img compare` says identical and `qemu-img
// check` finds nothing; duplicates share clusters, zeros become zero clusters; bad input gets
// a one-line error and exit 1; a target another process holds is refused.

import { describe, it, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { HAVE_QEMU, NO_QEMU, qdedup, qemuCheck, run, tempDir } from '../helpers.ts';

const CS = 4096;
const dir = tempDir('qdedup-convert-');

/** 4 MiB: 256 KiB blocks that repeat, a zero run, unique data, a partial tail block. */
function sample(): Buffer {
  const a = randomBytes(256 * 1024);
  const b = randomBytes(256 * 1024);
  return Buffer.concat([a, b, a, Buffer.alloc(512 * 1024), a, randomBytes(1024 * 1024), b, a, b, randomBytes(CS * 3 + 100)]);
}

function compare(a: string, b: string, fa = 'raw', fb = 'qcow2'): string {
  const r = run('qemu-img', ['compare', '-f', fa, '-F', fb, a, b]);
  assert.equal(r.status, 0, `qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** qemu-img map --output=json of a qcow2 file. */
function qemuMap(path: string): { start: number; length: number; zero: boolean; data: boolean; offset?: number }[] {
  return JSON.parse(run('qemu-img', ['map', '--output=json', '-f', 'qcow2', path]).stdout);
}

describe('qdedup convert', { skip: NO_QEMU }, () => {
  const raw = join(dir, 'src.raw');
  let data: Buffer;
  before(() => {
    data = sample();
    writeFileSync(raw, data);
  });

  it('raw into a dedup image: identical, clean, duplicates stored once, zeros not stored', () => {
    const out = join(dir, 'dedup.qcow2');
    const r = qdedup(['convert', raw, out]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, '', 'silent on success, as qemu-img convert');
    assert.match(compare(raw, out), /Images are identical/);
    assert.equal(qemuCheck(out).status, 0);
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', out]).stdout);
    assert.equal(info['virtual-size'], Math.ceil(data.length / 512) * 512, 'rounded up to a sector, as qemu-img convert does');
    assert.equal(info['cluster-size'], CS);
    // Stored: a, b, the 1 MiB of unique data and the tail, once each (plus metadata).
    const unique = 256 * 1024 * 2 + 1024 * 1024 + CS * 4;
    const mapped = qemuMap(out)
      .filter((m) => m.data)
      .reduce((n, m) => n + m.length, 0);
    assert.equal(mapped, info['virtual-size'] - 512 * 1024, 'every cluster but the zero run maps to data');
    const stats = JSON.parse(qdedup(['dedup-stats', '--output', 'json', out]).stdout);
    assert.equal(stats['data-clusters'], unique / CS, 'each distinct cluster stored once');
    assert.equal(stats['guest-clusters'], (data.length - 512 * 1024 + CS - 100) / CS, 'every cluster that is not zero maps');
    assert.ok(statSync(out).size < unique + 2 * 1024 * 1024, `file ${statSync(out).size} bytes for ${unique} unique`);
    assert.ok(
      qemuMap(out).some((m) => m.zero && !m.data && m.start === 256 * 1024 * 3),
      'the zero run is a zero range',
    );
  });

  it('a qcow2 source with compressed clusters, zero clusters and a backing file: flattened', () => {
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    const want = Buffer.alloc(2 * 1024 * 1024);
    // The base: compressed data from a raw file (qemu-img convert -c).
    const baseRaw = join(dir, 'base.raw');
    const text = Buffer.from('compressible text '.repeat(100000)).subarray(0, want.length);
    writeFileSync(baseRaw, text);
    text.copy(want);
    assert.equal(run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', baseRaw, base]).status, 0);
    assert.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]).status, 0);
    assert.equal(run('qemu-io', ['-c', 'write -P 0x5a 64k 128k', '-c', 'write -z 1M 64k', top]).status, 0);
    want.fill(0x5a, 64 * 1024, 192 * 1024);
    want.fill(0, 1024 * 1024, 1024 * 1024 + 64 * 1024);
    const wantPath = join(dir, 'top-want.raw');
    writeFileSync(wantPath, want);
    const out = join(dir, 'flat.qcow2');
    const r = qdedup(['convert', '-f', 'qcow2', top, out]);
    assert.equal(r.status, 0, r.stderr);
    compare(wantPath, out);
    compare(top, out, 'qcow2', 'qcow2');
    assert.equal(qemuCheck(out).status, 0);
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', out]).stdout);
    assert.equal(info['backing-filename'], undefined, 'no backing file: the chain is flattened');
  });

  it('-O raw: identical and sparse; -o dedup=off: a plain image with zero clusters', () => {
    const out = join(dir, 'out.raw');
    assert.equal(qdedup(['convert', '-O', 'raw', raw, out]).status, 0);
    assert.ok(readFileSync(out).equals(data));
    assert.ok(statSync(out).blocks * 512 <= data.length - 512 * 1024 + CS, `the zero run is a hole (${statSync(out).blocks * 512} bytes allocated)`);
    const plain = join(dir, 'plain.qcow2');
    assert.equal(qdedup(['convert', '-o', 'dedup=off,cluster_size=64k', raw, plain]).status, 0);
    compare(raw, plain);
    assert.equal(qemuCheck(plain).status, 0);
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', plain]).stdout);
    assert.equal(info['cluster-size'], 65536);
    assert.ok(!qemuMap(plain).some((m) => m.data && m.start <= 256 * 1024 * 3 && m.start + m.length > 256 * 1024 * 3 + 65536), 'zeros are not written as data');
  });

  it('several sources are concatenated; -n writes into an existing image', () => {
    const second = join(dir, 'second.raw');
    const more = randomBytes(64 * 1024 + 512);
    writeFileSync(second, more);
    const both = join(dir, 'both.raw');
    writeFileSync(both, Buffer.concat([data, more]));
    const out = join(dir, 'cat.qcow2');
    assert.equal(qdedup(['convert', raw, second, out]).status, 0);
    compare(both, out);
    const existing = join(dir, 'existing.qcow2');
    assert.equal(qdedup(['create', '-q', existing, '8M']).status, 0);
    assert.equal(qdedup(['convert', '-n', second, existing]).status, 0);
    const head = join(dir, 'head.raw');
    writeFileSync(head, Buffer.concat([more, Buffer.alloc(8 * 1024 * 1024 - more.length)]));
    compare(head, existing);
    const small = join(dir, 'small.qcow2');
    assert.equal(qdedup(['create', '-q', small, '1M']).status, 0);
    const tooSmall = qdedup(['convert', '-n', raw, small]);
    assert.equal(tooSmall.status, 1);
    assert.match(tooSmall.stderr, /smaller than the sources/);
  });

  it('bad input: one line, exit 1, no target left behind by a missing source', () => {
    const out = join(dir, 'never.qcow2');
    for (const [args, pattern] of [
      [['convert', join(dir, 'missing.raw'), out], /missing\.raw.*No such file or directory/],
      [['convert', '-O', 'vmdk', raw, out], /Unknown file format 'vmdk'/],
      [['convert', raw], /Expecting a source and a target/],
      [['convert', '-o', 'cluster_size=3000', raw, out], /Cluster size must be a power of two/],
    ] as [string[], RegExp][]) {
      const r = qdedup(args);
      assert.equal(r.status, 1, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, pattern);
      assert.equal(r.stderr.trim().split('\n').length <= 2, true, r.stderr);
      assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
    }
    assert.equal(existsSync(out), false);
  });

  it('a target another process holds is refused, unchanged', async () => {
    const held = join(dir, 'held.qcow2');
    assert.equal(qdedup(['create', '-q', held, '8M']).status, 0);
    const io = spawn('qemu-io', ['-f', 'qcow2', held], { stdio: ['pipe', 'pipe', 'pipe'] });
    try {
      await new Promise((resolve) => setTimeout(resolve, 500));
      const before = readFileSync(held); // qemu-io, opening it for writing, has cleared bit 60 by now
      const r = qdedup(['convert', raw, held]);
      assert.equal(r.status, 1);
      assert.match(r.stderr, /Failed to get "write" lock/);
      assert.ok(readFileSync(held).equals(before), 'the held image is unchanged');
    } finally {
      io.stdin.end('quit\n');
      await new Promise((resolve) => io.on('close', resolve));
    }
  });
});

if (!HAVE_QEMU) console.log('# convert tests skipped: qemu-img/qemu-io not installed');
