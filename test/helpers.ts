// Shared test helpers: temporary folders, running bin/qdedup, and the qemu-img/qemu-io
// oracle (tests that need it skip, saying so, when qemu-utils is not installed).

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';

export const ROOT = new URL('..', import.meta.url).pathname;
export const BIN = join(ROOT, 'bin', 'qdedup');

function have(cmd: string): boolean {
  return spawnSync(cmd, ['--version'], { stdio: 'ignore' }).status === 0;
}

/** True when qemu-img and qemu-io are on the PATH. */
export const HAVE_QEMU = have('qemu-img') && have('qemu-io');
/** Pass as `{ skip: NO_QEMU }` to node:test: a reason string when qemu is missing. */
export const NO_QEMU: string | false = HAVE_QEMU ? false : 'qemu-img/qemu-io not installed (apt-get install qemu-utils)';

/** A fresh temporary folder, removed when the process exits. */
export function tempDir(prefix = 'qdedup-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export interface RunResult {
  status: number;
  stdout: string;
  stderr: string;
  stdoutBytes: Buffer;
}

function result(r: SpawnSyncReturns<Buffer>): RunResult {
  return {
    status: r.status ?? -1,
    stdout: r.stdout.toString('utf8'),
    stderr: r.stderr.toString('utf8'),
    stdoutBytes: r.stdout,
  };
}

/** Runs bin/qdedup with `args` (optional stdin) and returns its exit status and output. */
export function qdedup(args: string[], input?: Buffer | string): RunResult {
  return result(spawnSync(process.execPath, [BIN, ...args], { input, maxBuffer: 1 << 30, env: { ...process.env, NO_COLOR: '1' } }));
}

/** Runs a command (qemu-img, qemu-io, …) and returns its exit status and output. */
export function run(cmd: string, args: string[], input?: Buffer | string): RunResult {
  return result(spawnSync(cmd, args, { input, maxBuffer: 1 << 30 }));
}

/** `qemu-img check -f qcow2 --output=json FILE`: exit status and parsed JSON (null if none). */
export function qemuCheck(file: string, repair?: 'leaks' | 'all'): { status: number; json: Record<string, number | string> | null; stderr: string } {
  const args = ['check', '-f', 'qcow2', '--output=json', ...(repair ? ['-r', repair] : []), file];
  const r = run('qemu-img', args);
  let json = null;
  try {
    json = JSON.parse(r.stdout);
  } catch {
    json = null;
  }
  return { status: r.status, json, stderr: r.stderr };
}

/** `qemu-img compare` of a qcow2 image against a raw file: true when identical. */
export function qemuCompareRaw(qcow2: string, raw: string): boolean {
  const r = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, raw]);
  return r.status === 0;
}
