// Malformed images through the real command line: mutants built by
// fuzz-lib.ts's mutators, from its bases plus two dedup images made by bin/qdedup, go
// through bin/qdedup, two commands each (a node start-up costs ~0.25 s): one read-only
// command, in turn `check`, `read`, `info` (and `dedup-stats` / `journal-dump` when
// `qdedup --help` lists them), then, on a copy, one that may write: `write` or
// `check -r all`. Every run must
//   - end within RUN_TIMEOUT_MS,
//   - print no stack trace (no line starting with "    at ") and no internal error,
//   - exit with a documented code (info/read/write: 0 or 1; check: 0, 1, 2, 3 or 63),
//   - when it fails, say why on stderr in one line starting "qdedup: " (check may list
//     problems first, one per line; its last line then gives the verdict),
//   - leave the file byte for byte unchanged (sha256) unless it is `write` or `check -r`.
// When `qemu-img check` finds no corruption in the mutant (leaks allowed: dedup metadata
// counts as leaked for QEMU), a successful `write` must read back through qemu-io and
// `qemu-img check` must still find no corruption; when `check -r all` exits 0,
// `qemu-img check` must not find corruption either.
//
//   npm test -- fuzz-cli                           100 mutants (seeds 1…100)
//   QDEDUP_SOAK_SCALE=10 npm test -- fuzz-cli      1,000 mutants (npm run soak -- 10)
//   QDEDUP_FUZZ_CLI_FROM=5000 …                    other seeds
//   QDEDUP_FUZZ_CLI_SEED=42 npm test -- fuzz-cli   one mutant, printing every command
//
// A failing mutant is saved as fixtures/fuzz-regressions/seed-<N>.qcow2 (with a .txt
// saying what failed); every .qcow2 in that folder is run through the same checks first.

import { before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { BIN, HAVE_QEMU } from '../helpers.ts';
import { pool } from '../interop/differential-lib.ts';
import { type Base, FIXTURES, loadBases, makeMutant, type mapImage } from './fuzz-lib.ts';

const SCALE = Math.max(0, Number(process.env.QDEDUP_SOAK_SCALE ?? 1));
const COUNT = Math.round(100 * SCALE);
const FROM = Number(process.env.QDEDUP_FUZZ_CLI_FROM ?? 1);
const ONE = process.env.QDEDUP_FUZZ_CLI_SEED !== undefined ? Number(process.env.QDEDUP_FUZZ_CLI_SEED) : undefined;
/** A command that has not ended after this long counts as a hang (and is killed). */
const RUN_TIMEOUT_MS = Number(process.env.QDEDUP_FUZZ_CLI_TIMEOUT_MS ?? 20_000);
/** Mutants in flight at once (each runs its commands one after another): 2 cores. */
const CONCURRENCY = 2;
const REGRESSIONS = join(FIXTURES, 'fuzz-regressions');

/** Exit codes each command may return (README, "Exit codes"). */
const EXIT_CODES: Record<string, number[]> = {
  info: [0, 1],
  read: [0, 1],
  write: [0, 1],
  'dedup-stats': [0, 1],
  'journal-dump': [0, 1],
  check: [0, 1, 2, 3, 63],
  map: [0, 1],
  estimate: [0, 1],
  convert: [0, 1],
  dedup: [0, 1],
};

/** Mutants run through the commands that take in existing images (map, estimate, convert, dedup). */
const IMPORT_COUNT = Math.round(40 * SCALE);

// ------------------------------------------------------------------ running commands

interface Run {
  args: string[];
  status: number | null;
  signal: string | null;
  timedOut: boolean;
  ms: number;
  stdout: string;
  stderr: string;
}

/** Runs a command with a time bound (SIGKILL after `timeoutMs`). */
function runBounded(cmd: string, args: string[], timeoutMs: number): Promise<Run> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1' } });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outBytes = 0;
    child.stdout.on('data', (d: Buffer) => {
      if (outBytes < 1 << 20) out.push(d);
      outBytes += d.length;
    });
    child.stderr.on('data', (d: Buffer) => err.push(d));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      resolve({
        args,
        status,
        signal,
        timedOut,
        ms: Date.now() - started,
        stdout: Buffer.concat(out).toString('latin1'),
        stderr: Buffer.concat(err).toString('utf8'),
      });
    });
  });
}

