// The soak tier: runs the reliability test files (fuzzing in process and through
// the CLI, crash points, I/O errors, differential writes and long differential sequences
// against qemu-io) with their sample counts multiplied, one file at a time, and prints the
// figure each file reports.
//
//   npm run soak                      10× the fast tier, once
//   npm run soak -- 3                 3× the fast tier, once
//   npm run soak -- --minutes 30      rounds of 1× on fresh seeds until 30 minutes have passed
//   npm run soak -- 5 --minutes 120   rounds of 5× for two hours
//   npm run soak -- --seed 1234       the seeds of an earlier run (printed at the start)
//   npm run soak -- --only fuzz       only the files whose path contains "fuzz"
//
// Each round takes new seeds (fuzzers: the next range of mutant seeds; differential tests:
// base seed + round); the crash and I/O-error tests are deterministic, so they run in the
// first round only. Every file's full output goes to a log in a folder printed at the
// start; a failing file's failures are printed, with the seeds that reproduce them.

import { spawn, spawnSync } from 'node:child_process';
import { createWriteStream, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;

// ------------------------------------------------------------------ arguments

function usage(message: string): never {
  console.error(`soak: ${message}\nusage: npm run soak -- [SCALE] [--minutes M] [--seed S] [--only PATTERN] [--no-build]`);
  process.exit(2);
}

let scale: number | undefined;
let minutes: number | undefined;
let seed = (Date.now() ^ (process.pid << 16)) >>> 0;
let only: string | undefined;
let build = true;
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  const value = () => argv[++i] ?? usage(`${a} needs a value`);
  if (a === '--minutes') minutes = Number(value());
  else if (a === '--seed') seed = Number(value()) >>> 0;
  else if (a === '--only') only = value();
  else if (a === '--no-build') build = false;
  else if (a === '--scale') scale = Number(value());
  else if (/^\d+(\.\d+)?$/.test(a)) scale = Number(a);
  else usage(`unknown argument '${a}'`);
}
if (minutes !== undefined && !(minutes > 0)) usage('--minutes takes a positive number');
if (scale !== undefined && !(scale > 0)) usage('SCALE must be a positive number');
scale ??= minutes !== undefined ? 1 : 10;

// ------------------------------------------------------------------ the files

interface SoakFile {
  path: string;
  /** Environment for round `round` (1-based). */
  env: (round: number) => Record<string, string>;
  /** Deterministic: run in the first round only. */
  once?: boolean;
}

const ALL_FILES: SoakFile[] = [
  {
    path: 'test/fuzz/fuzz-images.test.ts',
    env: (r) => {
      const n = Math.round(2000 * scale!);
      return { QDEDUP_FUZZ: String(n), QDEDUP_FUZZ_FROM: String(1 + (r - 1) * n + (seed % 1_000_000) * 1000) };
    },
  },
  {
    path: 'test/fuzz/fuzz-cli.test.ts',
    env: (r) => ({ QDEDUP_SOAK_SCALE: String(scale), QDEDUP_FUZZ_CLI_FROM: String(1 + (r - 1) * Math.round(100 * scale!) + (seed % 1_000_000) * 1000) }),
  },
  { path: 'test/image/crash.test.ts', env: () => ({ QDEDUP_SOAK_SCALE: String(scale) }), once: true },
  { path: 'test/image/io-errors.test.ts', env: () => ({ QDEDUP_SOAK_SCALE: String(scale) }), once: true },
  {
    path: 'test/interop/differential-write.test.ts',
    env: (r) => ({
      QDEDUP_SEED: String((seed + r - 1) >>> 0),
      QDEDUP_SEQUENCES: String(Math.round(200 * scale!)),
      QDEDUP_CLI_SEQUENCES: String(Math.round(30 * scale!)),
    }),
  },
  {
    path: 'test/interop/differential-long.test.ts',
    env: (r) => ({ QDEDUP_SEED: String((seed + r - 1) >>> 0), QDEDUP_SOAK_SCALE: String(scale) }),
  },
  {
    path: 'test/interop/mixed-turns.test.ts',
    env: (r) => ({ QDEDUP_SEED: String((seed + r - 1) >>> 0), QDEDUP_SOAK_SCALE: String(scale) }),
  },
];
const FILES = ALL_FILES.filter((f) => only === undefined || f.path.includes(only));
if (FILES.length === 0) usage(`no soak file matches '${only}'`);

