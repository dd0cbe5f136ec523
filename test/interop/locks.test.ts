// QEMU's image locks against the real thing (I6): real
// concurrent processes — qdedup beside qemu-io, qemu-nbd, qemu-img and another qdedup, in
// both orders — with the lock bytes read from /proc/locks, the refused side's exact
// message, and after every scenario the image compared with a raw shadow of every
// acknowledged write (`qemu-img compare`) and checked by `qemu-img check`.
//
// A long-running qdedup is made to hold its locks without timing: it is started, and once
// /proc/locks shows its bytes it is stopped with SIGSTOP (and the bytes checked again, in
// case it was stopped between two opens); SIGCONT lets it finish. qemu-io holds an image
// with `sleep`, qemu-nbd by serving it; both are killed in `finally`.

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, ftruncateSync, openSync, readFileSync, realpathSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { BIN, NO_QEMU, qemuCheck, qemuCompareRaw, run, tempDir } from '../helpers.ts';
import { LOCK_READ, LOCK_WRITE, lockBytes } from '../../src/image/image-lock.ts';

const HAVE_NBD = spawnSync('qemu-nbd', ['--version'], { stdio: 'ignore' }).status === 0;
const HAVE_PROC_LOCKS = existsSync('/proc/locks');
const SKIP: string | false = NO_QEMU || (!HAVE_PROC_LOCKS && 'no /proc/locks (Linux only)');
const SKIP_NBD: string | false = SKIP || (!HAVE_NBD && 'qemu-nbd not installed');

const dir = tempDir('qdedup-locks-');
const children = new Set<ChildProcess>();
after(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
});

interface Ran {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Starts a process; `done` resolves with its exit status and output. */
function start(cmd: string, args: string[]): { child: ChildProcess; done: Promise<Ran>; stdout: () => string } {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1' } });
  children.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d) => (stdout += d));
  child.stderr!.on('data', (d) => (stderr += d));
  const done = new Promise<Ran>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (status) => {
      children.delete(child);
      resolve({ status, stdout, stderr });
    });
  });
  return { child, done, stdout: () => stdout };
}

const qdedup = (...args: string[]) => start(process.execPath, [BIN, ...args]).done;
const qdedupStart = (...args: string[]) => start(process.execPath, [BIN, ...args]);

/** The bytes OFD-locked on `path`'s inode by anyone, from /proc/locks (ranges expanded). */
function lockedBytes(path: string): Set<number> {
  const ino = statSync(path).ino;
  const out = new Set<number>();
  for (const line of readFileSync('/proc/locks', 'utf8').split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f[1] !== 'OFDLCK' || f[0] === '->') continue; // "->" lines are waiters, not holders
    const id = f[5].split(':');
    if (Number(id[2]) !== ino) continue;
    const first = Number(f[6]);
    const last = f[7] === 'EOF' ? first : Number(f[7]);
    for (let b = first; b <= last && b < first + 1024; b++) out.add(b);
  }
  return out;
}

const sorted = (s: Iterable<number>) => [...s].sort((a, b) => a - b);
const holds = (path: string, bytes: number[]) => {
  const held = lockedBytes(path);
  return bytes.every((b) => held.has(b));
};

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Waits until `bytes` are all locked on `path` (fails if `proc` exits first). */
async function waitForLocks(path: string, bytes: number[], proc: { done: Promise<Ran> }): Promise<void> {
  let exited: Ran | undefined;
  void proc.done.then((r) => (exited = r));
  for (;;) {
    if (holds(path, bytes)) return;
    if (exited) assert.fail(`the holder exited (${exited.status}) before locking ${bytes}: ${exited.stderr}`);
    await sleep(2);
  }
}

/**
 * Starts a long qdedup command and returns it stopped (SIGSTOP) while it holds `bytes` on
 * `path`. If it finished before it could be caught, `done` tells (the caller's assertion
 * on `caught` then fails rather than racing).
 */
async function qdedupHolding(path: string, bytes: number[], ...args: string[]): Promise<{ child: ChildProcess; done: Promise<Ran>; caught: boolean }> {
  const p = qdedupStart(...args);
  let exited = false;
  void p.done.then(() => (exited = true));
  while (!exited) {
    if (holds(path, bytes)) {
      p.child.kill('SIGSTOP');
      await sleep(20); // the stop is delivered; the locks seen now are held while stopped
      if (holds(path, bytes)) return { ...p, caught: true };
      p.child.kill('SIGCONT'); // stopped between two opens: let it go on and catch it again
    }
    await sleep(1);
  }
  return { ...p, caught: false };
}