const qdedup = async (args: string[]): Promise<Run> => ({ ...(await runBounded(process.execPath, [BIN, ...args], RUN_TIMEOUT_MS)), args });

function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/** The subcommands `qdedup --help` lists (dedup-stats and journal-dump are being added). */
function listedCommands(): Set<string> {
  const help = spawnSync(process.execPath, [BIN, '--help'], { encoding: 'utf8' }).stdout ?? '';
  return new Set([...help.matchAll(/^\s+qdedup ([a-z][a-z-]*)/gm)].map((m) => m[1]));
}

// ------------------------------------------------------------------ the checks

/** What is wrong with one run (empty when it behaved). */
function judge(run: Run, command: string, fileBefore: string | null, fileAfter: string | null): string[] {
  const bad: string[] = [];
  const cmd = `qdedup ${run.args.join(' ')}`;
  if (run.timedOut) bad.push(`${cmd}: no end within ${RUN_TIMEOUT_MS} ms (killed)`);
  else if (run.signal) bad.push(`${cmd}: killed by ${run.signal}`);
  const all = run.stderr + '\n' + (command === 'read' ? '' : run.stdout);
  if (/^ {4}at /m.test(all)) bad.push(`${cmd}: stack trace: ${firstLines(run.stderr, 6)}`);
  // qemu-img check's own summary line "N internal errors have occurred during the check." (its check_errors) is not one.
  const ours = all.replace(/^\d+ internal errors have occurred during the check\.$/m, '');
  if (/internal error|EINTERNAL|unhandledRejection|uncaught|\bundefined\b|\bNaN\b|\[object Object\]/i.test(ours))
    bad.push(`${cmd}: suspicious text: ${firstLines(all, 4)}`);
  if (!run.timedOut && run.status !== null && !EXIT_CODES[command].includes(run.status))
    bad.push(`${cmd}: exit code ${run.status} (allowed: ${EXIT_CODES[command].join(', ')}): ${firstLines(run.stderr, 3)}`);
  if (!run.timedOut && run.status !== 0) {
    const lines = run.stderr.split('\n').filter((l) => l.trim() !== '');
    if (lines.length === 0) bad.push(`${cmd}: exit ${run.status} with nothing on stderr`);
    else if (command === 'check') {
      if ((run.status === 1 || run.status === 63) && !lines[lines.length - 1].startsWith('qdedup: '))
        bad.push(`${cmd}: exit ${run.status}, last stderr line is not a qdedup: error: ${firstLines(run.stderr, 3)}`);
    } else if (lines.length !== 1 || !lines[0].startsWith('qdedup: ')) {
      // read -P's own failure has two lines (the verdict and the first differing byte); not used here.
      bad.push(`${cmd}: exit ${run.status}, stderr is not one "qdedup: …" line: ${firstLines(run.stderr, 4)}`);
    }
  }
  if (fileBefore !== null && fileAfter !== null && fileBefore !== fileAfter)
    bad.push(`${cmd}: changed the file (sha256 ${fileBefore.slice(0, 12)} → ${fileAfter.slice(0, 12)})`);
  return bad;
}

function firstLines(s: string, n: number): string {
  return JSON.stringify(s.split('\n').slice(0, n).join('\n').slice(0, 600));
}

/** The virtual size field of a (mutated) header, or null when there is none. */
function headerSize(bytes: Buffer): bigint | null {
  return bytes.length >= 32 ? bytes.readBigUInt64BE(24) : null;
}

// ------------------------------------------------------------------ one image

interface ImageOutcome {
  failures: string[];
  commands: string[];
  checkStatus: number | null;
  /** The slowest run (ms and command line). */
  slowest: { ms: number; what: string };
}

/**
 * Runs the commands on one image file (in `dir`, next to copies of the fixtures so that
 * backing names resolve). `pick` chooses the read-only and the writing command.
 */
