// Start-up stays small, checked on the built dist/ rather than timed: what
// bin/qdedup loads before it knows the command (dist/qdedup.mjs and the chunks it imports
// statically) holds no subcommand, no QCOW2 engine, no progress bar, and none of the
// packages scripts/build-shims/ replaces (the real string-width's Unicode regular
// expressions cost 25–50 ms at load); each subcommand's chunk is reached only through a
// dynamic import().

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, qdedup } from '../helpers.ts';
import { COMMANDS, commandName } from '../../src/cli/command-list.ts';

const DIST = join(ROOT, 'dist');

/** dist/qdedup.mjs and every chunk it imports statically, transitively: file → text. */
function staticClosure(): Map<string, string> {
  const seen = new Map<string, string>();
  const visit = (rel: string) => {
    if (seen.has(rel)) return;
    const text = readFileSync(join(DIST, rel), 'utf8');
    seen.set(rel, text);
    const dir = rel.includes('/') ? rel.slice(0, rel.lastIndexOf('/') + 1) : '';
    // Static imports only: `import{…}from"./x.mjs"` / `import"./x.mjs"`, not `import("./x.mjs")`.
    for (const m of text.matchAll(/\bimport\s*(?:[^("'`;]*?\bfrom\s*)?["'](\.{1,2}\/[^"']+)["']/g)) {
      visit(join(dir, m[1]).replace(/^\.\//, ''));
    }
  };
  visit('qdedup.mjs');
  return seen;
}

describe('start-up: what loads before the command is known', () => {
  it('dist/qdedup.mjs and its static imports hold no command, engine, progress bar, node:assert, node:tty or string-width regexes', () => {
    const closure = staticClosure();
    const all = [...closure.values()].join('\n');
    for (const [what, marker] of [
      ['read.ts', 'Pattern verification failed'],
      ['info.ts', 'Format specific information'],
      ['the QCOW2 engine (image.ts)', 'inflateRawSync'],
      ['cli-progress', 'SingleBar'],
      ['string-width (real)', 'RGI_Emoji'],
      ['string-width (real)', 'Intl.Segmenter'],
      ["chalk's supports-color (real)", 'TERM_PROGRAM'],
      ['node:assert', 'from"assert"'],
      ['node:tty', 'from"node:tty"'],
    ]) {
      assert.ok(
        !all.includes(marker),
        `${what} is loaded at start-up (found '${marker}' in ${[...closure.keys()].filter((k) => closure.get(k)!.includes(marker)).join(', ')})`,
      );
    }
  });

  it('every command in the list has its own chunk, imported dynamically, and runs', () => {
    const main = readFileSync(join(DIST, 'qdedup.mjs'), 'utf8');
    const dynamic = [...main.matchAll(/\bimport\(\s*["']\.\/chunks\/([a-z-]+)-[A-Z0-9]+\.mjs["']\s*\)/g)].map((m) => m[1]);
    assert.deepEqual(dynamic.sort(), COMMANDS.map(commandName).sort());
    for (const c of COMMANDS) {
      const r = qdedup([commandName(c), '--help']);
      assert.equal(r.status, 0, `${commandName(c)} --help: ${r.stderr}`);
      assert.ok(r.stdout.startsWith(`qdedup ${c.command}`), r.stdout.slice(0, 80));
    }
  });
});
