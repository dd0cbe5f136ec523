// `npm run coverage`: line, branch and function coverage of src/ by the tests that drive
// the code in-process (node's --experimental-test-coverage, mapped back to TypeScript).
// Tests that only spawn bin/qdedup (cli, hostile, create, differential-read) are left out:
// node does not follow child processes, and with them Node 20's coverage reporter fails
// ("Cannot read properties of undefined (reading 'startOffset')").
// Prints node's full report, then the src/ rows again as a summary.

import { spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';

const CHILD_PROCESS_ONLY = ['test/cli/cli.test.ts', 'test/interop/hostile.test.ts', 'test/interop/create.test.ts', 'test/interop/differential-read.test.ts'];

function listTests(dir: string): string[] {
  return readdirSync(dir).sort().flatMap((name) => {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) return listTests(path);
    return name.endsWith('.test.ts') ? [path] : [];
  });
}

const root = new URL('..', import.meta.url).pathname;
const files = listTests(join(root, 'test')).map((f) => relative(root, f)).filter((f) => !CHILD_PROCESS_ONLY.includes(f));
const r = spawnSync(process.execPath, ['--import', 'tsx', '--enable-source-maps', '--experimental-test-coverage', '--test', '--test-concurrency=2', ...files], {
  cwd: root, encoding: 'utf8', maxBuffer: 1 << 28, stdio: ['ignore', 'pipe', 'inherit'],
});
process.stdout.write(r.stdout);
const rows = r.stdout.split('\n').filter((l) => /^# (file |src\/)/.test(l));
console.log('\ncoverage of src/ (in-process tests; the first lines of each file are its header comment, which the source map marks uncovered):');
for (const row of rows) console.log(row.replace(/^# /, ''));
process.exit(r.status ?? 1);
