// ClusterBatch (src/image/cluster-batch.ts): a batch names each cluster's bytes by buffer and
// offset; views() joins clusters that follow each other in one buffer into one view (one
// iovec of the run's writev) and nothing else; isZero and equals read the bytes in place;
// clear() lets go of the buffers. Through an image, a write of whole and partial clusters
// reads back byte for byte (the engine fills the batch with both kinds).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { ClusterBatch } from '../../src/image/cluster-batch.ts';
import { UNALLOCATED } from '../../src/format/l1l2.ts';
import { Image } from '../../src/image/image.ts';
import { createImage } from '../../src/image/create.ts';
import { tempDir } from '../helpers.ts';

const CS = 512;

/** `clusters` clusters of bytes, cluster k filled with k + 1. */
function filled(clusters: number): Buffer {
  const b = Buffer.alloc(clusters * CS);
  for (let k = 0; k < clusters; k++) b.fill(k + 1, k * CS, (k + 1) * CS);
  return b;
}

test('views: clusters that follow each other in one buffer share a view, in the order asked', () => {
  const a = filled(6);
  const b = filled(2);
  const batch = new ClusterBatch(CS, 16);
  batch.push(10, a, 0, UNALLOCATED, -1); // 0
  batch.push(11, a, CS, UNALLOCATED, -1); // 1: follows 0
  batch.push(12, a, 3 * CS, UNALLOCATED, -1); // 2: a gap before it
  batch.push(13, b, 0, UNALLOCATED, -1); // 3: another buffer
  batch.push(14, b, CS, UNALLOCATED, -1); // 4: follows 3
  batch.push(15, a, 4 * CS, UNALLOCATED, -1); // 5: follows 2 in `a`
  const all = batch.views([0, 1, 2, 3, 4, 5]);
  assert.deepEqual(
    all.map((v) => v.length / CS),
    [2, 1, 2, 1],
  );
  assert.deepEqual(Buffer.concat(all), Buffer.concat([a.subarray(0, 2 * CS), a.subarray(3 * CS, 4 * CS), b, a.subarray(4 * CS, 5 * CS)]));
  // A subset skipping 1: 0 and 2 are not neighbours in `a`.
  assert.deepEqual(
    batch.views([0, 2, 5]).map((v) => v.length / CS),
    [1, 2],
  );
  assert.deepEqual(batch.views([]), []);
  assert.deepEqual(batch.data(4), b.subarray(CS, 2 * CS));
  assert.equal(batch.guest[5], 15);
});

test('isZero and equals read the cluster where it is', () => {
  const buf = Buffer.alloc(3 * CS);
  buf[CS + 100] = 7; // cluster 1: one non-zero byte inside
  buf[3 * CS - 1] = 1; // cluster 2: its last byte
  const batch = new ClusterBatch(CS, 4);
  for (let k = 0; k < 3; k++) batch.push(k, buf, k * CS, UNALLOCATED, -1);
  assert.deepEqual(
    [0, 1, 2].map((i) => batch.isZero(i)),
    [true, false, false],
  );
  assert.ok(batch.equals(1, Buffer.from(buf.subarray(CS, 2 * CS))));
  assert.ok(!batch.equals(0, Buffer.from(buf.subarray(CS, 2 * CS))));
  assert.ok(!batch.equals(0, Buffer.alloc(CS - 1)), 'a shorter buffer is not equal');
});

test('clear empties the batch and drops the buffers it named', () => {
  const batch = new ClusterBatch(CS, 4);
  batch.push(0, filled(1), 0, UNALLOCATED, 3);
  batch.clear();
  assert.equal(batch.length, 0);
  assert.equal(batch.source[0], undefined);
  assert.equal(batch.old[0], undefined);
});

test('an image write of whole and partial clusters over several batches reads back exactly', async () => {
  const path = join(tempDir(), 'batch.qcow2');
  await createImage(path, { size: 64 * 1024 * 1024, clusterBits: 9, version: 3, refcountOrder: 4, lazyRefcounts: false, force: false });
  // 8 MiB batches of 512-byte clusters: 16,384 clusters each; 10 MiB + 700 bytes at an odd offset.
  const data = Buffer.alloc(10 * 1024 * 1024 + 700);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
  const at = 3 * CS + 123;
  const img = await Image.open(path, { writable: true });
  await img.write(at, data);
  await img.write(at, data.subarray(0, 5000)); // again, over clusters it now holds alone (in place)
  await img.close();
  const back = await Image.open(path);
  assert.deepEqual(await back.read(at, data.length), data);
  assert.deepEqual(await back.read(0, at), Buffer.alloc(at));
  await back.close();
});
