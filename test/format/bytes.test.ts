// Byte helpers of src/format/bytes.ts: isZero looks at both ends first, then at every byte.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isZero } from '../../src/format/bytes.ts';

test('isZero: every byte counts, not only the ends it looks at first', () => {
  assert.equal(isZero(new Uint8Array(0)), true);
  assert.equal(isZero(Buffer.alloc(4096)), true);
  for (const at of [0, 1, 2047, 4094, 4095]) {
    const b = Buffer.alloc(4096);
    b[at] = 1;
    assert.equal(isZero(b), false, `a byte at ${at}`);
    assert.equal(isZero(b.subarray(at === 0 ? 1 : 0, at === 0 ? 4096 : at)), true, `the zeros before or after byte ${at}`);
  }
  // Longer than any buffer seen before, and a view into a larger one.
  const big = Buffer.alloc(100_000);
  big[50_000] = 0x80;
  assert.equal(isZero(big), false);
  assert.equal(isZero(new Uint8Array(big.buffer, big.byteOffset + 50_001, 40_000)), true);
});
