// The layering of src/ (docs/DESIGN.md "Layers"): imports flow cli → dedup → image → format,
// format/ imports nothing outside itself, errors.ts is shared by all; and no import cycle
// among src/ files. Reads every import of every file (static, re-exports, dynamic import()).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';

const root = resolve(new URL('..', import.meta.url).pathname);
const src = join(root, 'src');

/** Rank of each layer: a file may import only its own layer or a lower one. */
const RANK: Record<string, number> = { format: 0, image: 1, dedup: 2, cli: 3 };
/** Files every layer may import (errors.ts: the shared error hierarchy). */
const SHARED = new Set(['errors.ts']);

interface Import {
  from: string;
  to: string;
  typeOnly: boolean;
  spec: string;
}

/** Every .ts file under `dir`, sorted. */
function listFiles(dir: string): string[] {
  return (readdirSync(dir, { recursive: true }) as string[])
    .filter((n) => n.endsWith('.ts'))
    .sort()
    .map((n) => join(dir, n));
}

/** Every relative import of `file` that lands in src/, resolved to a path relative to src/. */
function importsOf(file: string): Import[] {
  const text = readFileSync(file, 'utf8');
  const out: Import[] = [];
  const add = (spec: string, typeOnly: boolean) => {
    if (!spec.startsWith('.')) return; // packages and node: builtins
    const target = resolve(dirname(file), spec);
    out.push({ from: relative(src, file), to: relative(src, target), typeOnly, spec });
  };
  // import … from '…' / export … from '…' (possibly across lines), import '…'
  for (const m of text.matchAll(/^\s*(import|export)\s+(type\s+)?([^'";]*?)\s*from\s*['"]([^'"]+)['"]/gms)) add(m[4], Boolean(m[2]));
  for (const m of text.matchAll(/^\s*import\s+['"]([^'"]+)['"]/gm)) add(m[1], false);
  for (const m of text.matchAll(/\bimport\(\s*['"]([^'"]+)['"]\s*\)/g)) add(m[1], false);
  return out;
}

function layerOf(path: string): string {
  if (SHARED.has(path)) return 'shared';
  const top = path.split('/')[0];
  return top in RANK ? top : `unknown (${path})`;
}

const files = listFiles(src);
const imports = files.flatMap(importsOf);

test('layers: every src/ file is in a known layer', () => {
  const unknown = files.map((f) => relative(src, f)).filter((f) => layerOf(f).startsWith('unknown'));
  assert.deepEqual(unknown, [], 'files outside cli/, dedup/, image/, format/ and the shared errors.ts');
});

test('layers: imports only go down (cli → dedup → image → format), type imports included', () => {
  const wrong: string[] = [];
  for (const i of imports) {
    const from = layerOf(i.from);
    const to = layerOf(i.to);
    if (to === 'shared') continue;
    if (to.startsWith('unknown')) {
      wrong.push(`${i.from} imports '${i.spec}', outside src/`);
      continue;
    }
    if (from === 'shared') wrong.push(`${i.from} (shared) imports ${i.to}`);
    else if (RANK[to] > RANK[from]) wrong.push(`${i.from} imports ${i.to}: ${from} → ${to} goes up`);
  }
  assert.deepEqual(wrong, []);
});

test('layers: format/ imports nothing outside itself (but errors.ts)', () => {
  const wrong = imports.filter((i) => layerOf(i.from) === 'format' && layerOf(i.to) !== 'format' && !SHARED.has(i.to));
  assert.deepEqual(
    wrong.map((i) => `${i.from} imports ${i.to}`),
    [],
  );
});

/** The import cycles (strongly connected components, Tarjan) of src/ over `chosen` imports. */
function cyclesOf(chosen: Import[]): string[][] {
  const edges = new Map<string, string[]>();
  for (const i of chosen) edges.set(i.from, [...(edges.get(i.from) ?? []), i.to]);
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const onStack = new Set<string>();
  const stack: string[] = [];
  const cycles: string[][] = [];
  let next = 0;
  const visit = (v: string) => {
    index.set(v, next);
    low.set(v, next);
    next++;
    stack.push(v);
    onStack.add(v);
    for (const w of edges.get(v) ?? []) {
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) {
        low.set(v, Math.min(low.get(v)!, index.get(w)!));
      }
    }
    if (low.get(v) === index.get(v)) {
      const scc: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        scc.push(w);
      } while (w !== v);
      if (scc.length > 1 || (edges.get(v) ?? []).includes(v)) cycles.push(scc.sort());
    }
  };
  for (const f of files.map((x) => relative(src, x))) if (!index.has(f)) visit(f);
  return cycles;
}

test('layers: no import cycle among src/ files (imports that exist at run time)', () => {
  const cycles = cyclesOf(imports.filter((i) => !i.typeOnly));
  assert.deepEqual(cycles, [], `import cycles: ${cycles.map((c) => c.join(' ↔ ')).join('; ')}`);
});

test('layers: no import cycle among src/ files, type-only imports included', () => {
  // A cycle hidden behind `import type` or a dynamic import() is still one module graph a
  // reader has to untangle (check.ts and image.ts once imported each other that way).
  const cycles = cyclesOf(imports);
  assert.deepEqual(cycles, [], `import cycles: ${cycles.map((c) => c.join(' ↔ ')).join('; ')}`);
});