async function fuzzImage(dir: string, name: string, bytes: Buffer, pick: number, readOnly: string[], verbose: boolean): Promise<ImageOutcome> {
  const file = join(dir, `${name}.qcow2`);
  writeFileSync(file, bytes);
  const failures: string[] = [];
  const commands: string[] = [];
  const slowest = { ms: 0, what: '' };
  const note = (r: Run) => {
    if (r.ms > slowest.ms) Object.assign(slowest, { ms: r.ms, what: r.args.map((x) => (x.includes('/') ? basename(x) : x)).join(' ') });
    const line = `qdedup ${r.args.join(' ')} -> ${r.timedOut ? 'timeout' : r.status} (${r.ms} ms)${r.stderr.trim() ? ': ' + r.stderr.trim().split('\n').slice(-1)[0].slice(0, 200) : ''}`;
    commands.push(line);
    if (verbose) console.log(`  ${line}`);
  };
  const readOnlyRun = async (command: string, args: string[]): Promise<Run> => {
    const before = sha256(file);
    const r = await qdedup(args);
    note(r);
    failures.push(...judge(r, command, before, sha256(file)));
    return r;
  };

  // 1. Is the mutant free of corruption? (qemu-img check: no node start-up to pay; leaks are fine.)
  const pre = HAVE_QEMU ? (await runBounded('qemu-img', ['check', '-q', '-f', 'qcow2', file], RUN_TIMEOUT_MS)).status : null;
  const clean = pre === 0 || pre === 3;

  // 2. One read-only command.
  const ro = readOnly[pick % readOnly.length];
  let checkStatus: number | null = null;
  if (ro === 'read') {
    const size = headerSize(bytes);
    const whole = size !== null && size <= 4n << 20n;
    await readOnlyRun('read', whole ? ['read', file] : ['read', file, '0', String(size !== null && size < 1n << 20n ? size : 1n << 20n)]);
  } else if (ro === 'info') {
    await readOnlyRun('info', ['info', ...(pick % 4 === 0 ? ['--output', 'json'] : []), file]);
  } else if (ro === 'check') {
    checkStatus = (await readOnlyRun('check', ['check', ...(pick % 3 === 0 ? ['--output', 'json'] : []), file])).status;
  } else {
    await readOnlyRun(ro, [ro, file]);
  }

  // 3. One command that may write, on a copy.
  const copy = join(dir, `${name}-w.qcow2`);
  copyFileSync(file, copy);
  if (Math.floor(pick / readOnly.length) % 2 === 0) {
    const size = headerSize(bytes) ?? 0n;
    const at = size > 8192n ? (BigInt(pick * 7919) % (size - 4096n)) & ~511n : 0n;
    const r = await qdedup(['write', '-P', '0x5a', copy, String(at), '4096']);
    note(r);
    failures.push(...judge(r, 'write', null, null));
    if (clean && r.status === 0 && HAVE_QEMU) {
      // An image without corruption took the write: qemu reads it back and finds no corruption.
      const io = await runBounded('qemu-io', ['-r', '-f', 'qcow2', '-c', `read -q -P 0x5a ${at} 4096`, copy], RUN_TIMEOUT_MS);
      if (io.status !== 0 || (io.stdout + io.stderr).trim())
        failures.push(
          `after qdedup write on an image without corruption, qemu-io read -P 0x5a ${at} 4096: ${io.status} ${firstLines(io.stdout + io.stderr, 3)}`,
        );
      const qc = await runBounded('qemu-img', ['check', '-f', 'qcow2', copy], RUN_TIMEOUT_MS);
      // Leaks are allowed: qemu-io leaks the same clusters on a file truncated inside a cluster (seed 92).
      if (qc.status !== 0 && qc.status !== 3)
        failures.push(`after qdedup write on an image without corruption, qemu-img check exits ${qc.status}: ${firstLines(qc.stdout + qc.stderr, 4)}`);
    }
  } else {
    const r = await qdedup(['check', '-r', 'all', copy]);
    note(r);
    failures.push(...judge(r, 'check', null, null));
    if (r.status === 0 && HAVE_QEMU) {
      const qc = await runBounded('qemu-img', ['check', '-f', 'qcow2', copy], RUN_TIMEOUT_MS);
      if (qc.status === 2 || /ERROR/.test(qc.stdout + qc.stderr))
        failures.push(`qdedup check -r all exited 0 but qemu-img check exits ${qc.status}: ${firstLines(qc.stdout + qc.stderr, 4)}`);
    }
  }
  rmSync(copy, { force: true });
  rmSync(file, { force: true });
  return { failures, commands, checkStatus, slowest };
}

