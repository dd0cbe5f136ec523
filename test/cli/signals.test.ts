// SIGINT, SIGTERM and SIGHUP during a long `qdedup write -i -`:
// the chunk in flight is finished, the write committed and the image closed cleanly, so
// everything reported written reads back, `qemu-img check` finds no corruption and the
// dedup index survives (trusted, and the next write of the same data links to it); exit
// 130/143/129 with a one-line note. A second signal ends the process at once.
//
// The test is the producer: a deterministic AES-CTR keystream (no repeats, so every hit
// afterwards comes from the surviving index) fed through the child's stdin, and the signal
// is sent once a random number of bytes (20–80 MiB) has been accepted by the child, which
// — reading at most two 8 MiB chunks ahead — is then past opening the image for writing.
// Synchronisation is on the child's consumption (write callbacks), never on sleeps.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createCipheriv, randomBytes } from 'node:crypto';
import { readFileSync, readdirSync, readlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BIN, HAVE_QEMU, NO_QEMU, qemuCheck, run, tempDir } from '../helpers.ts';

const MiB = 1 << 20;
const CHUNK = 8 * MiB; // write.ts CHUNK_BYTES
const DISK = 160 * MiB;
const dir = tempDir('qdedup-signals-');
let serial = 0;

/** The first `length` bytes of the keystream for `key` (deterministic, incompressible, no repeated cluster). */
function keystream(key: Buffer, length: number): Buffer {
  return createCipheriv('aes-128-ctr', key, Buffer.alloc(16)).update(Buffer.alloc(length));
}

function qSync(args: string[], input?: Buffer) {
  const r = spawnSync(process.execPath, [BIN, ...args], { input, maxBuffer: 1 << 30 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr.toString() };
}

function stats(img: string): Record<string, any> {
  const r = qSync(['dedup-stats', '--output', 'json', img]);
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout.toString());
}

interface Interrupted {
  status: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
  fed: number;
}

/**
 * Starts `write -i - IMG 0 [LENGTH]`, feeds it the keystream and, once `signalAfter`
 * bytes were accepted, sends `signals` (in order, back to back). Then it either keeps
 * feeding (`silent` false: the child has data to read) or keeps stdin open and silent.
 */
