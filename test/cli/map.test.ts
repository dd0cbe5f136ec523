// `qdedup map` against `qemu-img map` on the same images: the JSON ranges
// and keys equal qemu-img's once qdedup's own keys are taken off, the human table equals
// qemu-img's once the "Shared by" column is taken out; then the share counts and --shares
// lists on dedup images with known duplicates, with and without an internal snapshot.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { BIN, NO_QEMU, qdedup, run, tempDir } from '../helpers.ts';

const dir = tempDir('qdedup-map-');
let serial = 0;

function ok(r: { status: number; stderr: string }, what: string): void {
  assert.equal(r.status, 0, `${what}: ${r.stderr}`);
}

/** A qcow2 made by qemu-img create, then the qemu-io commands. */
function qemuImage(size: string, opts: string[], commands: string[]): string {
  const file = join(dir, `q-${++serial}.qcow2`);
  ok(run('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, file, size]), 'qemu-img create');
  if (commands.length) ok(run('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), file]), 'qemu-io');
  return file;
}

type Entry = Record<string, unknown>;
const OURS = ['shared-by', 'shared-with'];

function oursJson(file: string, ...opts: string[]): Entry[] {
  const r = qdedup(['map', '--output', 'json', ...opts, file]);
  ok(r, `qdedup map ${opts.join(' ')}`);
  return JSON.parse(r.stdout) as Entry[];
}

function withoutOurKeys(entries: Entry[]): Entry[] {
  return entries.map((e) => Object.fromEntries(Object.entries(e).filter(([k]) => !OURS.includes(k))));
}

/** qdedup's JSON equals qemu-img's, key order included, apart from qdedup's keys. */
function assertSameJson(file: string, ...opts: string[]): Entry[] {
  const ours = oursJson(file, ...opts);
  const theirs = run('qemu-img', ['map', '-f', 'qcow2', '--output=json', ...opts, file]);
  ok(theirs, 'qemu-img map');
  assert.deepEqual(withoutOurKeys(ours), JSON.parse(theirs.stdout));
  assert.deepEqual(
    withoutOurKeys(ours).map((e) => Object.keys(e)),
    (JSON.parse(theirs.stdout) as Entry[]).map((e) => Object.keys(e)),
  );
  return ours;
}

/** qdedup's human table with the "Shared by" column (the 4th, 16 wide) taken out. */
function withoutSharedColumn(text: string): string {
  return text
    .split('\n')
    .map((l) => (l === '' ? l : l.slice(0, 48) + l.slice(64)))
    .join('\n');
}

describe('qdedup map agrees with qemu-img map', { skip: NO_QEMU }, () => {
  it('data, zero, discarded, compressed and unallocated clusters (64 KiB clusters)', () => {
    const file = qemuImage(
      '8M',
      [],
      [
        'write -P 1 0 192k',
        'write -P 2 256k 64k',
        'write -z 512k 128k',
        'write -P 3 1M 64k',
        'discard 1M 64k',
        'write -c -P 4 2M 64k',
        'write -c -P 5 2112k 64k',
        'write -P 6 7M 1M',
      ],
    );
    assertSameJson(file);
    // a range, starting and ending inside clusters
    assertSameJson(file, '--start-offset', '70k', '--max-length', '2100k');
    // compressed clusters cannot be shown in the human table: both stop there with exit 1
    const ours = qdedup(['map', file]);
    const theirs = run('qemu-img', ['map', '-f', 'qcow2', file]);
    assert.equal(ours.status, 1);
    assert.equal(theirs.status, 1);
    assert.equal(withoutSharedColumn(ours.stdout), theirs.stdout);
    assert.equal(ours.stderr, 'qdedup: File contains external, encrypted or compressed clusters.\n');
  });

  it('human table, v2 image and 512-byte clusters', () => {
    for (const opts of [
      ['-o', 'compat=0.10'],
      ['-o', 'cluster_size=512'],
      ['-o', 'cluster_size=2M'],
    ]) {
      const file = qemuImage('16M', opts, ['write -P 1 0 4M', 'write -P 2 5M 1M', 'write -P 3 4M 512k', 'write -P 1 12M 2M']);
      assertSameJson(file);
      const ours = qdedup(['map', file]);
      ok(ours, 'qdedup map');
      assert.equal(withoutSharedColumn(ours.stdout), run('qemu-img', ['map', '-f', 'qcow2', file]).stdout);
    }
  });

  it('backing chains: depth, present, an overlay larger than its backing file, other cluster sizes', () => {
    const base = qemuImage('4M', [], ['write -P 1 0 128k', 'write -P 2 1M 64k', 'write -z 2M 64k', 'write -c -P 3 3M 64k']);
    const mid = qemuImage('6M', ['-b', base, '-F', 'qcow2', '-o', 'cluster_size=4k'], ['write -P 4 64k 64k', 'write -z 1M 4k', 'write -P 5 5M 8k']);
    const top = qemuImage('8M', ['-b', mid, '-F', 'qcow2', '-o', 'cluster_size=16k'], ['write -P 6 16k 16k', 'write -P 7 7M 32k']);
    const entries = assertSameJson(top);
    assert.ok(entries.some((e) => e.depth === 2) && entries.some((e) => e.depth === 1) && entries.some((e) => e.present === false));
    assertSameJson(mid, '--start-offset', '1000k', '--max-length', '3M');
    // human table, relative backing names as qemu-img shows them
    const rel = qemuImage('4M', ['-b', base.split('/').pop()!, '-F', 'qcow2'], ['write -P 8 1M 64k']);
    for (const name of [rel, rel.split('/').pop()!]) {
      const inDir = (cmd: string, args: string[]) => spawnSync(cmd, args, { cwd: dir, encoding: 'utf8', env: { ...process.env, NO_COLOR: '1' } }).stdout;
      const theirs = inDir('qemu-img', ['map', '-f', 'qcow2', name]);
      assert.match(theirs, /base|q-/);
      assert.equal(withoutSharedColumn(inDir(process.execPath, [BIN, 'map', name])), theirs);
    }
  });

  it('host-file holes: partly written clusters (QEMU deems the image preallocated) and a raw backing file', () => {
    // qemu-io writes 4 KiB of a new 64 KiB cluster at the end of the file: the file ends
    // there, and on this machine's ext4 QEMU then deems the image preallocated and reports
    // the rest of the cluster as zero:true,data:true (whether it does depends on st_blocks)
    const base = qemuImage('4M', [], ['write -P 1 0 128k', 'write -P 2 1M 64k', 'write -c -P 3 2M 64k']);
    const partial = qemuImage('6M', ['-b', base, '-F', 'qcow2'], ['write -P 4 64k 64k', 'write -z 1M 64k', 'write -P 5 5M 4k', 'write -c -P 6 3M 64k']);
    assertSameJson(partial);
    assertSameJson(qemuImage('4M', [], ['write -P 1 0 4k', 'write -P 2 1M 4k', 'write -P 3 2M 64k', 'write -P 4 3M 512']));
    const raw = join(dir, `raw-${++serial}.img`);
    const bytes = Buffer.alloc(4 * 1024 * 1024);
    bytes.fill(7, 192 * 1024, 320 * 1024);
    bytes.fill(8, 4000 * 1024, 4004 * 1024);
    // written sparse: only the non-zero parts
    const fd = openSync(raw, 'w');
    ftruncateSync(fd, bytes.length);
    writeSync(fd, bytes, 192 * 1024, 128 * 1024, 192 * 1024);
    writeSync(fd, bytes, 4000 * 1024, 4 * 1024, 4000 * 1024);
    closeSync(fd);
    const top = qemuImage('6M', ['-b', raw, '-F', 'raw'], ['write -P 1 192k 64k', 'write -P 2 1M 4k']);
    const mapped = assertSameJson(top);
    assert.ok(
      mapped.some((e) => e.depth === 1 && e.zero && e.present),
      'a hole of the raw file',
    );
    const ours = qdedup(['map', top]);
    ok(ours, 'qdedup map');
    assert.equal(withoutSharedColumn(ours.stdout), run('qemu-img', ['map', '-f', 'qcow2', top]).stdout);
  });

  it('an image qdedup wrote (dedup on): the same offset for every copy', () => {
    const file = join(dir, `d-${++serial}.qcow2`);
    ok(qdedup(['create', '-q', file, '4M']), 'create');
    ok(qdedup(['write', '-q', '-P', '0xab', file, '0', '64k']), 'write');
    ok(qdedup(['write', '-q', '-P', '0xab', file, '1M', '64k']), 'write');
    ok(qdedup(['write', '-q', '-z', file, '2M', '64k']), 'write -z');
    const entries = assertSameJson(file);
    const offsets = new Set(entries.filter((e) => e.data).map((e) => e.offset));
    assert.equal(offsets.size, 1, 'one host cluster for 32 guest clusters');
  });
});

describe('qdedup map: sharing', () => {
  /** A dedup image (4 KiB clusters) with known duplicates: A at 0 and 8k and 1M, B at 4k, C…C (unique) at 64k. */
  function dedupImage(): string {
    const file = join(dir, `s-${++serial}.qcow2`);
    ok(qdedup(['create', '-q', file, '2M']), 'create');
    for (const [pattern, offset] of [
      ['0xa', '0'],
      ['0xb', '4k'],
      ['0xa', '8k'],
      ['0xa', '1M'],
    ])
      ok(qdedup(['write', '-q', '-P', pattern, file, offset, '4k']), 'write');
    const c = Buffer.alloc(16 * 1024);
    for (let i = 0; i < c.length; i++) c[i] = (i * 7 + (i >> 12)) & 0xff;
    ok(qdedup(['write', '-q', '-i', '-', file, '64k'], c), 'write -i');
    return file;
  }

  it('shared-by counts the other guest clusters on each range (the holder snapshot not counted)', () => {
    const file = dedupImage();
    // A and B went to neighbouring host clusters: one range of 8 KiB whose A is used twice more
    const data = oursJson(file)
      .filter((e) => e.data)
      .map((e) => [e.start, e.length, e['shared-by']]);
    assert.deepEqual(data, [
      [0, 8192, 2],
      [8192, 4096, 2],
      [65536, 16384, 0],
      [1048576, 4096, 2],
    ]);
    // zero and unallocated ranges carry no count
    for (const e of oursJson(file)) if (!e.data) assert.equal(e['shared-by'], undefined);
    const human = qdedup(['map', file]);
    ok(human, 'map');
    assert.match(human.stdout, /^Offset {10}Length {10}Mapped to {7}Shared by {7}File\n0 {15}0x2000 {10}0x[0-9a-f]+ +2 {15}/);
  });

  it('--shares lists the other guest ranges that use the same host clusters', () => {
    const file = dedupImage();
    const [first] = oursJson(file, '--shares', '0');
    assert.deepEqual(first['shared-with'], [
      { start: 8192, length: 4096, offset: first.offset },
      { start: 1048576, length: 4096, offset: first.offset },
    ]);
    // a range of several clusters: each of its entries lists the others, itself excluded
    const entries = oursJson(file, '--shares', '0,12k');
    assert.deepEqual(
      entries.map((e) => [e.start, (e['shared-with'] as Entry[]).map((s) => s.start)]),
      [
        [0, [8192, 1048576]],
        [8192, [0, 1048576]],
      ],
    );
    const human = qdedup(['map', '--shares', '8k', file]);
    ok(human, 'map --shares');
    assert.match(human.stdout, /\n {4}shared with 0 \(4096 bytes at 0x[0-9a-f]+\)\n {4}shared with 0x100000 \(4096 bytes at 0x[0-9a-f]+\)\n$/);
    // bad values
    for (const bad of ['x', '0,1,2', ',4k']) {
      const r = qdedup(['map', '--shares', bad, file]);
      assert.equal(r.status, 1, bad);
      assert.match(r.stderr, /^qdedup: /);
    }
    assert.equal(qdedup(['map', '--shares', '3M', file]).status, 1, 'past the end');
  });

  it('an internal snapshot shares every cluster: counted and listed with its name', { skip: NO_QEMU }, () => {
    const file = dedupImage();
    ok(run('qemu-img', ['snapshot', '-c', 'before', file]), 'qemu-img snapshot -c');
    const by = new Map(
      oursJson(file)
        .filter((e) => e.data)
        .map((e) => [e.start, e['shared-by']]),
    );
    assert.equal(by.get(0), 6); // A: 2 other copies in the disk, 3 in the snapshot; B: its copy in the snapshot
    assert.equal(by.get(8192), 5);
    const [b] = oursJson(file, '--shares', '4k');
    assert.deepEqual(b['shared-with'], [{ start: 4096, length: 4096, offset: b.offset, snapshot: 'before' }]);
  });

  it('takes the locks qemu-img map takes: refused while qemu-io writes, allowed with -U', { skip: NO_QEMU }, async () => {
    const file = dedupImage();
    const { spawn } = await import('node:child_process');
    const writer = spawn('qemu-io', ['-f', 'qcow2', file], { stdio: ['pipe', 'pipe', 'ignore'] });
    try {
      // qemu-io prints its prompt once the image is open (and locked)
      await new Promise<void>((resolve) => writer.stdout.once('data', () => resolve()));
      const r = qdedup(['map', file]);
      assert.equal(r.status, 1);
      assert.match(r.stderr, /lock/);
      ok(qdedup(['map', '-U', file]), 'map -U');
    } finally {
      writer.stdin.end('quit\n');
      await new Promise((resolve) => writer.on('close', resolve));
    }
  });
});