/** qemu-io holding `path` (read-write unless readOnly) after running `commands`, until killed. */
async function qemuIoHolding(path: string, readOnly: boolean, ...commands: string[]) {
  // The one-byte read after `commands` marks that they are done (qemu-io runs its -c commands
  // in order): the locks appear at open, before a write or flush has changed the file.
  const args = [...(readOnly ? ['-r'] : []), '-f', 'qcow2', ...[...commands, 'read 0 1'].flatMap((c) => ['-c', c]), '-c', 'sleep 600000', path];
  // stdbuf: qemu-io's stdout is a pipe here, block-buffered unless told otherwise.
  const p = start('stdbuf', ['-oL', 'qemu-io', ...args]);
  await waitForLocks(path, lockBytes(readOnly ? LOCK_READ : LOCK_WRITE), p);
  let exited: Ran | undefined;
  void p.done.then((r) => (exited = r));
  while (!/^read 1\/1 bytes at offset 0$/m.test(p.stdout())) {
    if (exited) assert.fail(`qemu-io exited (${exited.status}) before its commands were done: ${exited.stderr}`);
    await sleep(2);
  }
  return p;
}

async function stop(p: { child: ChildProcess; done: Promise<Ran> }): Promise<void> {
  if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
  await p.done;
}

let serial = 0;
/** A new image (qdedup create) and its raw shadow of the same size, zero-filled. */
async function imageWithShadow(size: number, ...opts: string[]): Promise<{ img: string; raw: string }> {
  const img = join(dir, `img${++serial}.qcow2`);
  const raw = join(dir, `img${serial}.raw`);
  const r = await qdedup('create', '-q', ...opts, img, String(size));
  assert.equal(r.status, 0, r.stderr);
  const fd = openSync(raw, 'w');
  ftruncateSync(fd, size);
  closeSync(fd);
  return { img, raw };
}

/** Records a pattern write in the raw shadow. */
function shadowWrite(raw: string, offset: number, length: number, pattern: number): void {
  const fd = openSync(raw, 'r+');
  writeSync(fd, Buffer.alloc(length, pattern), 0, length, offset);
  closeSync(fd);
}

/** The image reads back as its shadow and qemu-img check finds no corruption (exit 0, or 3 for leaks on dedup images). */
function assertIntact(img: string, raw: string, plain = true): void {
  assert.ok(qemuCompareRaw(img, raw), `qemu-img compare ${img} with its raw shadow`);
  const c = qemuCheck(img);
  assert.ok(c.json, `qemu-img check printed JSON: ${c.stderr}`);
  assert.equal(c.json!.corruptions ?? 0, 0, 'no corruptions');
  assert.equal(c.status, plain ? 0 : c.json!.leaks ? 3 : 0, `qemu-img check exit status: ${c.stderr}`);
}

const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
const refusal = (img: string, shared: boolean, perm = 'write') =>
  `qdedup: ${img}: Failed to get ${shared ? 'shared ' : ''}"${perm}" lock. Is another process using the image [${img}]?\n`;

/** A refusal: exit 1, nothing on stdout, exactly one line on stderr. */
function assertRefused(r: Ran, expected: string): void {
  assert.equal(r.status, 1, `exit 1; stderr: ${r.stderr}`);
  assert.equal(r.stdout, '');
  assert.equal(r.stderr, expected);
}

