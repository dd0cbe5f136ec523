// `npm run coverage [-- PATTERN…]`: line, branch and function coverage of src/ over the
// whole test suite (or the test files whose path contains a PATTERN), including the tests
// that spawn bin/qdedup. Exits non-zero when a test fails.
//
// How: every src/*.ts file is compiled once, file by file, with esbuild and inline source
// maps into node_modules/.cache/qdedup-coverage/src/*.js. The test processes load those
// files instead of the TypeScript (a resolve hook redirects src/ imports to them), and
// bin/qdedup loads them too when QDEDUP_COVERAGE is set (no TypeScript loader in the child:
// the CLI starts almost as fast as the bundle). So every process runs the same scripts
// under the same URLs, V8 counts of the test runner and of every CLI child merge exactly
// (NODE_V8_COVERAGE), and c8 maps them back to src/ through the source maps.
// Node 20's own --experimental-test-coverage is not used: it follows no child process
// that does not run the test runner, and fails on them ("reading 'startOffset'").
//
// Prints a table per src/ file and the total; the full report (uncovered lines) is in
// coverage/index.html.

import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { pathToFileURL } from 'node:url';
import { transformSync } from 'esbuild';

const root = new URL('..', import.meta.url).pathname.replace(/\/$/, '');
const SRC = join(root, 'src');
const CACHE = join(root, 'node_modules', '.cache', 'qdedup-coverage'); // bin/qdedup knows this path
const REPORT = join(root, 'coverage');

function list(dir: string, suffix: string): string[] {
  return readdirSync(dir)
    .sort()
    .flatMap((name) => {
      const path = join(dir, name);
      if (statSync(path).isDirectory()) return list(path, suffix);
      return name.endsWith(suffix) ? [path] : [];
    });
}

// 1. The test files.
const patterns = process.argv.slice(2);
const tests = list(join(root, 'test'), '.test.ts')
  .map((f) => relative(root, f))
  .filter((f) => patterns.length === 0 || patterns.some((p) => f.includes(p)));
if (tests.length === 0) {
  console.error('coverage: no test files found' + (patterns.length ? ` matching ${patterns.join(', ')}` : ''));
  process.exit(1);
}

