// Start-up stays small, checked on the built dist/ rather than timed (docs/PERFORMANCE.md,
// "Start-up"): bin/qdedup runs the one-file bundle dist/qdedup.cjs with the V8 code cache
// scripts/build.mjs made for it, and uses a cache only when it belongs to that bundle; in the
// bundle, each subcommand's modules and the QCOW2 engine are initialised only when the
// command runs (esbuild's lazy __esm wrappers), so what a start loads before the command is
// known holds no engine, no progress bar, no hashing, no image locks; the packages
// scripts/build-shims/ replaces (the real string-width's Unicode regular expressions cost
// 25–50 ms at load) are not in the bundle at all.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync, utimesSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { BIN, ROOT, qdedup, tempDir } from '../helpers.ts';
import { COMMANDS, commandName } from '../../src/cli/command-list.ts';

const DIST = join(ROOT, 'dist');
const BUNDLE = readFileSync(join(DIST, 'qdedup.cjs'), 'utf8');

/** Runs `bin` with `args` and returns the Node built-in modules the process loaded and the files it required. */
function loaded(args: string[], bin = BIN): { status: number; builtins: Set<string>; files: string[] } {
  const dir = tempDir();
  const preload = join(dir, 'loaded.cjs');
  const report = join(dir, 'loaded.json');
  writeFileSync(
    preload,
    `process.on('exit', () => require('node:fs').writeFileSync(${JSON.stringify(report)}, JSON.stringify({` +
      `builtins: process.moduleLoadList.filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice(13)), files: Object.keys(require.cache) })));`,
  );
  const r = spawnSync(process.execPath, ['-r', preload, bin, ...args], { env: { ...process.env, NO_COLOR: '1' } });
  const { builtins, files } = JSON.parse(readFileSync(report, 'utf8')) as { builtins: string[]; files: string[] };
  return { status: r.status ?? -1, builtins: new Set(builtins), files };
}

/** A small dedup image made by `create`. */
function smallImage(): string {
  const img = join(tempDir(), 'small.qcow2');
  assert.equal(qdedup(['create', '-q', img, '64M']).status, 0);
  return img;
}