describe('qdedup refuses images that QEMU holds', { skip: SKIP }, () => {
  it("write is refused while qemu-io holds the image read-write; the file is byte-identical; qemu-io's own write survives", async () => {
    const { img, raw } = await imageWithShadow(8 << 20, '-o', 'dedup=off');
    assert.equal((await qdedup('write', '-q', '-P', '0x11', img, '0', '64k')).status, 0);
    shadowWrite(raw, 0, 64 << 10, 0x11);
    const holder = await qemuIoHolding(img, false, 'write -P 0x5a 1M 64k', 'flush');
    shadowWrite(raw, 1 << 20, 64 << 10, 0x5a);
    try {
      assert.deepEqual(sorted(lockedBytes(img)), [100, 101, 103, 201, 203], 'qemu-io read-write locks');
      const before = sha256(img);
      assertRefused(await qdedup('write', '-P', '0x22', img, '0', '4k'), refusal(img, false));
      assertRefused(await qdedup('write', '-z', img, '2M', '64k'), refusal(img, false));
      assertRefused(await qdedup('check', '-r', 'leaks', img), refusal(img, false));
      assertRefused(await qdedup('create', '--force', '-q', img, '1M'), refusal(img, false));
      assert.equal(sha256(img), before, 'refused commands left the file byte-identical');
      // Read-only commands: refused beside a writer, as qemu-img info/check are …
      assertRefused(await qdedup('info', img), refusal(img, true));
      assertRefused(await qdedup('read', '-P', '0x11', img, '0', '64k'), refusal(img, true));
      const check = await qdedup('check', img);
      assert.equal(check.status, 1);
      assert.equal(check.stderr, refusal(img, true));
      assertRefused(await qdedup('dedup-stats', img), refusal(img, true));
      assertRefused(await qdedup('journal-dump', img), refusal(img, true));
      const json = await qdedup('info', '--output', 'json', img);
      assert.equal(json.status, 1);
      assert.deepEqual(JSON.parse(json.stdout).error, {
        code: 'ELOCKED',
        message: `Failed to get shared "write" lock. Is another process using the image [${img}]?`,
        path: img,
      });
      // … and allowed with -U (force-share), which takes no conflicting lock.
      const info = await qdedup('info', '-U', '--output', 'json', img);
      assert.equal(info.status, 0, info.stderr);
      assert.equal(JSON.parse(info.stdout)['virtual-size'], 8 << 20);
      const read = await qdedup('read', '-U', '-P', '0x5a', img, '1M', '64k');
      assert.equal(read.status, 0, read.stderr);
      assert.equal((await qdedup('check', '--force-share', img)).status, 0);
      assert.equal(sha256(img), before);
    } finally {
      await stop(holder);
    }
    assertIntact(img, raw);
  });

  it('read-only commands are allowed beside a read-only qemu-io; write is refused with the shared-lock message', async () => {
    const { img, raw } = await imageWithShadow(4 << 20); // a dedup image: dedup-stats and journal-dump apply
    assert.equal((await qdedup('write', '-q', '-P', '0x33', img, '512k', '64k')).status, 0);
    shadowWrite(raw, 512 << 10, 64 << 10, 0x33);
    const holder = await qemuIoHolding(img, true);
    try {
      assert.deepEqual(sorted(lockedBytes(img)), [100, 201, 203], 'qemu-io -r locks');
      for (const args of [
        ['info', img],
        ['read', '-P', '0x33', img, '512k', '64k'],
        ['check', img],
        ['dedup-stats', img],
        ['journal-dump', img],
      ]) {
        const r = await qdedup(...args);
        assert.equal(r.status, 0, `${args[0]} beside qemu-io -r: ${r.stderr}`);
      }
      const before = sha256(img);
      // qemu-io -r refuses to share write: the writer's own permission is what fails.
      assertRefused(await qdedup('write', '-P', '0x44', img, '0', '4k'), refusal(img, false));
      assert.equal(sha256(img), before);
    } finally {
      await stop(holder);
    }
    assertIntact(img, raw, false);
  });

  it('write is refused while qemu-nbd serves the image (read-write and read-only exports)', { skip: SKIP_NBD }, async () => {
    const { img, raw } = await imageWithShadow(4 << 20, '-o', 'dedup=off');
    assert.equal((await qdedup('write', '-q', '-P', '0x55', img, '0', '128k')).status, 0);
    shadowWrite(raw, 0, 128 << 10, 0x55);
    for (const readOnly of [false, true]) {
      const sock = join(dir, `nbd${++serial}.sock`);
      const nbd = start('qemu-nbd', [...(readOnly ? ['-r'] : []), '-f', 'qcow2', '-k', sock, img]);
      try {
        await waitForLocks(img, lockBytes(readOnly ? LOCK_READ : LOCK_WRITE), nbd);
        const before = sha256(img);
        assertRefused(await qdedup('write', '-P', '0x66', img, '0', '64k'), refusal(img, false));
        assert.equal(sha256(img), before, 'the served image is byte-identical');
        const info = await qdedup('info', img);
        if (readOnly) assert.equal(info.status, 0, info.stderr);
        else assertRefused(info, refusal(img, true));
      } finally {
        await stop(nbd);
      }
    }
    assertIntact(img, raw);
  });
});