// 2. src/ compiled file by file. Relative imports keep their length ('./x.ts' becomes
// './x.js'), so the source maps stay valid. The package.json copy gives the compiled
// main.ts its version (it looks two folders up) and "type": "module".
const started = Date.now();
rmSync(CACHE, { recursive: true, force: true });
const tsconfig = JSON.parse(readFileSync(join(root, 'tsconfig.json'), 'utf8'));
const sources = list(SRC, '.ts');
for (const file of sources) {
  const { code } = transformSync(readFileSync(file, 'utf8'), {
    loader: 'ts',
    format: 'esm',
    target: `node${process.versions.node}`,
    sourcemap: 'inline',
    sourcefile: file,
    tsconfigRaw: { compilerOptions: tsconfig.compilerOptions },
  });
  const out = join(CACHE, relative(root, file)).replace(/\.ts$/, '.js');
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, code.replace(/(\b(?:from|import)\s*\(?\s*")(\.{1,2}\/[^"\n]*)\.ts"/g, '$1$2.js"'));
}
copyFileSync(join(root, 'package.json'), join(CACHE, 'package.json'));
const srcUrl = pathToFileURL(SRC + '/').href;
const cacheUrl = pathToFileURL(join(CACHE, 'src') + '/').href;
// Hooks for the test processes (after tsx's, so they run first): src/ → the compiled copy.
writeFileSync(
  join(CACHE, 'hooks.mjs'),
  `import { existsSync, readFileSync } from 'node:fs';
const SRC = ${JSON.stringify(srcUrl)}, OUT = ${JSON.stringify(cacheUrl)};
export async function resolve(specifier, context, next) {
  const r = await next(specifier, context);
  if (r.url.startsWith(SRC) && r.url.endsWith('.ts')) {
    const url = OUT + r.url.slice(SRC.length, -3) + '.js';
    if (existsSync(new URL(url))) return { url, format: 'module', shortCircuit: true };
  }
  return r;
}
export async function load(url, context, next) {
  if (url.startsWith(OUT)) return { format: 'module', source: readFileSync(new URL(url)), shortCircuit: true };
  return next(url, context);
}
`,
);
writeFileSync(join(CACHE, 'register.mjs'), "import { register } from 'node:module';\nregister('./hooks.mjs', import.meta.url);\n");

// 3. The tests, with raw V8 coverage from every process.
const raw = mkdtempSync(join(tmpdir(), 'qdedup-v8-'));
process.on('exit', () => {
  rmSync(raw, { recursive: true, force: true });
  rmSync(CACHE, { recursive: true, force: true });
});
const run = spawnSync(
  process.execPath,
  ['--import', 'tsx', '--import', pathToFileURL(join(CACHE, 'register.mjs')).href, '--test', '--test-concurrency=2', ...tests],
  {
    cwd: root,
    stdio: 'inherit',
    env: { ...process.env, NODE_V8_COVERAGE: raw, QDEDUP_COVERAGE: '1' },
  },
);
const testsDone = Date.now();

// 4. Only the compiled src/ scripts are kept (the rest is node_modules, tests and tsx), then
// c8 maps them to src/ and writes coverage/.
const kept = join(raw, 'src');
mkdirSync(kept);
let processes = 0;
for (const name of readdirSync(raw)) {
  if (!name.endsWith('.json')) continue;
  const cov = JSON.parse(readFileSync(join(raw, name), 'utf8'));
  const result = cov.result.filter((s: { url: string }) => s.url.startsWith(cacheUrl));
  if (result.length === 0) continue;
  const maps = Object.fromEntries(Object.entries(cov['source-map-cache'] ?? {}).filter(([url]) => url.startsWith(cacheUrl)));
  writeFileSync(join(kept, name), JSON.stringify({ result, 'source-map-cache': maps }));
  processes++;
}
rmSync(REPORT, { recursive: true, force: true });
const c8 = spawnSync(
  process.execPath,
  [
    join(root, 'node_modules', 'c8', 'bin', 'c8.js'),
    'report',
    '--temp-directory',
    kept,
    '--reports-dir',
    REPORT,
    '--reporter',
    'json-summary',
    '--reporter',
    'html',
    '--exclude-after-remap',
    '--include',
    'src/**',
  ],
  { cwd: root, stdio: 'inherit' },
);
const summaryFile = join(REPORT, 'coverage-summary.json');
if (c8.status !== 0 || !existsSync(summaryFile)) {
  console.error('coverage: c8 report failed');
  process.exit(1);
}

// 5. The table.
interface Metric {
  total: number;
  covered: number;
  pct: number | string;
}
type Summary = Record<string, { lines: Metric; branches: Metric; functions: Metric }>;
const summary: Summary = JSON.parse(readFileSync(summaryFile, 'utf8'));
const cell = (m: Metric) => `${(m.total ? (100 * m.covered) / m.total : 100).toFixed(1).padStart(5)} % ${`${m.covered}/${m.total}`.padStart(9)}`;
const files = Object.keys(summary)
  .filter((k) => k !== 'total')
  .sort();
const width = Math.max(...files.map((f) => relative(root, f).length), 5);
console.log(`\ncoverage of src/ (${tests.length} test files, ${processes} processes with src/ code):`);
console.log(`${'file'.padEnd(width)}  ${'lines'.padEnd(17)}  ${'branches'.padEnd(17)}  functions`);
for (const f of files) {
  const s = summary[f];
  console.log(`${relative(root, f).padEnd(width)}  ${cell(s.lines)}  ${cell(s.branches)}  ${cell(s.functions)}`);
}
const t = summary.total;
console.log(`${'total'.padEnd(width)}  ${cell(t.lines)}  ${cell(t.branches)}  ${cell(t.functions)}`);
const unloaded = sources.filter((f) => !files.includes(f)).map((f) => relative(root, f));
if (unloaded.length) console.log(`not loaded by any test (not counted): ${unloaded.join(', ')}`);
const seconds = (from: number, to: number) => `${((to - from) / 1000).toFixed(0)} s`;
console.log(`branch coverage of src/: ${cell(t.branches).trim()} branches`);
console.log(`(tests ${seconds(started, testsDone)}, report ${seconds(testsDone, Date.now())}; uncovered lines and branches: coverage/index.html)`);
if (run.status !== 0) console.error(`coverage: the tests failed (exit ${run.status ?? run.signal})`);
process.exit(run.status ?? 1);
