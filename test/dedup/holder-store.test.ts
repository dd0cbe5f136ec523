// The holder snapshot holds the dedup store's own clusters: `qemu-img check`
// of an image qdedup wrote says "No errors were found", an index entry naming a store cluster
// (held too, but with refcount 1) is never linked whatever its bytes, and a holder whose L1 no
// longer covers the file grows: the larger L1 goes to new clusters and the snapshot table entry
// is switched to it at the commit, and data past the first coverage is indexed and linked.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { HOLDER_NAME } from '../../src/dedup/holder.ts';
import { NO_QEMU, qdedup, qemuCheck, qemuCompareRaw, run } from '../helpers.ts';
import { qdedupOk, workFolder } from './cli-lib.ts';
import { openForWrite, dedupOf } from '../../src/dedup/open.ts';

function assertQemuClean(img: string): void {
  if (NO_QEMU) return;
  const c = qemuCheck(img);
  assert.equal(c.status, 0, `qemu-img check: ${JSON.stringify(c.json)} ${c.stderr}`);
  assert.match(run('qemu-img', ['check', '-f', 'qcow2', img]).stdout, /^No errors were found on the image\.$/m);
}

test('an index entry naming a journal cluster (held, refcount 1) is never linked, even with equal bytes', async () => {
  const w = workFolder('qdedup-holder-store-');
  const img = w.create('16M');
  qdedupOk(['write', '-q', '-P', '0x21', img, '0', '64k']); // a journal block on disk
  let image = await openForWrite(img);
  const d = dedupOf(image)!;
  const journal = d.store.areas()[0].offset; // the current journal's first cluster
  const cluster = journal / image.clusterSize;
  assert.equal(await d.holder.isHeld(cluster), true, 'the store cluster is held');
  assert.equal(await image.refcountState!.get(cluster), 1, 'by the holder alone');
  const bytes = await image.file.read(journal, image.clusterSize);
  const hash = d.hasher.hash(bytes);
  // A crafted entry: the journal cluster's own hash, pointing at it (as a hostile or stale index could).
  const inserting = d.store.insert(hash, journal, 8 << 20, (n) => image.refcountState!.allocate(n));
  if (inserting) await inserting;
  const hitsBefore = d.counters.hits;
  await image.write(4 << 20, bytes); // the journal cluster's bytes as guest data
  assert.equal(d.counters.hits, hitsBefore, 'not linked');
  await image.close();

  image = await Image.open(img);
  const mapped = await image.read(4 << 20, bytes.length);
  assert.ok(mapped.equals(bytes), 'the guest data is its own copy');
  await image.close();
  assertQemuClean(img);
});

test('the holder grows past its first coverage: snapshot entry switched, data past it indexed, qemu-img check clean', { skip: NO_QEMU }, async () => {
  const w = workFolder('qdedup-holder-grow-');
  // 512-byte clusters: one holder L1 cluster covers 2 MiB of file, so the first L1 (the file
  // plus a 64 MiB margin) is outgrown by a 96 MiB import.
  const img = w.create('256M', 'cluster_size=512');
  const first = await snapshotL1(img);
  const data = randomBytes(96 << 20);
  const input = join(w.dir, 'input.raw');
  writeFileSync(input, data);
  qdedupOk(['write', '-q', '-i', input, img, '0']);
  const grown = await snapshotL1(img);
  assert.ok(grown.l1Size > first.l1Size, `holder L1 ${first.l1Size} → ${grown.l1Size} entries`);
  assert.notEqual(grown.l1Offset, first.l1Offset, 'a new L1 in new clusters');
  assertQemuClean(img);
  const ours = qdedup(['check', '--output', 'json', img]);
  assert.equal(ours.status, 0, ours.stderr);
  assert.equal(JSON.parse(ours.stdout).dedup.trusted, true, 'the grown holder holds the whole store');
  // Every cluster of the import was indexed, those past the first coverage included: a second
  // copy costs no data cluster.
  const before = JSON.parse(qdedupOk(['dedup-stats', '--output', 'json', img]).stdout);
  qdedupOk(['write', '-q', '-i', input, img, String(128 << 20)]);
  const after = JSON.parse(qdedupOk(['dedup-stats', '--output', 'json', img]).stdout);
  assert.equal(after['data-clusters'], before['data-clusters'], 'the second copy is linked whole');
  assertQemuClean(img);
  const shadow = Buffer.alloc(256 << 20);
  data.copy(shadow, 0);
  data.copy(shadow, 128 << 20);
  const raw = join(w.dir, 'shadow.raw');
  writeFileSync(raw, shadow);
  assert.ok(qemuCompareRaw(img, raw));
});

/** The holder snapshot's L1 table (offset and entries), from the snapshot table. */
async function snapshotL1(img: string): Promise<{ l1Offset: number; l1Size: number }> {
  const image = await Image.open(img);
  try {
    const s = (await image.loadSnapshots()).find((x) => x.name === HOLDER_NAME);
    assert.ok(s, 'the holder snapshot');
    return { l1Offset: s.l1TableOffset, l1Size: s.l1Size };
  } finally {
    await image.close();
  }
}