describe('start-up: what a start loads', () => {
  it('the bundle holds none of the packages build-shims replaces', () => {
    for (const [what, marker] of [
      ['string-width (real)', 'RGI_Emoji'],
      ['string-width (real)', 'Intl.Segmenter'],
      ["chalk's supports-color (real)", 'TERM_PROGRAM'],
      ['node:assert', 'require("assert")'],
    ]) {
      assert.ok(!BUNDLE.includes(marker), `${what} is in dist/qdedup.cjs (found '${marker}')`);
    }
  });

  it('no command and no engine module is initialised before the command is known', () => {
    // esbuild wraps a module that is reached through import() in `init_x=__esm({"path"(){…}})`:
    // its body runs on the first init_x() call. Such a call sits in the prologue of another
    // wrapped module (`"path"(){init_a();init_b();…`), in an import() (`Promise.resolve().then(
    // () => (init_x(), x_exports))`), or elsewhere: then it may run at start. The modules
    // that do, and those their prologues initialise, must hold no command and no engine.
    const initOf = new Map<string, string>(); // init function → module path
    const prologue = new Map<string, string[]>(); // module path → the init functions its prologue calls
    for (const m of BUNDLE.matchAll(/\b(init_[\w$]+)=__esm\(\{\s*"([^"]+)"\(\)\{/g)) {
      initOf.set(m[1], m[2]);
      // "use strict", then the init calls, among the require() of packages and built-ins.
      const body = BUNDLE.slice(m.index + m[0].length, m.index + m[0].length + 4000);
      const calls = /^(?:"use strict";)?(?:(?:[\w$]+=(?:__toESM\()?require\("[^"]*"\)(?:,1)?\)?|init_[\w$]+\(\))(?:[,;]|(?=\})))*/.exec(body)?.[0] ?? '';
      prologue.set(
        m[2],
        [...calls.matchAll(/init_[\w$]+/g)].map((x) => x[0]),
      );
    }
    const roots = new Set<string>();
    for (const [init, path] of initOf) {
      const calls = BUNDLE.split(`${init}()`).length - 1;
      const inPrologues = [...prologue.values()].reduce((n, list) => n + list.filter((i) => i === init).length, 0);
      const inImports = BUNDLE.split(`Promise.resolve().then(()=>(${init}(),`).length - 1;
      if (calls > inPrologues + inImports) roots.add(path);
    }
    const atStart = new Set<string>();
    const visit = (path: string) => {
      if (atStart.has(path)) return;
      atStart.add(path);
      for (const init of prologue.get(path) ?? []) visit(initOf.get(init)!);
    };
    for (const r of roots) visit(r);
    assert.ok(atStart.has('src/errors.ts'), 'the analysis found what main.ts initialises (errors.ts)');
    const expected = [...COMMANDS.map((c) => `src/cli/commands/${commandName(c)}.ts`), 'src/image/image.ts', 'src/dedup/dedup.ts', 'src/dedup/hasher.ts'];
    for (const m of expected) {
      assert.ok(prologue.has(m), `${m} is not wrapped for lazy initialisation in dist/qdedup.cjs`);
      assert.ok(!atStart.has(m), `${m} is initialised at start`);
    }
  });

  it('--version loads no engine, hashing, compression, terminal, thread or lock code', () => {
    const r = loaded(['--version']);
    assert.equal(r.status, 0);
    for (const m of ['zlib', 'crypto', 'tty', 'worker_threads', 'assert', 'os']) assert.ok(!r.builtins.has(m), `--version loaded node:${m}`);
    assert.deepEqual(
      r.files.filter((f) => f.includes('koffi')),
      [],
      '--version loaded koffi',
    );
  });

  it('info loads no hashing, compression, terminal, thread or fs/promises code; info -U no koffi either', () => {
    const img = smallImage();
    for (const args of [
      ['info', img],
      ['info', '-U', img],
    ]) {
      const r = loaded(args);
      assert.equal(r.status, 0, args.join(' '));
      // fs/promises: its first use loads it (~2.5 ms); info reads through SyncReadFile.
      for (const m of ['crypto', 'zlib', 'tty', 'worker_threads', 'assert', 'fs/promises', 'os'])
        assert.ok(!r.builtins.has(m), `${args.join(' ')} loaded node:${m}`);
      if (args.includes('-U'))
        assert.deepEqual(
          r.files.filter((f) => f.includes('koffi')),
          [],
          'info -U loaded koffi',
        );
    }
  });

  it('create loads no node:crypto or node:os (it hashes nothing), nor threads', () => {
    const dir = tempDir('qdedup-startup-create-');
    const r = loaded(['create', '-q', join(dir, 'c.qcow2'), '64M']);
    assert.equal(r.status, 0);
    for (const m of ['crypto', 'os', 'worker_threads', 'zlib']) assert.ok(!r.builtins.has(m), `create loaded node:${m}`);
  });

  it('a dedup write through the pipeline (hash worker, chunk ring) loads no perf_hooks (performance.now: ~2–3 ms at first use)', () => {
    const dir = tempDir('qdedup-startup-write-');
    const data = join(dir, 'data.raw');
    writeFileSync(data, Buffer.alloc(2 * 1024 * 1024, 0x5a)); // two clusters' worth of chunk for the worker
    const r = loaded(['convert', '-q', '-f', 'raw', data, join(dir, 'out.qcow2')]);
    assert.equal(r.status, 0);
    assert.ok(r.builtins.has('worker_threads'), 'the hash worker ran');
    assert.ok(!r.builtins.has('perf_hooks'), 'convert loaded node:perf_hooks');
  });

  it('info makes no stdout stream (its lines are written to the descriptor)', () => {
    const r = loaded(['info', smallImage()]);
    assert.equal(r.status, 0);
    for (const m of ['stream', 'net', 'internal/fs/sync_write_stream']) assert.ok(!r.builtins.has(m), `info loaded node:${m}`);
  });

  it('help asked for among other options is help (yargs is then given every command)', () => {
    const img = smallImage();
    for (const args of [
      ['info', '-Uh', img],
      ['info', img, '--help'],
    ]) {
      const r = qdedup(args);
      assert.equal(r.status, 0, `${args.join(' ')}: ${r.stderr}`);
      assert.ok(r.stdout.startsWith('qdedup info <file>'), r.stdout.slice(0, 80));
    }
    const r = qdedup(['info', '-V']);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^\d+\.\d+\.\d+\n$/);
  });

  it('bin/qdedup run as a program starts Node without NODE_EXTRA_CA_CERTS (Node would parse the certificates it names)', () => {
    // A file that does not exist makes Node say, at start, that it ignores it: run as
    // `node bin/qdedup`, Node sees the variable; run through its first line, it must not.
    const env = { ...process.env, NODE_EXTRA_CA_CERTS: join(tempDir(), 'no-such-bundle.pem') };
    const viaNode = spawnSync(process.execPath, [BIN, '--version'], { env, encoding: 'utf8' });
    assert.equal(viaNode.status, 0, viaNode.stderr);
    assert.match(viaNode.stderr, /Ignoring extra certs from/);
    const direct = spawnSync(BIN, ['--version'], { env, encoding: 'utf8' });
    assert.equal(direct.status, 0, direct.stderr);
    assert.equal(direct.stderr, '');
    assert.match(direct.stdout, /^\d+\.\d+\.\d+\n$/);
  });

  it('every command in the list runs (--help)', () => {
    for (const c of COMMANDS) {
      const r = qdedup([commandName(c), '--help']);
      assert.equal(r.status, 0, `${commandName(c)} --help: ${r.stderr}`);
      assert.ok(r.stdout.startsWith(`qdedup ${c.command}`), r.stdout.slice(0, 80));
    }
  });
});

describe('start-up: the code cache', () => {
  /** bin/qdedup's answer to QDEDUP_CODE_CACHE=report for `--version`, run from `bin`. */
  const cacheState = (bin = BIN, env: Record<string, string> = {}) => {
    const r = spawnSync(process.execPath, [bin, '--version'], { env: { ...process.env, QDEDUP_CODE_CACHE: 'report', ...env }, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^\d+\.\d+\.\d+/);
    return /qdedup: code cache (.*)\n/.exec(r.stderr)?.[1];
  };

  it('the build made one, and bin/qdedup uses it', () => {
    assert.equal(cacheState(), 'used');
    assert.equal(cacheState(BIN, { QDEDUP_CODE_CACHE: 'off' }), undefined, 'off: not even reported');
  });

  /** A copy of bin/ and dist/ (and package.json, for --version) in a temporary folder: its bin/qdedup. */
  function copy(): { bin: string; dist: string } {
    const root = tempDir();
    for (const d of ['bin', 'dist']) mkdirSync(join(root, d));
    for (const f of ['bin/qdedup', 'bin/package.json', 'dist/qdedup.cjs', 'dist/qdedup.cache', 'package.json']) copyFileSync(join(ROOT, f), join(root, f));
    return { bin: join(root, 'bin', 'qdedup'), dist: join(root, 'dist') };
  }

  it('a cache that is not for this bundle is not used, and the run is the same', () => {
    // Made by another build (its key names another one).
    let c = copy();
    const cache = readFileSync(join(c.dist, 'qdedup.cache'));
    const nl = cache.indexOf(10);
    const key = JSON.parse(cache.toString('latin1', 0, nl)) as { build: string };
    writeFileSync(
      join(c.dist, 'qdedup.cache'),
      Buffer.concat([Buffer.from(`${JSON.stringify({ ...key, build: '0123456789abcdef' })}\n`), cache.subarray(nl + 1)]),
    );
    assert.equal(cacheState(c.bin), 'none');
    // Older than the bundle (the bundle was edited after the build).
    c = copy();
    const later = new Date(Date.now() + 60_000);
    utimesSync(join(c.dist, 'qdedup.cjs'), later, later);
    assert.equal(cacheState(c.bin), 'none');
    // Its key right but its V8 data cut short: V8 refuses it and compiles as without one.
    c = copy();
    writeFileSync(join(c.dist, 'qdedup.cache'), cache.subarray(0, nl + 1 + Math.floor((cache.length - nl - 1) / 2)));
    assert.equal(cacheState(c.bin), 'refused by V8');
    // None at all.
    c = copy();
    writeFileSync(join(c.dist, 'qdedup.cache'), '');
    assert.equal(cacheState(c.bin), 'none');
  });
});
