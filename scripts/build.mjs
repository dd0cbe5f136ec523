// Builds dist/qdedup.mjs: the whole CLI bundled into one ES module with esbuild, so that
// bin/qdedup starts without resolving and compiling ~60 separate modules (see README,
// "Start-up time"). Run by `npm ci`/`npm install` (prepare) and `npm run build`.
import { build } from 'esbuild';

await build({
  entryPoints: [new URL('../src/cli/main.ts', import.meta.url).pathname],
  outfile: new URL('../dist/qdedup.mjs', import.meta.url).pathname,
  bundle: true,
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
  // Bundled CommonJS packages (cli-progress) call require() for Node built-ins.
  banner: { js: "import { createRequire as __qdedupRequire } from 'node:module'; const require = __qdedupRequire(import.meta.url);" },
});
