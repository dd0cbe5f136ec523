// FingerprintTable (src/dedup/fingerprint-table.ts) against a Map: counts exact through
// growth; at its largest size, sampling doubles and drops keys in place, and the kept keys'
// counts stay exact (as if sampled from the start); the refcount cap's copies; the bound.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FingerprintTable, maxSlotsFor, tableBytes } from '../../src/dedup/fingerprint-table.ts';

/** A seeded stream of (lo, hi) keys: `distinct` keys, drawn with skewed repeats. */
function keys(distinct: number, draws: number, seed = 1): [number, number][] {
  let x = seed;
  const rnd = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>>= 0);
  };
  const pool: [number, number][] = Array.from({ length: distinct }, () => [rnd(), rnd()]);
  pool[0] = [0, 0]; // the empty-slot pattern is a valid fingerprint too
  return Array.from({ length: draws }, (_, i) => pool[i < distinct ? i : rnd() % Math.max(1, rnd() % distinct)]);
}

function expected(stream: [number, number][], sample: number, perCopy = Number.POSITIVE_INFINITY) {
  const m = new Map<string, number>();
  for (const [lo, hi] of stream) if ((lo & (sample - 1)) === 0) m.set(`${lo}:${hi}`, (m.get(`${lo}:${hi}`) ?? 0) + 1);
  const rows = new Map<number, { refcnt: number; contents: number; copies: number; references: number }>();
  for (const n of m.values()) {
    const refcnt = 2 ** Math.floor(Math.log2(n));
    const r = rows.get(refcnt) ?? { refcnt, contents: 0, copies: 0, references: 0 };
    r.contents++;
    r.copies += Math.ceil(n / perCopy);
    r.references += n;
    rows.set(refcnt, r);
  }
  return { size: m.size, rows: [...rows.values()].sort((a, b) => a.refcnt - b.refcnt) };
}

test('fingerprint table: exact counts through growth', () => {
  const stream = keys(20_000, 60_000);
  const t = new FingerprintTable(1 << 20, 1, 256);
  for (const [lo, hi] of stream) t.add(lo, hi);
  const want = expected(stream, 1);
  assert.equal(t.sample, 1);
  assert.equal(t.size, want.size);
  assert.deepEqual(t.histogram(Number.POSITIVE_INFINITY), want.rows);
  assert.deepEqual(t.histogram(3), expected(stream, 1, 3).rows);
});

test('fingerprint table: at its largest size it samples, and kept counts stay exact', () => {
  const stream = keys(20_000, 60_000, 7);
  const t = new FingerprintTable(4096, 1, 256);
  for (const [lo, hi] of stream) t.add(lo, hi);
  assert.ok(t.sample >= 8, `sample ${t.sample}`);
  assert.ok(t.size <= 4096 * 0.75);
  assert.equal(t.bytes, tableBytes(4096));
  const want = expected(stream, t.sample);
  assert.equal(t.size, want.size);
  assert.deepEqual(t.histogram(Number.POSITIVE_INFINITY), want.rows);
});

test('fingerprint table: the memory bound holds while it grows', () => {
  for (const budget of [64 * 1024, 1 << 20, 1 << 30]) {
    const slots = maxSlotsFor(budget);
    assert.ok(tableBytes(slots) * 1.5 <= budget && tableBytes(slots * 2) * 1.5 > budget, `${budget}: ${slots}`);
  }
  assert.equal(maxSlotsFor(1 << 30), 1 << 25);
});
