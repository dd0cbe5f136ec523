import { test } from 'node:test';
import assert from 'node:assert/strict';
import { humanSize, parseOptionList, parsePattern, parseSize } from '../../src/cli/parse.ts';

test('parseSize accepts qemu size syntax', () => {
  assert.equal(parseSize('0'), 0);
  assert.equal(parseSize('512'), 512);
  assert.equal(parseSize('10b'), 10);
  assert.equal(parseSize('1k'), 1024);
  assert.equal(parseSize('1K'), 1024);
  assert.equal(parseSize('64k'), 65536);
  assert.equal(parseSize('1M'), 1048576);
  assert.equal(parseSize('1.5G'), 1.5 * 2 ** 30);
  assert.equal(parseSize('2T'), 2 * 2 ** 40);
  assert.equal(parseSize('0x100000'), 0x100000);
  assert.equal(parseSize('0.5k'), 512);
});

test('parseSize rejects what qemu rejects', () => {
  for (const bad of ['', '1.5', '1e3', '12X', '-1', 'abc', '1G-512', '0x', '0x1.5k', '16E']) {
    assert.throws(() => parseSize(bad), /invalid|too large/, bad);
  }
});

test('parsePattern takes decimal, hex and octal bytes', () => {
  assert.equal(parsePattern('0xab'), 0xab);
  assert.equal(parsePattern('171'), 171);
  assert.equal(parsePattern('017'), 15);
  assert.equal(parsePattern('0'), 0);
  for (const bad of ['0x1234', '256', '-1', 'x', '1e3']) assert.throws(() => parsePattern(bad), /not a valid pattern byte/, bad);
});

test('parseOptionList merges repeated -o and unescapes ,,', () => {
  const m = parseOptionList(['cluster_size=4k,compat=0.10', 'lazy_refcounts', 'backing_file=a,,b']);
  assert.equal(m.get('cluster_size'), '4k');
  assert.equal(m.get('compat'), '0.10');
  assert.equal(m.get('lazy_refcounts'), 'on');
  assert.equal(m.get('backing_file'), 'a,b');
  assert.ok(parseOptionList(['help']).has('help'));
  assert.ok(parseOptionList(['?']).has('help'));
});

test('humanSize matches qemu size_to_str', () => {
  assert.equal(humanSize(1073741824), '1 GiB');
  assert.equal(humanSize(200704), '196 KiB');
  assert.equal(humanSize(999), '999 B');
  assert.equal(humanSize(1000), '0.977 KiB');
  assert.equal(humanSize(1536 * 1024 * 1024), '1.5 GiB');
});
