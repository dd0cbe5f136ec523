// Runs every test file under test/ with node:test (Node 20's --test neither expands
// globs nor finds .ts files by itself). Fails when no test file is found.
// Usage: npm test [-- PATTERN…]   (only files whose path contains one of the patterns)

import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { spawnSync } from 'node:child_process';

function listTests(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...listTests(path));
    else if (name.endsWith('.test.ts')) out.push(path);
  }
  return out;
}

const root = new URL('..', import.meta.url).pathname;
const patterns = process.argv.slice(2);
const files = listTests(join(root, 'test'))
  .map((f) => relative(root, f))
  .filter((f) => patterns.length === 0 || patterns.some((p) => f.includes(p)));
if (files.length === 0) {
  console.error('run-tests: no test files found' + (patterns.length ? ` matching ${patterns.join(', ')}` : ''));
  process.exit(1);
}
const result = spawnSync(process.execPath, ['--import', 'tsx', '--test', '--test-concurrency=2', ...files], { cwd: root, stdio: 'inherit' });
process.exit(result.status ?? 1);