/**
 * One mutant through the commands that take in existing images: `map` or `estimate`
 * (read-only: the file unchanged), then `convert` of it, compressed or not (the source
 * unchanged; a target made must pass qemu-img check and hold the source's guest data) or `dedup` of a copy (on a
 * mutant qemu-img finds clean, a success must keep the guest data and the image clean).
 */
async function fuzzImportCommands(dir: string, name: string, bytes: Buffer, pick: number): Promise<ImageOutcome> {
  const file = join(dir, `${name}.qcow2`);
  writeFileSync(file, bytes);
  const failures: string[] = [];
  const commands: string[] = [];
  const slowest = { ms: 0, what: '' };
  const run = async (command: string, args: string[], watch: string | null): Promise<Run> => {
    const before = watch ? sha256(watch) : null;
    const r = await qdedup(args);
    commands.push(`qdedup ${r.args.join(' ')} -> ${r.timedOut ? 'timeout' : r.status} (${r.ms} ms)`);
    if (r.ms > slowest.ms) Object.assign(slowest, { ms: r.ms, what: `${command} ${name}` });
    failures.push(...judge(r, command, before, watch ? sha256(watch) : null));
    return r;
  };
  const pre = HAVE_QEMU ? (await runBounded('qemu-img', ['check', '-q', '-f', 'qcow2', file], RUN_TIMEOUT_MS)).status : null;
  const clean = pre === 0 || pre === 3;
  if (pick % 2 === 0) await run('map', ['map', ...(pick % 4 === 0 ? ['--output', 'json'] : []), file], file);
  else await run('estimate', ['estimate', '-q', file], file);
  const compare = async (a: string, b: string, what: string) => {
    const c = await runBounded('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', a, b], RUN_TIMEOUT_MS);
    if (c.status !== 0) failures.push(`${what}: qemu-img compare exits ${c.status}: ${firstLines(c.stdout + c.stderr, 3)}`);
  };
  const qemuClean = async (path: string, what: string) => {
    const qc = await runBounded('qemu-img', ['check', '-f', 'qcow2', path], RUN_TIMEOUT_MS);
    if (qc.status !== 0 && qc.status !== 3) failures.push(`${what}: qemu-img check exits ${qc.status}: ${firstLines(qc.stdout + qc.stderr, 4)}`);
  };
  if (Math.floor(pick / 2) % 2 === 0) {
    const out = join(dir, `${name}-converted.qcow2`);
    // Every other convert compresses (-c), into a dedup or a plain target: the same checks hold.
    const compress = Math.floor(pick / 4) % 2 === 1 ? ['-c', ...(Math.floor(pick / 8) % 2 ? ['-o', 'dedup=off'] : [])] : [];
    const r = await run('convert', ['convert', ...compress, '-f', 'qcow2', file, out], file);
    if (r.status === 0 && HAVE_QEMU) {
      await qemuClean(out, 'the image convert made');
      if (clean) await compare(file, out, 'convert of an image without corruption');
    }
    rmSync(out, { force: true });
  } else {
    const copy = join(dir, `${name}-d.qcow2`);
    const original = join(dir, `${name}-o.qcow2`);
    copyFileSync(file, copy);
    copyFileSync(file, original);
    const r = await run('dedup', ['dedup', '-q', copy], null);
    if (r.status === 0 && clean && HAVE_QEMU) {
      await qemuClean(copy, 'after qdedup dedup of an image without corruption');
      await compare(original, copy, 'dedup of an image without corruption');
    }
    rmSync(copy, { force: true });
    rmSync(original, { force: true });
  }
  rmSync(file, { force: true });
  return { failures, commands, checkStatus: null, slowest };
}

