// QEMU's image locks (src/image/image-lock.ts): the byte sets of each profile against what
// strace showed QEMU 7.2's tools take, the order and words of the conflict messages, the
// take/check/release sequence on a fake fcntl (conflicts, a file system that refuses
// locks), and real OFD locks between two open file descriptions of one process
// (src/image/ofd-lock.ts through NodeFile), which conflict just as two processes do.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  BLK_PERM_ALL,
  ImageLockError,
  LOCK_CREATE,
  LOCK_INFO,
  LOCK_READ,
  LOCK_WRITE,
  conflictBytes,
  forceShare,
  lockBytes,
  takeImageLock,
} from '../../src/image/image-lock.ts';
import { ERRNO, ofdLocks, type OfdLocks } from '../../src/image/ofd-lock.ts';
import { NodeFile } from '../../src/image/block-file.ts';
import { createImage } from '../../src/image/create.ts';
import { tempDir } from '../helpers.ts';

describe('lock profiles (QEMU 7.2, from strace of its tools)', () => {
  it('take the bytes qemu-img info, qemu-img check / qemu-io -r, qemu-io, qemu-img create take', () => {
    assert.deepEqual(lockBytes(LOCK_INFO), [201, 203]);
    assert.deepEqual(lockBytes(LOCK_READ), [100, 201, 203]);
    assert.deepEqual(lockBytes(LOCK_WRITE), [100, 101, 103, 201, 203]);
    assert.deepEqual(lockBytes(LOCK_CREATE), [101, 103, 203]);
  });

  it('test the bytes QEMU tests, in its order (held permissions first)', () => {
    assert.deepEqual(
      conflictBytes(LOCK_INFO).map((c) => c.byteOffset),
      [101, 103],
    );
    assert.deepEqual(
      conflictBytes(LOCK_READ).map((c) => c.byteOffset),
      [200, 101, 103],
    );
    assert.deepEqual(
      conflictBytes(LOCK_WRITE).map((c) => c.byteOffset),
      [200, 201, 203, 101, 103],
    );
    assert.deepEqual(
      conflictBytes(LOCK_CREATE).map((c) => c.byteOffset),
      [201, 203, 103],
    );
  });

  it('name permissions with bdrv_perm_names words', () => {
    assert.deepEqual(
      conflictBytes(LOCK_WRITE).map((c) => c.message),
      [
        'Failed to get "consistent read" lock',
        'Failed to get "write" lock',
        'Failed to get "resize" lock',
        'Failed to get shared "write" lock',
        'Failed to get shared "resize" lock',
      ],
    );
  });

  it('-U shares everything: only the held bytes, only the refusal bytes tested (qemu-img check -U: 100, tests 200)', () => {
    assert.deepEqual(lockBytes(forceShare(LOCK_READ)), [100]);
    assert.deepEqual(
      conflictBytes(forceShare(LOCK_READ)).map((c) => c.byteOffset),
      [200],
    );
    assert.equal(forceShare(LOCK_INFO).shared, BLK_PERM_ALL);
    assert.deepEqual(lockBytes(forceShare(LOCK_INFO)), []);
  });
});

/** A fake fcntl: `others` are bytes some other description holds; `fail` makes calls on a byte fail. */
function fakeOfd(others: number[], fail: { set?: Record<number, number>; test?: Record<number, number> } = {}) {
  const mine = new Set<number>();
  const calls: OfdLocks = {
    setReadLock(_fd, byteOffset, lock) {
      const errno = fail.set?.[byteOffset];
      if (lock && errno) return errno;
      if (lock) mine.add(byteOffset);
      else mine.delete(byteOffset);
      return 0;
    },
    testWriteLock(_fd, byteOffset) {
      const errno = fail.test?.[byteOffset];
      if (errno) return errno;
      return others.includes(byteOffset) ? 'conflict' : 'free';
    },
  };
  return { calls, mine };
}