async function interruptWrite(
  img: string,
  key: Buffer,
  signalAfter: number,
  signals: NodeJS.Signals[],
  opts: { silent: boolean; length?: number },
): Promise<Interrupted> {
  const total = opts.length ?? 150 * MiB;
  const data = keystream(key, total);
  const child = spawn(process.execPath, [BIN, 'write', '-i', '-', img, '0', ...(opts.length ? [String(opts.length)] : [])], {
    stdio: ['pipe', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<{ status: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('close', (status, signal) => resolve({ status, signal })),
  );
  let alive = true;
  void exited.then(() => {
    alive = false;
  });
  child.stdin!.on('error', () => {}); // EPIPE once the child stops reading
  let fed = 0;
  const PIECE = 256 * 1024;
  const feed = async (until: number) => {
    while (alive && fed < until) {
      const piece = data.subarray(fed, Math.min(until, fed + PIECE));
      const ok = await new Promise<boolean>((resolve) => child.stdin!.write(piece, (err) => resolve(!err)));
      if (!ok) return;
      fed += piece.length;
    }
  };
  await feed(signalAfter);
  assert.ok(alive, 'the child is still writing when signalled');
  for (const s of signals) child.kill(s);
  if (!opts.silent) void feed(total);
  const guard = setTimeout(() => child.kill('SIGKILL'), 60_000);
  const { status, signal } = await exited;
  clearTimeout(guard);
  child.stdin!.destroy();
  return { status, signal, stderr, fed };
}

const NOTE =
  /^qdedup: (.+): interrupted \((SIG[A-Z]+)\) after writing (\d+) (?:of (\d+) bytes|bytes \(of an input of unknown length\)) at offset 0; the data written is durable$/;

describe('signals during write', { concurrency: 1 }, () => {
  const cases: { sig: NodeJS.Signals; code: number; silent: boolean; length?: number }[] = [
    { sig: 'SIGINT', code: 130, silent: false },
    { sig: 'SIGTERM', code: 143, silent: true }, // a silent producer must not hold the exit up
    { sig: 'SIGHUP', code: 129, silent: false, length: 150 * MiB },
    { sig: 'SIGINT', code: 130, silent: true, length: 120 * MiB },
  ];
  for (const c of cases) {
    it(`${c.sig} at a random moment (${c.silent ? 'producer silent' : 'producer still writing'}${c.length ? ', LENGTH given' : ''}): exit ${c.code}, data durable, index kept`, async () => {
      const img = join(dir, `s-${++serial}.qcow2`);
      assert.equal(qSync(['create', '-q', img, String(DISK)]).status, 0);
      const key = randomBytes(16);
      const signalAfter = 20 * MiB + Math.floor(Math.random() * 60 * MiB);
      const label = `${c.sig} after ${signalAfter} bytes (key ${key.toString('hex')})`;
      const r = await interruptWrite(img, key, signalAfter, [c.sig], { silent: c.silent, length: c.length });
      assert.equal(r.signal, null, `${label}: ended by exit, not killed: ${r.stderr}`);
      assert.equal(r.status, c.code, `${label}: ${r.stderr}`);
      const lines = r.stderr.split('\n').filter((l) => l !== '');
      assert.equal(lines.length, 1, `${label}: one line: ${r.stderr}`);
      const m = NOTE.exec(lines[0]);
      assert.ok(m, `${label}: note: ${lines[0]}`);
      assert.equal(m[1], img);
      assert.equal(m[2], c.sig);
      const written = Number(m[3]);
      if (c.length) assert.equal(Number(m[4]), c.length);
      assert.ok(written >= CHUNK && written <= r.fed, `${label}: wrote ${written} of ${r.fed} fed`);
      assert.equal(written % CHUNK, 0, `${label}: whole chunks only (the one in flight finished)`);
      // Everything reported written reads back, and nothing after it was written.
      const back = qSync(['read', img, '0', String(Math.min(DISK, written + 2 * CHUNK))]);
      assert.equal(back.status, 0, back.stderr);
      const expect = Buffer.alloc(back.stdout.length);
      keystream(key, written).copy(expect);
      assert.ok(back.stdout.equals(expect), `${label}: read back`);
      if (HAVE_QEMU) {
        const chk = qemuCheck(img);
        assert.equal(chk.json?.corruptions ?? 0, 0, `${label}: ${chk.stderr.slice(0, 400)}`);
        assert.equal(chk.json?.['check-errors'] ?? 0, 0, label);
        assert.ok(chk.status === 0 || chk.status === 3, `${label}: qemu-img check exit ${chk.status}`);
      }
      // The index survived the interruption: trusted, and the next write of data from the
      // interrupted stream links to it.
      const st = stats(img);
      assert.equal(st.trusted, true, `${label}: index trusted`);
      assert.equal(st.dirty, false, `${label}: closed cleanly`);
      assert.ok(st['index-entries'] > 0, `${label}: index entries`);
      const again = keystream(key, CHUNK);
      const w = qSync(['write', '-q', '-i', '-', img, String(DISK - CHUNK)], again);
      assert.equal(w.status, 0, w.stderr);
      assert.equal(w.stderr, '', `${label}: no 'index not trusted' notice`);
      const after = stats(img);
      assert.ok(
        after['bytes-saved'] - st['bytes-saved'] >= CHUNK,
        `${label}: the same 8 MiB again are all hits (bytes saved ${st['bytes-saved']} → ${after['bytes-saved']})`,
      );
    });
  }

  it('check -r interrupted: the repair is finished first, then exit 130 with a note', { skip: NO_QEMU }, async () => {
    // 131,072 clusters of 512 bytes (made by qemu-img convert, fast): the check takes long
    // enough to be signalled while it runs. One leaked cluster past the old end of file.
    const raw = join(dir, 'leak.raw');
    writeFileSync(raw, Buffer.alloc(64 * MiB, 1));
    const img = join(dir, 'leak.qcow2');
    assert.equal(run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', raw, img]).status, 0);
    const buf = readFileSync(img);
    const leak = Math.ceil(buf.length / 512);
    const refblock = Number(buf.readBigUInt64BE(Number(buf.readBigUInt64BE(48)) + 8 * Math.floor(leak / 256)));
    assert.ok(refblock > 0, 'a refcount block covers the cluster past the end');
    const out = Buffer.alloc((leak + 1) * 512);
    buf.copy(out);
    out.writeUInt16BE(1, refblock + 2 * (leak % 256));
    writeFileSync(img, out);
    assert.equal(qSync(['check', img]).status, 3, 'one leak before');
    const child = spawn(process.execPath, [BIN, 'check', '-r', 'leaks', img], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.on('close', (status) => resolve(status)));
    let alive = true;
    void exited.then(() => {
      alive = false;
    });
    // Synchronise on the image being open in the child: the handlers are installed by then.
    const opened = () => {
      try {
        return readdirSync(`/proc/${child.pid}/fd`).some((fd) => {
          try {
            return readlinkSync(`/proc/${child.pid}/fd/${fd}`) === img;
          } catch {
            return false;
          }
        });
      } catch {
        return false;
      }
    };
    while (alive && !opened()) await new Promise((r) => setTimeout(r, 2));
    assert.ok(alive, 'the check was still running when signalled');
    child.kill('SIGINT');
    const status = await exited;
    assert.equal(status, 130, stderr);
    assert.match(stderr, /SIGINT received: finishing the repair first/);
    assert.match(
      stderr,
      /^qdedup: .*leak\.qcow2: interrupted \(SIGINT\) during the repair, which was completed first; run 'qdedup check' again for the result$/m,
    );
    const after = qSync(['check', img]);
    assert.equal(after.status, 0, `repaired completely: ${after.stderr}`);
  });

  it('a second signal ends the write at once (killed by it: the power-loss case)', async () => {
    const img = join(dir, `s-${++serial}.qcow2`);
    assert.equal(qSync(['create', '-q', img, String(DISK)]).status, 0);
    const key = randomBytes(16);
    const r = await interruptWrite(img, key, 24 * MiB, ['SIGINT', 'SIGTERM'], { silent: false });
    assert.equal(r.status, null, `killed, not exited: ${r.stderr}`);
    // Killed by the second signal handled; the two may be handled in either order (each can
    // reach a different thread), so either is the one it dies by.
    assert.ok(r.signal === 'SIGTERM' || r.signal === 'SIGINT', `killed by ${r.signal}`);
    assert.doesNotMatch(r.stderr, /durable/, 'no claim of a clean end');
    if (HAVE_QEMU) {
      const chk = qemuCheck(img);
      assert.equal(chk.json?.corruptions ?? 0, 0, chk.stderr.slice(0, 400));
    }
    // The image was left open for writing: the dirty flag makes the next write drop the index.
    const st = stats(img);
    assert.equal(st.dirty, true);
    assert.equal(st.trusted, false);
  });
});
