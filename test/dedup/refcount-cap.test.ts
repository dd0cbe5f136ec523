// The refcount cap inside one write: a cluster at the cap (half the refcount
// width's maximum, the holder's reference included) is never linked again, even by copies of
// the same batch; the next copy gets a cluster of its own and becomes the indexed one. A write
// never fails because its data repeats. Real CLI runs at 4, 8 and 16 bits (the cap is reached:
// 7, 127, 32767); at 32 and 64 bits the same write path runs in process with the cap lowered
// (the width's own cap, 2^31 - 1 and 2^52, is out of a test's reach). Every image: qemu-img
// check clean, qemu-img snapshot -c works, and qemu-img compare against a raw shadow.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { storedRefcounts } from '../../src/dedup/clusters.ts';
import { guestUsage } from '../../src/dedup/stats.ts';
import { NO_QEMU, qemuCheck, qemuCompareRaw, run } from '../helpers.ts';
import { qdedupOk, workFolder } from './cli-lib.ts';
import { openForWrite, dedupOf } from '../../src/dedup/open.ts';

function stats(img: string): Record<string, any> {
  return JSON.parse(qdedupOk(['dedup-stats', '--output', 'json', img]).stdout);
}

/** The largest refcount of a cluster the guest uses, and how many clusters it uses. */
async function maxDataRefcount(img: string): Promise<{ max: number; clusters: number }> {
  const image = await Image.open(img);
  try {
    const usage = await guestUsage(image);
    const refcounts = await storedRefcounts(image);
    let max = 0;
    for (const c of usage.dataClusters) max = Math.max(max, await refcounts.get(c));
    return { max, clusters: usage.dataClusters.size };
  } finally {
    await image.close();
  }
}

/** The image is sound for qemu-img, takes a snapshot, and reads back as `shadow`. */
function assertQemuHappy(img: string, shadow: Buffer, dir: string): void {
  const check = qemuCheck(img);
  assert.equal(check.status, 0, `qemu-img check: ${JSON.stringify(check.json)} ${check.stderr}`);
  const raw = join(dir, 'shadow.raw');
  writeFileSync(raw, shadow);
  assert.ok(qemuCompareRaw(img, raw), 'qemu-img compare against the raw shadow');
  const snap = run('qemu-img', ['snapshot', '-c', 'after-cap', img]);
  assert.equal(snap.status, 0, `qemu-img snapshot -c: ${snap.stderr}`);
  assert.equal(qemuCheck(img).status, 0, 'qemu-img check after the snapshot');
}

for (const { bits, cap, clusterSize } of [
  { bits: 4, cap: 7, clusterSize: 4096 },
  { bits: 8, cap: 127, clusterSize: 4096 },
  { bits: 16, cap: 32767, clusterSize: 512 },
]) {
  test(`refcount_bits=${bits}: equal clusters in one write stop at the cap (${cap}) and start new copies`, { skip: NO_QEMU }, async () => {
    const w = workFolder(`qdedup-cap-${bits}-`);
    const img = w.create('64M', `refcount_bits=${bits},cluster_size=${clusterSize}`);
    // Enough equal clusters for three copies: each copy takes cap - 1 guest references.
    const n = 2 * (cap - 1) + 3;
    const bytes = n * clusterSize;
    qdedupOk(['write', '-q', '-P', '0x3c', img, '0', String(bytes)]);
    const shadow = Buffer.alloc(64 << 20);
    shadow.fill(0x3c, 0, bytes);
    const used = await maxDataRefcount(img);
    assert.equal(used.max, cap, 'the first copies end exactly at the cap');
    assert.equal(used.clusters, 3, 'three copies');
    let s = stats(img);
    assert.equal(s.trusted, true);
    assert.equal(s['index-entries'], 1, 'one entry: the newest copy replaced the capped ones');

    // A later write of the same data links to the newest copy until it, too, is capped.
    const more = cap + 1;
    const at = 32 << 20;
    qdedupOk(['write', '-q', '-P', '0x3c', img, String(at), String(more * clusterSize)]);
    shadow.fill(0x3c, at, at + more * clusterSize);
    const after = await maxDataRefcount(img);
    assert.equal(after.max, cap);
    assert.equal(after.clusters, Math.ceil((n + more) / (cap - 1)), 'copies are filled up to the cap, in order');
    s = stats(img);
    assert.equal(s['guest-clusters'], n + more);
    assertQemuHappy(img, shadow, w.dir);
  });
}

test("refcount_bits=4: the issue's cases (15 and 8 equal clusters in one write) succeed under the cap", { skip: NO_QEMU }, async () => {
  const w = workFolder('qdedup-cap-issue-');
  for (const clusters of [15, 8]) {
    const img = w.create('64M', 'refcount_bits=4');
    qdedupOk(['write', '-q', '-P', '0x3c', img, '0', `${clusters * 4}k`]);
    const used = await maxDataRefcount(img);
    assert.ok(used.max <= 7, `refcount ${used.max} over the cap of 7`);
    const shadow = Buffer.alloc(64 << 20);
    shadow.fill(0x3c, 0, clusters * 4096);
    const read = run('qemu-io', ['-c', `read -P 0x3c 0 ${clusters * 4}k`, img]);
    assert.equal(read.status, 0);
    assert.doesNotMatch(read.stdout, /Pattern verification failed/);
    assertQemuHappy(img, shadow, w.dir);
  }
});

// At 32 and 64 bits the cap (2^31 - 1, 2^52) cannot be reached by a test; the write path
// takes the same decisions with the cap lowered in process.
for (const bits of [32, 64]) {
  test(`refcount_bits=${bits}: the same decisions with the cap lowered to 7`, { skip: NO_QEMU }, async () => {
    const w = workFolder(`qdedup-cap-${bits}-`);
    const img = w.create('16M', `refcount_bits=${bits}`);
    const image = await openForWrite(img);
    assert.equal(dedupOf(image)!.cap, Math.floor(image.refcountState!.max / 2), "half the width's maximum");
    dedupOf(image)!.cap = 7;
    const data = Buffer.alloc(40 * 4096, 0x5a);
    await image.write(0, data); // one batch
    await image.write(4 << 20, data.subarray(0, 8 * 4096)); // hits, then a new copy
    await image.close();
    const used = await maxDataRefcount(img);
    assert.equal(used.max, 7);
    assert.equal(used.clusters, Math.ceil(48 / 6));
    const shadow = Buffer.alloc(16 << 20);
    shadow.fill(0x5a, 0, 40 * 4096);
    shadow.fill(0x5a, 4 << 20, (4 << 20) + 8 * 4096);
    assertQemuHappy(img, shadow, w.dir);
  });
}