describe('QEMU refuses images that qdedup holds', { skip: SKIP }, () => {
  it('qemu-io, qemu-img and qemu-nbd are refused while a qdedup write runs; the write completes intact', async () => {
    const size = 256 << 20;
    const { img, raw } = await imageWithShadow(size, '-o', 'dedup=off');
    const w = await qdedupHolding(img, lockBytes(LOCK_WRITE), 'write', '-q', '-P', '0x77', img, '0', String(128 << 20));
    try {
      assert.ok(w.caught, 'qdedup write was caught holding its locks');
      assert.deepEqual(sorted(lockedBytes(img)), [100, 101, 103, 201, 203], 'qdedup write holds the bytes qemu-io takes');
      const io = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x99 0 4k', img]);
      assert.equal(io.status, 1);
      assert.equal(io.stderr, `qemu-io: can't open device ${img}: Failed to get "write" lock\nIs another process using the image [${img}]?\n`);
      const ioRead = run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read 0 4k', img]);
      assert.equal(ioRead.status, 1);
      assert.match(ioRead.stderr, /Failed to get shared "write" lock\nIs another process using the image/);
      const info = run('qemu-img', ['info', img]);
      assert.equal(info.status, 1);
      assert.match(info.stderr, /Failed to get shared "write" lock/);
      const create = run('qemu-img', ['create', '-f', 'qcow2', img, '1M']);
      assert.equal(create.status, 1);
      assert.match(create.stderr, /Failed to get "write" lock/);
      if (HAVE_NBD) {
        const nbd = run('qemu-nbd', ['-f', 'qcow2', '-k', join(dir, `nbd${++serial}.sock`), img]);
        assert.equal(nbd.status, 1);
        assert.match(nbd.stderr, /Failed to get "write" lock/);
      }
      // Another qdedup writer is refused the same way, and its range stays unwritten.
      assertRefused(await qdedup('write', '-P', '0x88', img, String(200 << 20), '64k'), refusal(img, false));
      // qemu-img info -U still works (it takes no conflicting lock).
      assert.equal(run('qemu-img', ['info', '-U', img]).status, 0);
    } finally {
      w.child.kill('SIGCONT');
    }
    const r = await w.done;
    assert.equal(r.status, 0, r.stderr);
    shadowWrite(raw, 0, 128 << 20, 0x77);
    assert.deepEqual(sorted(lockedBytes(img)), [], 'locks are gone with the process');
    assertIntact(img, raw);
  });

  it('a qdedup read holds the locks qemu-io -r takes: read-only QEMU is allowed, a QEMU writer refused', async () => {
    const { img, raw } = await imageWithShadow(64 << 20, '-o', 'dedup=off');
    assert.equal((await qdedup('write', '-q', '-P', '0x21', img, '0', '32M')).status, 0);
    shadowWrite(raw, 0, 32 << 20, 0x21);
    const rd = await qdedupHolding(img, lockBytes(LOCK_READ), 'read', '-q', '-P', '0x21', img, '0', '32M');
    try {
      assert.ok(rd.caught, 'qdedup read was caught holding its locks');
      assert.deepEqual(sorted(lockedBytes(img)), [100, 201, 203]);
      assert.equal(run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0x21 0 4k', img]).status, 0);
      assert.equal(run('qemu-img', ['info', img]).status, 0);
      assert.equal(run('qemu-img', ['check', img]).status, 0);
      const io = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x99 0 4k', img]);
      assert.equal(io.status, 1);
      assert.match(io.stderr, /Failed to get "write" lock\nIs another process using the image/);
      assertRefused(await qdedup('write', '-P', '0x99', img, '0', '4k'), refusal(img, false));
    } finally {
      rd.child.kill('SIGCONT');
    }
    assert.equal((await rd.done).status, 0);
    assertIntact(img, raw);
  });
});

describe('backing files', { skip: SKIP }, () => {
  it('are opened with the read locks QEMU takes on backing images: a writer of the base refuses an overlay write, and the reverse', async () => {
    const { img: base, raw } = await imageWithShadow(4 << 20, '-o', 'dedup=off');
    assert.equal((await qdedup('write', '-q', '-P', '0x61', base, '0', '1M')).status, 0);
    shadowWrite(raw, 0, 1 << 20, 0x61);
    const overlay = join(dir, `overlay${++serial}.qcow2`);
    assert.equal((await qdedup('create', '-q', '-o', 'dedup=off', '-b', base, '-F', 'qcow2', overlay)).status, 0);
    // qemu-io writing the base: the overlay write is refused on the base, nothing written.
    const holder = await qemuIoHolding(base, false);
    try {
      const before = sha256(overlay);
      const r = await qdedup('write', '-P', '0x62', overlay, '0', '4k');
      assertRefused(r, refusal(realpathSync(base), true)); // the base is named (by its real path)
      assert.equal(sha256(overlay), before);
    } finally {
      await stop(holder);
    }
    // A qdedup read of the overlay holds the base like qemu-io -r does: 100 201 203.
    const rd = await qdedupHolding(base, lockBytes(LOCK_READ), 'read', '-q', '-P', '0x61', overlay, '0', '1M');
    try {
      assert.ok(rd.caught, 'qdedup read of the overlay was caught holding the base');
      assert.deepEqual(sorted(lockedBytes(base)), [100, 201, 203]);
      const io = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x99 0 4k', base]);
      assert.equal(io.status, 1);
      assert.match(io.stderr, /Failed to get "write" lock/);
    } finally {
      rd.child.kill('SIGCONT');
    }
    assert.equal((await rd.done).status, 0);
    assertIntact(base, raw);
    assert.ok(run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', overlay, raw]).status === 0, 'the overlay reads as its base');
  });
});

describe('two qdedup writers', { skip: SKIP }, () => {
  it("on a dedup image: the second is refused (exit 1, exact message), the first one's data is intact and indexed", async () => {
    const { img, raw } = await imageWithShadow(256 << 20);
    // Data that does not dedup away, so the write takes long enough to be caught.
    const input = join(dir, 'random.bin');
    writeFileSync(input, randomBytes(96 << 20));
    const a = await qdedupHolding(img, lockBytes(LOCK_WRITE), 'write', '-q', '-i', input, img, '0');
    let b: Ran;
    try {
      assert.ok(a.caught, 'the first writer was caught holding its locks');
      b = await qdedup('write', '-P', '0xbb', img, String(128 << 20), '1M');
    } finally {
      a.child.kill('SIGCONT');
    }
    assertRefused(b!, refusal(img, false));
    const ra = await a.done;
    assert.equal(ra.status, 0, ra.stderr);
    const data = readFileSync(input);
    const sfd = openSync(raw, 'r+');
    writeSync(sfd, data, 0, data.length, 0);
    closeSync(sfd);
    assertIntact(img, raw, false);
    const stats = await qdedup('dedup-stats', '--output', 'json', img);
    assert.equal(stats.status, 0, stats.stderr);
    assert.equal(JSON.parse(stats.stdout).trusted, true, 'the index stayed trusted');
  });

  it('a read-only qdedup beside a qdedup writer is refused unless -U', async () => {
    const { img, raw } = await imageWithShadow(256 << 20, '-o', 'dedup=off');
    const w = await qdedupHolding(img, lockBytes(LOCK_WRITE), 'write', '-q', '-P', '0x3c', img, '0', String(128 << 20));
    try {
      assert.ok(w.caught);
      assertRefused(await qdedup('info', img), refusal(img, true));
      assertRefused(await qdedup('read', '-P', '0', img, String(200 << 20), '4k'), refusal(img, true));
      const info = await qdedup('info', '-U', img);
      assert.equal(info.status, 0, info.stderr);
      assert.match(info.stdout, /^image: /);
    } finally {
      w.child.kill('SIGCONT');
    }
    assert.equal((await w.done).status, 0);
    shadowWrite(raw, 0, 128 << 20, 0x3c);
    assertIntact(img, raw);
  });
});

describe('-U is for read-only commands', () => {
  it('write -U and check -U -r are usage errors, and the image is not opened', async () => {
    const { img } = await imageWithShadow(1 << 20, '-o', 'dedup=off');
    const before = sha256(img);
    const w = await qdedup('write', '-U', '-P', '1', img, '0', '4k');
    assert.equal(w.status, 1);
    assert.match(w.stderr, /^qdedup: -U \(force-share\) can only be used with read-only images, not with write\n/);
    const c = await qdedup('check', '-U', '-r', 'leaks', img);
    assert.equal(c.status, 1);
    assert.match(c.stderr, /^qdedup: -U \(force-share\) can only be used with read-only images, not with -r\n/);
    assert.equal(sha256(img), before);
  });

  it('--help of the read-only commands lists -U, --force-share', async () => {
    for (const cmd of ['info', 'read', 'check', 'dedup-stats', 'journal-dump']) {
      const r = await qdedup(cmd, '--help');
      assert.equal(r.status, 0);
      assert.match(r.stdout, /-U, --force-share/, `${cmd} --help`);
    }
  });
});
