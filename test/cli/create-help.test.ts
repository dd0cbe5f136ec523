// `create -o help` shows the defaults of the image being made: a dedup
// image gets 4 KiB clusters, a plain one (dedup=off, compat=0.10, refcounts under 4 bits)
// qemu-img's 64 KiB. Each default the help states is checked against the image `create`
// then makes with the same options.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { qdedup, tempDir } from '../helpers.ts';

const dir = tempDir('qdedup-create-help-');

function help(opts: string): string {
  const r = qdedup(['create', '-o', opts ? `${opts},help` : 'help', join(dir, 'unused.qcow2'), '0']);
  assert.equal(r.status, 0, r.stderr);
  return r.stdout;
}

const line = (text: string, key: string) => text.split('\n').find((l) => l.startsWith(`  ${key}=<`)) ?? '';

test('-o help: cluster_size and dedup defaults follow the other options, and create makes what it says', () => {
  const cases: [string, number, boolean][] = [
    ['', 4096, true],
    ['dedup=blake3', 4096, true],
    ['dedup=off', 65536, true],
    ['compat=0.10', 65536, false],
    ['refcount_bits=2', 65536, false],
    ['refcount_bits=64', 4096, true],
  ];
  for (const [opts, clusterSize, dedupByDefault] of cases) {
    const text = help(opts);
    assert.match(text, /^Supported options:\n/);
    assert.equal(line(text, 'cluster_size'), `  cluster_size=<size>        - qcow2 cluster size, a power of two from 512 to 2M (default ${clusterSize})`, opts);
    assert.equal(
      line(text, 'dedup'),
      dedupByDefault
        ? '  dedup=<str>                - Inline deduplication hash: sha256 (default), sha3-256, blake3 or off'
        : '  dedup=<str>                - Inline deduplication hash: sha256, sha3-256, blake3 or off (default off: dedup needs compat=1.1 and refcount_bits of 4 or more)',
      opts,
    );
    const img = join(dir, `made-${opts || 'default'}.qcow2`);
    const made = qdedup(['create', '-q', ...(opts ? ['-o', opts] : []), img, '16M']);
    assert.equal(made.status, 0, made.stderr);
    const info = JSON.parse(qdedup(['info', '--output', 'json', img]).stdout);
    assert.equal(info['cluster-size'], clusterSize, `${opts}: the image create makes`);
    const algorithm = info['format-specific'].data.dedup?.algorithm ?? 'off';
    assert.equal(algorithm, opts === 'dedup=blake3' ? 'blake3' : opts === 'dedup=off' || !dedupByDefault ? 'off' : 'sha256', opts);
  }
  // The rest of the text is the same whatever the options (qemu-img's layout: key=<type>, padding, "- help").
  assert.equal(help('dedup=off').replace(/\(default \d+\)/, ''), help('').replace(/\(default \d+\)/, ''));
});
