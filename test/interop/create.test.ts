// Images made by `qdedup create` pass `qemu-img check` and `qemu-img info` agrees on size,
// cluster size, compat and refcount width, for every cluster size and both compat levels
// (and every refcount width at v3). Plain images (dedup=off) check clean; dedup images
// (the default) check clean too (the holder snapshot holds the dedup store's clusters) and
// show the holder snapshot in `qemu-img snapshot -l`.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { NO_QEMU, qdedup, qemuCheck, run, tempDir } from '../helpers.ts';

const CLUSTER_SIZES = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152];

test('create: every cluster size and compat level passes qemu-img check and info', { skip: NO_QEMU }, () => {
  const dir = tempDir();
  let n = 0;
  for (const clusterSize of CLUSTER_SIZES) {
    for (const compat of ['0.10', '1.1']) {
      // Sizes that give multi-cluster L1 tables at small clusters, and an odd size rounded up to 512.
      const size = clusterSize <= 1024 ? 64 * 1024 * 1024 + 1000 : 3 * 1024 * 1024 * 1024;
      const file = join(dir, `c${n++}.qcow2`);
      const r = qdedup(['create', '-q', '-o', `cluster_size=${clusterSize},compat=${compat},dedup=off`, file, String(size)]);
      assert.equal(r.status, 0, r.stderr);
      const check = qemuCheck(file);
      assert.equal(check.status, 0, `${file} (${clusterSize}, ${compat}): ${check.stderr}`);
      const info = JSON.parse(run('qemu-img', ['info', '-f', 'qcow2', '--output=json', file]).stdout);
      assert.equal(info['virtual-size'], Math.ceil(size / 512) * 512);
      assert.equal(info['cluster-size'], clusterSize);
      assert.equal(info['format-specific'].data.compat, compat);
      assert.equal(info['format-specific'].data['refcount-bits'], 16);
      // and our own info says the same
      const ours = JSON.parse(qdedup(['info', '--output', 'json', file]).stdout);
      assert.equal(ours['virtual-size'], info['virtual-size']);
      assert.equal(ours['cluster-size'], info['cluster-size']);
      assert.deepEqual(ours['format-specific'].data.compat, compat);
    }
  }
});

test('create: every refcount width at v3 passes qemu-img check', { skip: NO_QEMU }, () => {
  const dir = tempDir();
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    for (const clusterSize of [512, 65536]) {
      const file = join(dir, `r${bits}-${clusterSize}.qcow2`);
      const r = qdedup(['create', '-q', '-o', `refcount_bits=${bits},cluster_size=${clusterSize},dedup=off`, file, '256M']);
      assert.equal(r.status, 0, r.stderr);
      const check = qemuCheck(file);
      assert.equal(check.status, 0, `${bits} bits, ${clusterSize}: ${check.stderr}`);
      const info = JSON.parse(run('qemu-img', ['info', '-f', 'qcow2', '--output=json', file]).stdout);
      assert.equal(info['format-specific'].data['refcount-bits'], bits);
    }
  }
});

test('create: lazy_refcounts, size 0 and a backing file are read back by qemu-img', { skip: NO_QEMU }, () => {
  const dir = tempDir();
  const lazy = join(dir, 'lazy.qcow2');
  assert.equal(qdedup(['create', '-q', '-o', 'lazy_refcounts=on,dedup=off', lazy, '1G']).status, 0);
  assert.equal(JSON.parse(run('qemu-img', ['info', '-f', 'qcow2', '--output=json', lazy]).stdout)['format-specific'].data['lazy-refcounts'], true);
  assert.equal(qemuCheck(lazy).status, 0);

  const empty = join(dir, 'empty.qcow2');
  assert.equal(qdedup(['create', '-q', '-o', 'dedup=off', empty, '0']).status, 0);
  assert.equal(qemuCheck(empty).status, 0);
  assert.equal(JSON.parse(run('qemu-img', ['info', '-f', 'qcow2', '--output=json', empty]).stdout)['virtual-size'], 0);

  const base = join(dir, 'base.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '8M']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', base]);
  const overlay = join(dir, 'overlay.qcow2');
  const r = qdedup(['create', '-q', '-o', 'dedup=off', '-b', 'base.qcow2', '-F', 'qcow2', overlay]);
  assert.equal(r.status, 0, r.stderr);
  const info = JSON.parse(run('qemu-img', ['info', '-f', 'qcow2', '--output=json', overlay]).stdout);
  assert.equal(info['backing-filename'], 'base.qcow2');
  assert.equal(info['backing-filename-format'], 'qcow2');
  assert.equal(info['virtual-size'], 8 * 1024 * 1024);
  assert.equal(run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x5a 0 1M', overlay]).status, 0);
  assert.equal(qemuCheck(overlay).status, 0);
});

test('create: dedup images (the default) for every cluster size and hash pass qemu-img check with no error and no leak', { skip: NO_QEMU }, () => {
  const dir = tempDir();
  let n = 0;
  for (const clusterSize of [512, 4096, 65536, 2097152]) {
    for (const hash of ['sha256', 'sha3-256', 'blake3']) {
      const file = join(dir, `d${n++}.qcow2`);
      const r = qdedup(['create', '-o', `cluster_size=${clusterSize},dedup=${hash}`, file, '256M']);
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stdout, new RegExp(`dedup=${hash} dedup_verify=off`));
      const check = qemuCheck(file);
      assert.equal(check.status, 0, `${file}: ${JSON.stringify(check.json)} ${check.stderr}`);
      assert.equal(check.json?.corruptions ?? 0, 0);
      assert.equal(check.json?.leaks ?? 0, 0);
      assert.match(run('qemu-img', ['check', '-f', 'qcow2', file]).stdout, /^No errors were found on the image\.$/m);
      const snapshots = run('qemu-img', ['snapshot', '-l', file]);
      assert.match(snapshots.stdout, /qdedup-dedup-holder/);
      const info = JSON.parse(run('qemu-img', ['info', '-f', 'qcow2', '--output=json', file]).stdout);
      assert.equal(info['cluster-size'], clusterSize);
      assert.equal(info['format-specific'].data.compat, '1.1');
    }
  }
  // The default: sha256 with 4 KiB clusters; v2 or 1-bit refcounts turn the default off.
  const plainDefault = join(dir, 'default.qcow2');
  assert.match(qdedup(['create', plainDefault, '1G']).stdout, /cluster_size=4096 .* dedup=sha256 dedup_verify=off/);
  assert.match(qdedup(['create', '-o', 'compat=0.10', join(dir, 'v2.qcow2'), '1G']).stdout, /cluster_size=65536 .* dedup=off/);
  assert.match(qdedup(['create', '-o', 'refcount_bits=2', join(dir, 'r2.qcow2'), '1G']).stdout, /dedup=off/);
  assert.match(qdedup(['create', '-o', 'compat=0.10,dedup=sha256', join(dir, 'bad.qcow2'), '1G']).stderr, /dedup needs compatibility level 1.1/);
  assert.match(qdedup(['create', '-o', 'dedup=skein', join(dir, 'skein.qcow2'), '1G']).stderr, /skein/);
  assert.match(qdedup(['create', '-o', 'dedup=off,dedup_verify=on', join(dir, 'x.qcow2'), '1G']).stderr, /'dedup_verify' needs dedup on/);
});
