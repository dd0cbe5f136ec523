// `convert -c` and `write -c` through the real bin/qdedup, qemu-img as the oracle: the image
// compares identical to its source, checks clean, holds compressed clusters and is smaller
// than qemu-img's own `convert -c` at the same cluster size or within a few per cent, into
// plain and into dedup images.

import { describe, it, before } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NO_QEMU, qdedup, qemuCheck, qemuCompareRaw, run, tempDir } from '../helpers.ts';

const dir = tempDir('qdedup-compress-');

/** 3 MiB of text-like lines (compressible), then random bytes, zeros, more text, a partial tail. */
function sample(): Buffer {
  const lines: string[] = [];
  for (let i = 0, n = 0; n < 2 * 1024 * 1024; i++) n += lines[lines.push(`line ${i} of a log: cluster ${(i * 2654435761) % 1000003} written\n`) - 1].length;
  const text = Buffer.from(lines.join(''));
  return Buffer.concat([
    text,
    Buffer.from(Array.from({ length: 512 * 1024 }, (_, i) => (i * 2654435761) >>> 24)),
    Buffer.alloc(256 * 1024),
    text.subarray(0, 300000),
  ]);
}

describe('compressed writes from the command line', { skip: NO_QEMU }, () => {
  const raw = join(dir, 'src.raw');
  before(() => writeFileSync(raw, sample()));

  for (const cluster of ['4k', '64k']) {
    it(`convert -c -o dedup=off,cluster_size=${cluster}: identical, clean, compressed, as small as qemu-img's`, () => {
      const out = join(dir, `c-${cluster}.qcow2`);
      const r = qdedup(['convert', '-c', '-o', `dedup=off,cluster_size=${cluster}`, raw, out]);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout + r.stderr, '');
      assert.ok(qemuCompareRaw(out, raw));
      const check = qemuCheck(out);
      assert.equal(check.status, 0, check.stderr);
      assert.ok(Number(check.json!['compressed-clusters']) > 0);
      const theirs = join(dir, `q-${cluster}.qcow2`);
      assert.equal(run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cluster}`, raw, theirs]).status, 0);
      assert.ok(statSync(out).size <= statSync(theirs).size * 1.05, `${statSync(out).size} bytes against qemu-img's ${statSync(theirs).size}`);
    });
  }

  it('write -c into a plain image: the bytes compressed, qemu-io reads them', () => {
    const img = join(dir, 'w.qcow2');
    assert.equal(qdedup(['create', '-q', '-o', 'dedup=off,cluster_size=4k', img, '4M']).status, 0);
    const r = qdedup(['write', '-q', '-c', '-i', raw, img, '0', '1M']);
    assert.equal(r.status, 0, r.stderr);
    const pattern = qdedup(['write', '-q', '-c', '-P', '0x61', img, '3M', '64k']);
    assert.equal(pattern.status, 0, pattern.stderr);
    assert.equal(run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x61 3M 64k', img]).status, 0);
    const head = join(dir, 'head.raw');
    writeFileSync(
      head,
      Buffer.concat([readFileSync(raw).subarray(0, 1024 * 1024), Buffer.alloc(2 * 1024 * 1024), Buffer.alloc(64 * 1024, 0x61), Buffer.alloc(960 * 1024)]),
    );
    assert.ok(qemuCompareRaw(img, head));
    const check = qemuCheck(img);
    assert.equal(check.status, 0, check.stderr);
    assert.ok(Number(check.json!['compressed-clusters']) > 0);
  });

  it('-c into a dedup image (the default target): identical, clean, smaller than compression or dedup alone', () => {
    const out = join(dir, 'both.qcow2');
    const r = qdedup(['convert', '-c', raw, out]);
    assert.equal(r.status, 0, r.stderr);
    assert.ok(qemuCompareRaw(out, raw));
    const check = qemuCheck(out);
    assert.equal(check.status, 0, check.stderr);
    assert.ok(Number(check.json!['compressed-clusters']) > 0);
    assert.equal(qdedup(['check', '--deep', '-q', out]).status, 0);
    const rawOut = qdedup(['convert', '-c', '-O', 'raw', raw, join(dir, 'x.raw')]);
    assert.equal(rawOut.status, 1);
    assert.match(rawOut.stderr, /-c is for a qcow2 target/);
  });
});
