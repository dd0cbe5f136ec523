// Internal errors (a caller broke the engine's contract, never the image's fault) are
// InternalError: the CLI prints them as "internal error: …" with "This is a bug in qdedup"
// and the trace, unlike the one-line errors an image or the user causes.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { createImage } from '../../src/image/create.ts';
import { checkOpenImage } from '../../src/image/check-image.ts';
import { InternalError } from '../../src/errors.ts';
import { ROOT, tempDir } from '../helpers.ts';

async function plainImage(): Promise<string> {
  const path = join(tempDir(), 'a.qcow2');
  await createImage(path, { size: 1024 * 1024, clusterBits: 16, version: 3, refcountOrder: 4, lazyRefcounts: false, force: false });
  return path;
}

test('internal errors: a write to an image open read-only is an InternalError', async () => {
  const image = await Image.open(await plainImage());
  try {
    await assert.rejects(
      image.write(0, Buffer.alloc(512, 1)),
      (err) => err instanceof InternalError && err.code === 'EINTERNAL' && /not open for writing/.test(err.message),
    );
  } finally {
    await image.close();
  }
});

test('internal errors: a repair of an image open read-only is an InternalError', async () => {
  const image = await Image.open(await plainImage());
  try {
    await assert.rejects(checkOpenImage(image, { repair: 'leaks' }), InternalError);
  } finally {
    await image.close();
  }
});

test('internal errors: the CLI prints one as a bug to report, with the trace', () => {
  // main.ts runs main() when imported (here on an unknown command: one usage error on
  // stderr, and it returns), then an InternalError is reported.
  const script = join(tempDir(), 'report.mts');
  writeFileSync(
    script,
    [
      `const { report } = await import(${JSON.stringify(join(ROOT, 'src/cli/main.ts'))});`,
      `const { InternalError } = await import(${JSON.stringify(join(ROOT, 'src/errors.ts'))});`,
      `const { processOutput } = await import(${JSON.stringify(join(ROOT, 'src/cli/output.ts'))});`,
      `process.exitCode = report(new InternalError('image not open for writing'), processOutput(false), false);`,
    ].join('\n'),
  );
  const r = spawnSync(process.execPath, ['--import', 'tsx', script, 'no-such-command'], {
    cwd: ROOT,
    encoding: 'utf8',
    env: { ...process.env, NO_COLOR: '1' },
  });
  assert.equal(r.status, 1, r.stderr);
  assert.match(r.stderr, /\nqdedup: internal error: image not open for writing\nThis is a bug in qdedup; please report it/);
  assert.match(r.stderr, /\n\s+at /, 'the trace');
});