/** The report of a failing mutant; the mutant is kept as a regression fixture (REGRESSIONS/`name`.qcow2, with the report beside it). */
function keepFailure(name: string, title: string, m: ReturnType<typeof makeMutant>, out: ImageOutcome): string {
  const text = [title, ...m.steps.map((s) => `  mutation: ${s}`), ...out.commands.map((c) => `  ran: ${c}`), ...out.failures.map((f) => `  FAIL ${f}`)].join(
    '\n',
  );
  mkdirSync(REGRESSIONS, { recursive: true });
  writeFileSync(join(REGRESSIONS, `${name}.qcow2`), m.bytes);
  writeFileSync(join(REGRESSIONS, `${name}.txt`), `${text}\n`);
  return text;
}

/** A folder holding copies of the fixtures (backing files resolve by relative name). */
function workDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'qdedup-fuzzcli-'));
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  for (const f of readdirSync(FIXTURES)) {
    const p = join(FIXTURES, f);
    if (statSync(p).isFile() && (f.endsWith('.qcow2') || f.endsWith('.raw'))) copyFileSync(p, join(dir, f));
  }
  return dir;
}

/**
 * Dedup images made through bin/qdedup (fuzz-lib's bases are plain QCOW2): duplicate
 * clusters, an overwrite (journal deletions) and zeroes, so that dedup-stats and
 * journal-dump meet journals, log stores and the holder snapshot. Empty when the CLI
 * has no dedup yet.
 */