/** The figure lines the test files print (each starts with the count it reports). */
const FIGURES: { name: string; re: RegExp }[] = [
  { name: 'differential operations', re: /differential: (\d+) operations, (\d+) mismatches.*/ },
  { name: 'mutants through the CLI', re: /fuzzed images through the CLI: (\d+) mutants.*/ },
  { name: 'mutants in process', re: /fuzzed images: (\d+) in .*/ },
  { name: 'dedup mutants in process', re: /fuzzed dedup images: (\d+) in .*/ },
  { name: 'compressed dedup mutants in process', re: /fuzzed compressed dedup images: (\d+) in .*/ },
  { name: 'mixed-turn sequences', re: /mixed turns: (\d+) sequences.*/ },
  { name: 'crash states', re: /crash states verified: (\d+).*/ },
  { name: 'I/O error cases', re: /I\/O error cases verified: (\d+).*/ },
];

// ------------------------------------------------------------------ running

interface FileResult {
  ok: boolean;
  secs: number;
  figures: string[];
  tests: string;
  failures: string[];
}

const logDir = mkdtempSync(join(tmpdir(), 'qdedup-soak-'));
const totals = new Map<string, number>();

function runFile(f: SoakFile, round: number): Promise<FileResult> {
  return new Promise((resolve) => {
    const started = Date.now();
    const log = createWriteStream(join(logDir, `round${round}-${f.path.split('/').pop()!.replace('.test.ts', '')}.log`));
    const child = spawn(process.execPath, ['--import', 'tsx', '--test', '--test-concurrency=2', f.path], {
      cwd: root,
      env: { ...process.env, ...f.env(round) },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let text = '';
    const take = (d: Buffer) => {
      text += d.toString('utf8');
      log.write(d);
    };
    child.stdout.on('data', take);
    child.stderr.on('data', take);
    child.on('close', (code) => {
      log.end();
      const figures: string[] = [];
      for (const line of text.split('\n')) {
        for (const fig of FIGURES) {
          const m = fig.re.exec(line);
          if (!m) continue;
          figures.push(m[0]);
          totals.set(fig.name, (totals.get(fig.name) ?? 0) + Number(m[1]));
          if (fig.name === 'differential operations') totals.set('differential mismatches', (totals.get('differential mismatches') ?? 0) + Number(m[2]));
        }
      }
      const count = (k: string) => new RegExp(`^# ${k} (\\d+)$`, 'm').exec(text)?.[1] ?? '?';
      const failures = text
        .split('\n')
        .filter((l) => /^\s*not ok |FAIL |reproduce|QDEDUP_[A-Z_]*SEED=/.test(l))
        .slice(0, 40);
      resolve({
        ok: code === 0,
        secs: (Date.now() - started) / 1000,
        figures,
        tests: `${count('pass')} passed, ${count('fail')} failed`,
        failures: code === 0 ? [] : failures,
      });
    });
  });
}

if (build) {
  const b = spawnSync(process.execPath, ['scripts/build.mjs'], { cwd: root, stdio: 'inherit' });
  if (b.status !== 0) process.exit(b.status ?? 1);
}

const deadline = minutes !== undefined ? Date.now() + minutes * 60_000 : undefined;
console.log(`soak: scale ${scale}, seed ${seed}${minutes !== undefined ? `, ${minutes} minutes` : ', one round'}; logs in ${logDir}`);
const soakStarted = Date.now();
let failed = 0;
for (let round = 1; ; round++) {
  const files = FILES.filter((f) => round === 1 || !f.once);
  if (round > 1 && (deadline === undefined || Date.now() >= deadline || files.length === 0)) break;
  console.log(`\n== round ${round}`);
  for (const f of files) {
    if (round > 1 && Date.now() >= deadline!) break;
    const r = await runFile(f, round);
    console.log(`${r.ok ? 'PASS' : 'FAIL'} ${f.path} (${r.secs.toFixed(1)} s; ${r.tests})`);
    for (const fig of r.figures) console.log(`     ${fig}`);
    if (!r.ok) {
      failed++;
      for (const l of r.failures) console.log(`     | ${l.trim()}`);
      console.log(`     | full output: ${logDir}`);
    }
  }
  if (deadline === undefined) break;
}

console.log(`\nsoak: ${((Date.now() - soakStarted) / 60_000).toFixed(1)} minutes, ${failed} failing file run(s); seed ${seed}, scale ${scale}`);
for (const [k, v] of totals) console.log(`  ${k}: ${v}`);
process.exit(failed ? 1 : 0);
