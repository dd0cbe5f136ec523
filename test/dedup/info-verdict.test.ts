// `info`'s trusted verdict is the one the next write reaches: for every way
// an index stops being trusted — the dedup dirty flag (a crash), the QCOW2 dirty bit (lazy
// refcounts not written back: the write's open rebuilds the refcounts, which drops the index;
// info used to say `trusted: true` there), autoclear bit 60 cleared by another writer — info
// says untrusted with a reason, and the next write prints that same reason as it starts a
// fresh index; on a clean image info says trusted and the write prints nothing.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { NO_QEMU, qdedup, run } from '../helpers.ts';
import { dedupExtensionPayload, qdedupOk, workFolder } from './cli-lib.ts';

const { create } = workFolder('qdedup-info-verdict-');

function infoDedup(img: string): { trusted: boolean; reason?: string } {
  return JSON.parse(qdedupOk(['info', '--output', 'json', img]).stdout)['format-specific'].data.dedup;
}

/** Asserts info's verdict, then that the next write reaches the same one. */
function assertSameVerdict(img: string, label: string): void {
  const info = infoDedup(img);
  const w = qdedup(['write', '-P', '0x44', img, '2M', '64k']);
  assert.equal(w.status, 0, `${label}: ${w.stderr}`);
  if (info.trusted) {
    assert.equal(w.stderr, '', `${label}: info says trusted, and the write keeps the index`);
  } else {
    assert.ok(info.reason, label);
    assert.ok(
      w.stderr.includes(`dedup index not trusted: ${info.reason}; starting a fresh index`),
      `${label}: info said "${info.reason}", the write said: ${w.stderr}`,
    );
  }
  assert.equal(infoDedup(img).trusted, true, `${label}: trusted after the write`);
}

function prepared(lazy = false): string {
  const img = create('16M', lazy ? 'lazy_refcounts=on' : undefined);
  qdedupOk(['write', '-q', '-P', '0x11', img, '0', '256k']);
  return img;
}

test('info says what the next write will do: clean, dedup dirty flag, QCOW2 dirty bit, bit 60 clear', () => {
  assertSameVerdict(prepared(), 'clean');

  const dirty = prepared();
  const b = readFileSync(dirty);
  b[dedupExtensionPayload(b) + 2] |= 1; // dedup dirty flag: a crash
  writeFileSync(dirty, b);
  assert.equal(infoDedup(dirty).trusted, false);
  assert.match(infoDedup(dirty).reason!, /dedup dirty flag set/);
  assertSameVerdict(dirty, 'dedup dirty flag');

  const qcowDirty = prepared(true);
  const q = readFileSync(qcowDirty);
  q.writeBigUInt64BE(q.readBigUInt64BE(72) | 1n, 72); // incompatible bit 0: refcounts not written back
  writeFileSync(qcowDirty, q);
  assert.equal(infoDedup(qcowDirty).trusted, false, "the write's open rebuilds the refcounts and drops the index");
  assert.match(infoDedup(qcowDirty).reason!, /QCOW2 dirty bit/);
  assertSameVerdict(qcowDirty, 'QCOW2 dirty bit');

  if (!NO_QEMU) {
    const foreign = prepared();
    assert.equal(run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 4M 4k', foreign]).status, 0);
    assert.match(infoDedup(foreign).reason!, /autoclear bit 60 is clear/);
    assertSameVerdict(foreign, 'bit 60 clear');
  }
});