async function dedupBases(): Promise<Base[]> {
  if (!/^\s*dedup=/m.test(spawnSync(process.execPath, [BIN, 'create', '-o', 'help'], { encoding: 'utf8' }).stdout ?? '')) return [];
  const dir = mkdtempSync(join(tmpdir(), 'qdedup-fuzzcli-base-'));
  try {
    const data = join(dir, 'data.bin');
    writeFileSync(data, Buffer.from(Array.from({ length: 24576 }, (_, i) => (i * 131 + (i >> 12) * 7) & 0xff)));
    const make = async (name: string, o: string): Promise<Base> => {
      const p = join(dir, `${name}.qcow2`);
      for (const args of [
        ['create', '-q', '-o', o, p, '1M'],
        ['write', '-q', '-P', '0x11', p, '0', '64k'],
        ['write', '-q', '-i', data, p, '128k'],
        ['write', '-q', '-i', data, p, '300k'],
        ['write', '-q', '-P', '0x22', p, '4k', '8k'],
        ['write', '-q', '-z', p, '512k', '16k'],
      ]) {
        const r = await runBounded(process.execPath, [BIN, ...args], 120_000);
        if (r.status !== 0) throw new Error(`qdedup ${args.join(' ')}: ${r.status} ${r.stderr}`);
      }
      return { name, bytes: readFileSync(p), path: p };
    };
    // The two side by side (one process each at a time: the 2 cores).
    return await Promise.all([
      make('cli-dedup-sha256-4k', 'cluster_size=4k,dedup=sha256,dedup_journal_block=512'),
      make('cli-dedup-blake3-4k', 'cluster_size=4k,dedup=blake3'),
    ]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------ the tests

let bases: Base[];
const layouts = new Map<Base, ReturnType<typeof mapImage>>();
let readOnly: string[];

describe('malformed images through bin/qdedup', () => {
  before(async () => {
    // fuzz-lib's bases, plus the dedup images three times each (about a quarter of the mutants).
    const dedup = await dedupBases();
    bases = [...(await loadBases()), ...dedup, ...dedup, ...dedup];
    const listed = listedCommands();
    readOnly = ['check', 'read', 'info', ...['dedup-stats', 'journal-dump'].filter((c) => listed.has(c))];
  });

  const regressionFiles = existsSync(REGRESSIONS)
    ? readdirSync(REGRESSIONS)
        .filter((f) => f.endsWith('.qcow2'))
        .sort()
    : [];
  it(`regressions: every image in fixtures/fuzz-regressions (${regressionFiles.length}) through every command`, { skip: ONE !== undefined }, async () => {
    const dir = workDir();
    const failed: string[] = [];
    for (const f of regressionFiles) {
      const bytes = readFileSync(join(REGRESSIONS, f));
      // Every combination of read-only and writing command (pick 0 … 2·readOnly − 1).
      for (let pick = 0; pick < 2 * readOnly.length; pick++) {
        const out = await fuzzImage(dir, `reg-${basename(f, '.qcow2')}-${pick}`, bytes, pick, readOnly, false);
        if (out.failures.length) failed.push(`${f}:\n${[...out.commands.map((c) => `  ran: ${c}`), ...out.failures.map((x) => `  FAIL ${x}`)].join('\n')}`);
      }
    }
    assert.equal(failed.length, 0, failed.join('\n'));
  });

  it(ONE !== undefined ? `mutant seed ${ONE} through bin/qdedup` : `${COUNT} mutants (seeds ${FROM}…${FROM + COUNT - 1}) through bin/qdedup`, async () => {
    const dir = workDir();
    const seeds = ONE !== undefined ? [ONE] : Array.from({ length: COUNT }, (_, i) => FROM + i);
    const started = Date.now();
    const statuses = new Map<number, number>();
    let runs = 0;
    let slowest = { ms: 0, what: '' };
    const failed: string[] = [];
    await pool(
      CONCURRENCY,
      seeds.map((seed) => async () => {
        const m = makeMutant(seed, bases, layouts);
        if (ONE !== undefined) console.log([`seed ${seed} (base ${m.base.name})`, ...m.steps.map((s) => `  mutation: ${s}`)].join('\n'));
        const out = await fuzzImage(dir, `mutant-${seed}`, m.bytes, seed, readOnly, ONE !== undefined);
        runs += out.commands.length;
        if (out.slowest.ms > slowest.ms) slowest = { ms: out.slowest.ms, what: `seed ${seed}: ${out.slowest.what}` };
        if (out.checkStatus !== null) statuses.set(out.checkStatus, (statuses.get(out.checkStatus) ?? 0) + 1);
        if (out.failures.length === 0) return;
        failed.push(
          keepFailure(
            `seed-${seed}`,
            `seed ${seed} (base ${m.base.name}; reproduce: QDEDUP_FUZZ_CLI_SEED=${seed} node --import tsx --test test/fuzz/fuzz-cli.test.ts)`,
            m,
            out,
          ),
        );
      }),
    );
    const secs = ((Date.now() - started) / 1000).toFixed(1);
    const verdicts = [...statuses]
      .sort((a, b) => a[0] - b[0])
      .map(([k, v]) => `exit ${k}: ${v}`)
      .join(', ');
    console.log(
      `fuzzed images through the CLI: ${seeds.length} mutants, ${runs} runs of ${[...readOnly, 'write', 'check -r all'].join('/')}, ${failed.length} failing, ${secs} s (${verdicts ? `qdedup check ${verdicts}; ` : ''}slowest run ${slowest.ms} ms, ${slowest.what})`,
    );
    assert.equal(failed.length, 0, `${failed.length} failing mutants (saved under fixtures/fuzz-regressions/):\n${failed.join('\n')}`);
  });

  it(`${IMPORT_COUNT} mutants through map/estimate and convert/dedup`, { skip: ONE !== undefined || !listedCommands().has('dedup') }, async () => {
    const dir = workDir();
    const started = Date.now();
    const failed: string[] = [];
    let runs = 0;
    await pool(
      CONCURRENCY,
      Array.from({ length: IMPORT_COUNT }, (_, i) => FROM + 100_000 + i).map((seed) => async () => {
        const m = makeMutant(seed, bases, layouts);
        const out = await fuzzImportCommands(dir, `import-${seed}`, m.bytes, seed);
        runs += out.commands.length;
        if (out.failures.length === 0) return;
        failed.push(keepFailure(`import-seed-${seed}`, `seed ${seed} (base ${m.base.name})`, m, out));
      }),
    );
    console.log(
      `fuzzed images through map/estimate/convert/dedup: ${IMPORT_COUNT} mutants, ${runs} runs, ${failed.length} failing, ${((Date.now() - started) / 1000).toFixed(1)} s`,
    );
    assert.equal(failed.length, 0, failed.join('\n'));
  });
});
