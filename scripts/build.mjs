// Builds dist/: the CLI bundled with esbuild into ES modules — dist/qdedup.mjs (the
// dispatcher: yargs, errors, output) and one chunk per subcommand, plus chunks they share
// (dist/chunks/), loaded by `await import()` only when that subcommand runs. So bin/qdedup
// neither resolves and compiles ~60 separate modules nor parses the code of commands it
// does not run (see docs/PERFORMANCE.md). Run by `npm ci`/`npm install` (prepare) and
// `npm run build`.
import { build } from 'esbuild';
import { rmSync } from 'node:fs';

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

const dist = new URL('../dist/', import.meta.url).pathname;
rmSync(dist, { recursive: true, force: true }); // no stale chunks from an earlier build

await build({
  entryPoints: { qdedup: new URL('../src/cli/main.ts', import.meta.url).pathname },
  outdir: dist,
  outExtension: { '.js': '.mjs' },
  chunkNames: 'chunks/[name]-[hash]',
  bundle: true,
  splitting: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  logLevel: 'warning',
  // Smaller to parse at every start; identifiers stay readable for internal-error traces.
  minifyWhitespace: true,
  minifySyntax: true,
  // koffi (src/image/ofd-lock.ts: fcntl for QEMU's image locks) loads a native .node file
  // from its own folder: it stays in node_modules and is required from there at run time.
  external: ['koffi'],
  plugins: [lightShims],
  // Bundled CommonJS packages (cli-progress) call require() for Node built-ins.
  banner: { js: "import { createRequire as __qdedupRequire } from 'node:module'; const require = __qdedupRequire(import.meta.url);" },
});
