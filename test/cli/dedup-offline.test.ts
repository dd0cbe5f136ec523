// `qdedup dedup` (offline deduplication in place) through the real bin/qdedup, qemu-img as the
// oracle: an image qemu-img made (dedup off) is deduplicated — guest data identical (`qemu-img
// compare`), `qemu-img check` clean, the file's disk usage down by the duplicates; a dedup
// image whose index QEMU dropped gets it back; an image qemu-img compressed stays compressed,
// and -c compresses a plain one; v2, corrupt and busy images are refused with one line and
// exit 1, unchanged.

import { describe, it, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NO_QEMU, qdedup, qemuCheck, run, tempDir } from '../helpers.ts';

const CS = 4096;
const dir = tempDir('qdedup-offline-');

function compareRaw(raw: string, img: string): void {
  const r = run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, img]);
  assert.equal(r.status, 0, `qemu-img compare: ${r.stdout}${r.stderr}`);
}

const du = (path: string) => statSync(path).blocks * 512;

describe('qdedup dedup', { skip: NO_QEMU }, () => {
  const raw = join(dir, 'disk.raw');
  before(() => {
    // 8 MiB: 1 MiB of unique data, then 256 KiB blocks repeated, a zero-filled MiB, unique tail.
    const a = randomBytes(256 * 1024);
    const b = randomBytes(256 * 1024);
    const parts = [randomBytes(1024 * 1024)];
    for (let i = 0; i < 10; i++) parts.push(i % 3 ? a : b);
    parts.push(Buffer.alloc(1024 * 1024), randomBytes(8 * 1024 * 1024 - 1024 * 1024 - 10 * 256 * 1024 - 1024 * 1024));
    writeFileSync(raw, Buffer.concat(parts));
  });

  it('an image qemu-img made: deduplicated in place, identical, clean, smaller on disk', () => {
    const img = join(dir, 'qemu.qcow2');
    assert.equal(run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, img]).status, 0);
    // The zero MiB written as data, as a guest's zeros are (convert made it a hole).
    const zeroAt = 1024 * 1024 + 10 * 256 * 1024;
    assert.equal(run('qemu-io', ['-f', 'qcow2', '-c', `write -q -P 0 ${zeroAt} 1M`, img]).status, 0);
    const before = du(img);
    const r = qdedup(['dedup', '--output', 'json', img]);
    assert.equal(r.status, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.equal(out['dedup-enabled'], true);
    assert.equal(out.clusters, 2048);
    assert.equal(out['zero-clusters'], 256);
    assert.equal(out.stored, 256 + 64 * 2 + 896, 'the unique MiB, a, b and the 3.5 MiB tail: each stored once');
    assert.equal(out.linked, 2048 - 256 - out.stored);
    compareRaw(raw, img);
    assert.equal(qemuCheck(img).status, 0);
    const after = du(img);
    const saved = (8 * 64 + 256) * CS; // eight repeats of a or b, and the zero MiB
    // Less the dedup store's own clusters (journals, incarnations, holder tables): well under 512 KiB here.
    assert.ok(before - after >= saved - 512 * 1024, `du ${before} → ${after}: expected about ${saved} less`);
    assert.equal(out['bytes-before'], before);
    assert.equal(out['bytes-after'], after);
    const stats = JSON.parse(qdedup(['dedup-stats', '--output', 'json', img]).stdout);
    assert.equal(stats.trusted, true);
    assert.equal(stats['data-clusters'], out.stored);
    // A second pass changes nothing the guest sees and stores nothing new.
    const again = JSON.parse(qdedup(['dedup', '--output', 'json', img]).stdout);
    assert.equal(again.stored, 0);
    assert.equal(again['dedup-enabled'], false);
    compareRaw(raw, img);
  });

  it('a dedup image whose index QEMU dropped gets a full index again', () => {
    const img = join(dir, 'dropped.qcow2');
    assert.equal(qdedup(['create', '-q', img, '8M']).status, 0);
    assert.equal(qdedup(['write', '-q', '-i', raw, img, '0']).status, 0);
    // QEMU opens it for writing: autoclear bit 60 is cleared, the index is no longer trusted.
    assert.equal(run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 4k', img]).status, 0);
    const shadow = readFileSync(raw);
    shadow.fill(0x11, 0, 4096);
    const want = join(dir, 'dropped.raw');
    writeFileSync(want, shadow);
    const r = qdedup(['dedup', '--output', 'json', img]);
    assert.equal(r.status, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.equal(out['dedup-enabled'], false);
    assert.match(out['index-notice'], /dropped|not trusted|cleared/);
    compareRaw(want, img);
    assert.equal(qemuCheck(img).status, 0);
    const stats = JSON.parse(qdedup(['dedup-stats', '--output', 'json', img]).stdout);
    assert.equal(stats.trusted, true);
    assert.equal(stats['index-entries'], stats['data-clusters'], 'every stored cluster indexed again');
  });

  it('compressed: an image qemu-img compressed stays compressed; -c compresses a plain one', () => {
    // Compressible clusters: text-like lines, a tenth of the 4 KiB blocks repeating earlier ones.
    const blocks: Buffer[] = [];
    for (let i = 0; i < 2048; i++) blocks.push(i % 10 === 9 ? blocks[i - 7] : Buffer.from(`line ${i} of a compressible file; `.repeat(200).slice(0, CS)));
    const text = join(dir, 'text.raw');
    writeFileSync(text, Buffer.concat(blocks));
    const distinct = 2048 - 204;
    const compressedClusters = (img: string) => JSON.parse(qdedup(['dedup-stats', '--output', 'json', img]).stdout).compressed;

    const byQemu = join(dir, 'qemu-c.qcow2');
    assert.equal(run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', text, byQemu]).status, 0);
    const sizeBefore = statSync(byQemu).size;
    const r = qdedup(['dedup', '--output', 'json', byQemu]);
    assert.equal(r.status, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.equal(out.compressed, true, 'the image held compressed clusters: the pass compresses');
    assert.equal(out.stored, distinct);
    compareRaw(text, byQemu);
    assert.equal(qemuCheck(byQemu).status, 0);
    const c = compressedClusters(byQemu);
    assert.equal(c.clusters, 2048, 'every guest cluster names a compressed copy');
    assert.equal(c.copies, distinct);
    // Decompressed, the data alone would take 2048 × 4 KiB; kept compressed, the file stays near
    // qemu-img's (plus the dedup store's own clusters).
    assert.ok(statSync(byQemu).size < sizeBefore + 1024 * 1024, `${sizeBefore} → ${statSync(byQemu).size} bytes`);

    const plain = join(dir, 'plain-c.qcow2');
    assert.equal(run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', text, plain]).status, 0);
    const off = JSON.parse(qdedup(['dedup', '--output', 'json', plain]).stdout);
    assert.equal(off.compressed, false, 'no compressed cluster, no -c: written plain');
    const on = join(dir, 'plain-on.qcow2');
    assert.equal(run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', text, on]).status, 0);
    const withC = qdedup(['dedup', '-c', on]);
    assert.equal(withC.status, 0, withC.stderr);
    assert.match(withC.stdout, /stored as the indexed copy \(compressed\)/);
    compareRaw(text, on);
    assert.equal(qemuCheck(on).status, 0);
    assert.equal(compressedClusters(on).copies, distinct);
    assert.ok(du(on) < du(plain) / 4, `-c: ${du(on)} bytes on disk against ${du(plain)} without`);
  });

  it('refused: v2, corrupt, held by another process, bad options — one line, exit 1, unchanged', async () => {
    const v2 = join(dir, 'v2.qcow2');
    assert.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', v2, '1M']).status, 0);
    const cases: [string, string[], RegExp][] = [
      [v2, [], /needs a v3 image/],
      [v2, ['-o', 'cluster_size=4k'], /Invalid parameter 'cluster_size'/],
    ];
    const corrupt = join(dir, 'corrupt.qcow2');
    assert.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', corrupt, '1M']).status, 0);
    assert.equal(run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 64k', corrupt]).status, 0);
    const bytes = readFileSync(corrupt);
    // Zero the refcount of the first data cluster: referenced but counted free.
    const refTable = Number(bytes.readBigUInt64BE(48));
    const block = Number(bytes.readBigUInt64BE(refTable));
    const l1 = Number(bytes.readBigUInt64BE(40));
    const l2 = Number(bytes.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const data = Number(bytes.readBigUInt64BE(l2) & 0x00fffffffffffe00n);
    bytes.writeUInt16BE(0, block + (data / CS) * 2);
    writeFileSync(corrupt, bytes);
    cases.push([corrupt, [], /corruption.*repair it first/]);
    for (const [img, opts, pattern] of cases) {
      const before = readFileSync(img);
      const r = qdedup(['dedup', ...opts, img]);
      assert.equal(r.status, 1, `${img} ${opts.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, pattern);
      assert.doesNotMatch(r.stderr, /\n\s+at /);
      assert.ok(readFileSync(img).equals(before), `${img} unchanged`);
    }
    const held = join(dir, 'held.qcow2');
    assert.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', held, '1M']).status, 0);
    const io = spawn('qemu-io', ['-f', 'qcow2', held], { stdio: ['pipe', 'pipe', 'pipe'] });
    try {
      await new Promise((resolve) => setTimeout(resolve, 500));
      const before = readFileSync(held);
      const r = qdedup(['dedup', held]);
      assert.equal(r.status, 1);
      assert.match(r.stderr, /Failed to get (shared )?"(write|consistent read)" lock/);
      assert.ok(readFileSync(held).equals(before));
    } finally {
      io.stdin.end('quit\n');
      await new Promise((resolve) => io.on('close', resolve));
    }
  });
});
