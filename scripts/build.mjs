// Builds dist/: the CLI bundled with esbuild into one CommonJS file, dist/qdedup.cjs, and
// the V8 code cache bin/qdedup starts it with, dist/qdedup.cache. Run by `npm ci`/`npm
// install` (prepare) and `npm run build`.
//
// Why this shape (docs/PERFORMANCE.md, "Start-up"): most of a start was V8 parsing and
// compiling JavaScript, and Node 20 keeps no code cache for ES modules. A classic script
// compiled through node:vm can be given one, so bin/qdedup reads the bundle, compiles it
// with dist/qdedup.cache and runs it: no parse of the code, no compile of the functions the
// cache holds. The cache is made here, by a training run (`info` on a small image, the
// start-up the issue measures), and only here: bin/qdedup never writes one unless
// QDEDUP_CODE_CACHE=write (this script) asks it to. Each subcommand's modules are still run
// only when that command runs: the bundle initialises a module reached through import() on
// first use (esbuild's lazy __esm wrappers), and test/cli/startup.test.ts checks it.
import { build } from 'esbuild';
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

/**
 * Packages replaced in the bundle by lighter stand-ins (./build-shims/: each says why):
 * what they cost at load is paid at every start of every command.
 */
const SHIMS = [
  // yargs, cliui and wrap-ansi: help layout only. Not cli-progress: it require()s the
  // package (CommonJS) and would get this ES module's namespace, not a function ("_stringWidth
  // is not a function" when a bar starts on a terminal); it bundles string-width 4 itself.
  { filter: /^string-width$/, importer: /^(?!.*[\\/]cli-progress[\\/])/, shim: 'string-width.mjs' },
  // yargs' platform shim: two assertion functions.
  { filter: /^assert$/, importer: /[\\/]yargs[\\/]/, shim: 'assert.mjs' },
  // chalk's terminal probe: qdedup sets the colour level itself.
  { filter: /^#supports-color$/, importer: /[\\/]chalk[\\/]/, shim: 'supports-color.mjs' },
];
const lightShims = {
  name: 'light-shims',
  setup(b) {
    for (const { filter, importer, shim } of SHIMS) {
      const path = new URL(`./build-shims/${shim}`, import.meta.url).pathname;
      b.onResolve({ filter }, (args) => (args.importer === path || !importer.test(args.importer) ? undefined : { path }));
    }
  },
};

/**
 * Edits of package sources in the bundle, each to code that does the same later or lazily.
 * The build fails when an edit's text is not found (a new version of the package: look
 * again at what it does at load).
 */
const EDITS = [
  // yargs' platform shim reads process.stdout.columns when it loads: Node makes the stdout
  // stream then, ~3 ms (a file) to ~8 ms (a pipe) of every start. yargs reads the value only
  // to lay out help (src/cli/main.ts gives it the width itself then): a getter.
  {
    file: /[\\/]yargs[\\/]lib[\\/]platform-shims[\\/]esm\.mjs$/,
    from: "stdColumns: typeof process.stdout.columns !== 'undefined' ? process.stdout.columns : null",
    to: "get stdColumns() { return typeof process.stdout.columns !== 'undefined' ? process.stdout.columns : null }",
  },
  // yargs() gives every instance --help and a --version it guesses by reading the first
  // package.json above the shim's main file (in the bundle: above the current directory).
  // src/cli/main.ts sets both itself whenever they can be asked for (and qdedup's version);
  // without them a parse that cannot print is ~3 ms shorter (fewer options in every pass).
  {
    file: /[\\/]yargs[\\/]build[\\/]lib[\\/]yargs-factory\.js$/,
    from: '        yargs.help();\n        yargs.version();\n',
    to: '',
  },
];
const sourceEdits = {
  name: 'source-edits',
  setup(b) {
    b.onLoad({ filter: /\.m?js$/ }, async (args) => {
      const edits = EDITS.filter((e) => e.file.test(args.path));
      if (!edits.length) return undefined;
      let text = await readFile(args.path, 'utf8');
      for (const edit of edits) {
        if (!text.includes(edit.from)) throw new Error(`build: ${args.path} no longer holds: ${edit.from}`);
        text = text.replace(edit.from, edit.to);
      }
      return { contents: text, loader: 'js', resolveDir: dirname(args.path) };
    });
  },
};

const root = new URL('../', import.meta.url).pathname;
const dist = join(root, 'dist');
const bundle = join(dist, 'qdedup.cjs');
rmSync(dist, { recursive: true, force: true }); // no stale bundle or cache from an earlier build

const out = await build({
  entryPoints: [join(root, 'src/cli/main.ts')],
  absWorkingDir: root, // module names in the bundle relative to the checkout, wherever the build runs from
  write: false,
  outfile: bundle,
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  logLevel: 'warning',
  // Smaller to read at every start; identifiers stay readable for internal-error traces.
  minifyWhitespace: true,
  minifySyntax: true,
  // koffi (src/image/libc.ts: fcntl for QEMU's image locks) loads a native .node file
  // from its own folder: it stays in node_modules and is required from there at run time.
  external: ['koffi'],
  plugins: [lightShims, sourceEdits],
  // Strict, as the ES modules it is made of. import.meta.url (package.json, koffi and
  // worker_threads are found from it) is the bundle's own URL.
  banner: { js: "'use strict';const __qdedupUrl=require('node:url').pathToFileURL(__filename).href;" },
  define: { 'import.meta.url': '__qdedupUrl' },
});
const code = out.outputFiles[0].text;
// bin/qdedup compiles the bundle as a script without a dynamic import() callback.
if (/\bimport\(/.test(code)) throw new Error('build: the bundle kept a dynamic import(), which bin/qdedup cannot run');
// The first line names the build: bin/qdedup takes a cache only from the same build. The
// code follows inside Node's CommonJS wrapper, so that bin/qdedup compiles the file's text as
// it is read: wrapping it there made V8 copy the 500 KB into a new string at every start.
const id = createHash('sha256').update(code).digest('hex').slice(0, 16);
mkdirSync(dist, { recursive: true });
writeFileSync(bundle, `// qdedup build ${id}\n(function (exports, require, module, __filename, __dirname) {${code}\n})`);

// The training run: bin/qdedup with QDEDUP_CODE_CACHE=write writes dist/qdedup.cache when
// it exits, holding what V8 compiled for `info`. Without flags from NODE_OPTIONS (V8 refuses
// a cache made under other flags). A failure costs start-up time only: no cache is written.
const env = { ...process.env };
for (const k of ['NODE_OPTIONS', 'QDEDUP_COVERAGE', 'QDEDUP_CODE_CACHE']) delete env[k];
const bin = join(root, 'bin/qdedup');
const tmp = mkdtempSync(join(tmpdir(), 'qdedup-build-'));
try {
  const image = join(tmp, 'train.qcow2');
  const steps = [
    { args: ['create', '-q', image, '64M'], env },
    { args: ['info', image], env: { ...env, QDEDUP_CODE_CACHE: 'write' } },
  ];
  for (const step of steps) {
    const r = spawnSync(process.execPath, [bin, ...step.args], { env: step.env, encoding: 'utf8' });
    if (r.status !== 0) {
      console.warn(`build: no code cache (qdedup ${step.args[0]} failed: ${(r.stderr || r.error || '').toString().trim()})`);
      break;
    }
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
