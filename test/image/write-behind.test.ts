// WriteBehindFile (src/image/write-behind.ts): reads see writes still in flight, writes over
// an in-flight range keep their order, sync waits for everything, and a failed write behind
// is reported by the next operation (so no commit can follow it). The inner file here is a
// MemFile whose writes are held until released, so "in flight" is a state the test controls.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WriteBehindFile } from '../../src/image/write-behind.ts';
import { MemFile } from '../doubles/mem-file.ts';

/** A MemFile whose writes wait for release(); `failNext` makes the next write fail with ENOSPC. */
class HeldFile extends MemFile {
  private gate: Promise<void> = Promise.resolve();
  private open: (() => void) | null = null;
  failNext = false;
  landed: number[] = [];
  synced = 0;

  hold(): void {
    this.gate = new Promise((resolve) => (this.open = resolve));
  }

  release(): void {
    this.open?.();
    this.open = null;
  }

  override async write(pos: number, data: Buffer): Promise<void> {
    await this.gate;
    if (this.failNext) {
      this.failNext = false;
      throw Object.assign(new Error('No space left on device'), { code: 'ENOSPC' });
    }
    this.landed.push(pos);
    await super.write(pos, data);
  }

  override async sync(): Promise<void> {
    this.synced++;
  }
}

const tick = () => new Promise((resolve) => setImmediate(resolve));

test('reads see in-flight bytes; async reads and overlapping writes wait; sync waits for all', async () => {
  const inner = new HeldFile('x', Buffer.alloc(64 * 1024));
  const f = new WriteBehindFile(inner);
  inner.hold();
  const a = Buffer.alloc(4096, 0xaa);
  const b = Buffer.alloc(4096, 0xbb);
  f.writeBehind(8192, [a, b]);
  await tick();
  assert.equal(inner.landed.length, 0, 'still in flight');
  // A synchronous read across the in-flight range sees its bytes, and the old ones around it.
  const got = f.readSync(8192 - 100, 8192 + 200);
  assert.ok(got.subarray(0, 100).equals(Buffer.alloc(100)));
  assert.ok(got.subarray(100, 4196).equals(a));
  assert.ok(got.subarray(4196, 8292).equals(b));
  assert.ok(got.subarray(8292).equals(Buffer.alloc(100)));
  const v = [Buffer.alloc(10), Buffer.alloc(10)];
  f.readvSync(8192 + 4090, v);
  assert.ok(v[0].equals(Buffer.from([0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xbb, 0xbb, 0xbb, 0xbb])));
  // An async read of the range, and a write over it, wait for the write behind.
  const reading = f.read(8192, 16);
  const writing = f.write(8192, Buffer.alloc(16, 0xcc));
  const elsewhere = f.write(0, Buffer.alloc(16, 0xdd)); // not overlapping: not held back by it
  let synced = false;
  const syncing = f.sync().then(() => (synced = true));
  await tick();
  assert.equal(synced, false, 'sync waits for the write behind');
  inner.release();
  assert.ok((await reading).equals(a.subarray(0, 16)));
  await writing;
  await elsewhere;
  await syncing;
  assert.ok(inner.landed.indexOf(8192) < inner.landed.lastIndexOf(8192), 'the later write landed after the write behind');
  assert.ok(f.readSync(8192, 16).equals(Buffer.alloc(16, 0xcc)));
  assert.equal(inner.synced, 1);
  await f.settled();
});

test('a failed write behind is thrown by the next operation and by settled(); sync never reports success after it', async () => {
  const inner = new HeldFile('x', Buffer.alloc(16 * 1024));
  const f = new WriteBehindFile(inner);
  inner.failNext = true;
  f.writeBehind(4096, [Buffer.alloc(4096, 1)]);
  await assert.rejects(f.settled(), /No space left on device/);
  await assert.rejects(f.sync(), /No space left on device/);
  await assert.rejects(f.write(0, Buffer.alloc(1)), /No space left on device/);
  assert.throws(() => f.writeBehind(0, [Buffer.alloc(1)]), /No space left on device/);
  assert.equal(inner.synced, 0, 'nothing was synced after the failure');
  await f.close(); // close is the error path's: it does not throw again
});