describe('takeImageLock', () => {
  it('takes the bytes and releases them', () => {
    const { calls, mine } = fakeOfd([]);
    const held = takeImageLock(3, 'a.qcow2', LOCK_WRITE, () => assert.fail('no warning'), calls);
    assert.deepEqual(held?.bytes, [100, 101, 103, 201, 203]);
    assert.deepEqual([...mine].sort(), [100, 101, 103, 201, 203]);
    held!.release();
    assert.equal(mine.size, 0);
  });

  it("refuses on a conflict with QEMU's two lines in one, dropping what it took", () => {
    const { calls, mine } = fakeOfd([201]); // a reader that refuses to share write
    assert.throws(
      () => takeImageLock(3, 'a.qcow2', LOCK_WRITE, () => {}, calls),
      (err: unknown) => {
        assert.ok(err instanceof ImageLockError);
        assert.equal(err.message, 'Failed to get "write" lock. Is another process using the image [a.qcow2]?');
        assert.equal(err.exitCode, 1);
        assert.equal(err.details.path, 'a.qcow2');
        return true;
      },
    );
    assert.equal(mine.size, 0, 'the bytes taken before the check are dropped');
    const other = fakeOfd([101]); // a writer
    assert.throws(() => takeImageLock(3, 'a.qcow2', LOCK_INFO, () => {}, other.calls), /^ImageLockError: Failed to get shared "write" lock\. Is another/);
  });

  it('goes on without locks, warning once, where the file system refuses them', () => {
    for (const fail of [{ set: { 101: ERRNO.ENOLCK } }, { test: { 200: ERRNO.EOPNOTSUPP } }]) {
      const { calls, mine } = fakeOfd([], fail);
      const warnings: string[] = [];
      assert.equal(
        takeImageLock(3, 'a.qcow2', LOCK_WRITE, (m) => warnings.push(m), calls),
        null,
      );
      assert.equal(warnings.length, 1);
      assert.match(
        warnings[0],
        /^a\.qcow2: warning: Failed to (lock byte 101: No locks available|get "consistent read" lock: Operation not supported); continuing without image locks/,
      );
      assert.equal(mine.size, 0);
    }
  });

  it('takes nothing and loads nothing where the platform has no OFD locks', () => {
    assert.equal(
      takeImageLock(3, 'a.qcow2', LOCK_WRITE, () => assert.fail('silent, as QEMU locking=auto'), null),
      null,
    );
  });
});

describe(
  'real OFD locks (two descriptions in one process conflict as two processes do)',
  { skip: ofdLocks() ? false : 'no OFD locks on this platform' },
  () => {
    const dir = tempDir('qdedup-ofd-');

    it('a second writer and a reader are refused while a writer holds the file; all are free once it closes', async () => {
      const path = join(dir, 'a.qcow2');
      await createImage(path, { size: 1 << 20, clusterBits: 16, version: 3, refcountOrder: 4, lazyRefcounts: false, force: false });
      const writer = await NodeFile.open(path, true, LOCK_WRITE);
      assert.deepEqual(writer.lock?.bytes, [100, 101, 103, 201, 203]);
      await assert.rejects(NodeFile.open(path, true, LOCK_WRITE), /Failed to get "write" lock\. Is another process using the image/);
      await assert.rejects(NodeFile.open(path, false, LOCK_READ), /Failed to get shared "write" lock/);
      await assert.rejects(NodeFile.open(path, false, LOCK_INFO), /Failed to get shared "write" lock/);
      const forced = await NodeFile.open(path, false, forceShare(LOCK_READ));
      await forced.close();
      const unlocked = await NodeFile.open(path, false); // no lock asked (test doubles, probes)
      await unlocked.close();
      await writer.close();
      const again = await NodeFile.open(path, true, LOCK_WRITE);
      await again.close();
    });

    it('create --force over a held image is refused before a byte changes', async () => {
      const path = join(dir, 'b.qcow2');
      await createImage(path, { size: 1 << 20, clusterBits: 16, version: 3, refcountOrder: 4, lazyRefcounts: false, force: false });
      writeFileSync(join(dir, 'b.copy'), readFileSync(path));
      const reader = await NodeFile.open(path, false, LOCK_READ);
      try {
        await assert.rejects(
          createImage(path, { size: 2 << 20, clusterBits: 16, version: 3, refcountOrder: 4, lazyRefcounts: false, force: true }),
          /Failed to get "write" lock/,
        );
        assert.deepEqual(readFileSync(path), readFileSync(join(dir, 'b.copy')));
      } finally {
        await reader.close();
      }
      await createImage(path, { size: 2 << 20, clusterBits: 16, version: 3, refcountOrder: 4, lazyRefcounts: false, force: true });
    });
  },
);
