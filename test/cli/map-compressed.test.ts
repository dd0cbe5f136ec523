// `qdedup map` on compressed clusters: `shared-by` on compressed ranges counts, for each of
// their clusters, the other guest clusters (disk and internal snapshots, the dedup holder
// excluded) whose L2 entries name the same compressed copy, added up over the range as for
// ranges of whole clusters; `--shares` lists those clusters. Expected counts come from how the
// data was generated (which clusters hold the same bytes) and, for plain images qemu-img
// wrote, from the snapshots taken; the ranges and the keys qemu-img prints are compared with
// `qemu-img map --output=json`: the same ranges, the same values, in the same key order.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Image } from '../../src/image/image.ts';
import { mapImage, mapJsonLine } from '../../src/image/map.ts';
import { dedupShareAccounting } from '../../src/dedup/sharing.ts';
import { NO_QEMU, qdedup, run, tempDir } from '../helpers.ts';

const dir = tempDir('qdedup-mapc-');
let serial = 0;
const CS = 4096;

type Entry = Record<string, unknown>;
const OURS = ['shared-by', 'shared-with'];

function ok(r: { status: number; stderr: string }, what: string): void {
  assert.equal(r.status, 0, `${what}: ${r.stderr}`);
}

function oursJson(file: string, ...opts: string[]): Entry[] {
  const r = qdedup(['map', '--output', 'json', ...opts, file]);
  ok(r, `qdedup map ${opts.join(' ')}`);
  return JSON.parse(r.stdout) as Entry[];
}

/** Our ranges without our keys: what qemu-img prints. */
const asQemuPrints = (entries: Entry[]): Entry[] => entries.map((e) => Object.fromEntries(Object.entries(e).filter(([k]) => !OURS.includes(k))));

/** qdedup's JSON without its own keys equals qemu-img's (ranges, values and key order); returns ours. */
function assertQemuKeys(file: string, ...opts: string[]): Entry[] {
  const ours = oursJson(file, ...opts);
  const theirs = run('qemu-img', ['map', '-f', 'qcow2', '--output=json', ...opts, file]);
  ok(theirs, 'qemu-img map');
  const expected = JSON.parse(theirs.stdout) as Entry[];
  assert.deepEqual(asQemuPrints(ours), expected);
  assert.deepEqual(
    asQemuPrints(ours).map((e) => Object.keys(e)),
    expected.map((e) => Object.keys(e)),
  );
  return ours;
}

const isCompressed = (e: Entry) => e.data === true && e.depth === 0 && e.offset === undefined;

/**
 * Every range with data has the sum of its clusters' counts (`expected`), compressed ranges
 * as ranges of whole clusters; ranges without data have none.
 */
function assertCounts(entries: Entry[], expected: (cluster: number) => number): void {
  for (const e of entries) {
    if (!e.data) {
      assert.equal(e['shared-by'], undefined, `no count on ${e.start}`);
      continue;
    }
    const first = Math.floor((e.start as number) / CS);
    const last = Math.floor(((e.start as number) + (e.length as number) - 1) / CS);
    let sum = 0;
    for (let c = first; c <= last; c++) sum += expected(c);
    assert.equal(e['shared-by'], sum, `shared-by of the clusters ${first}–${last} (range at ${e.start})`);
  }
}

// ---------------------------------------------------------------- generated data

/** Clusters of the generated disk. */
const N = 120;
/** Incompressible contents (stored as whole clusters even with -c): ids at or above this. */
const RANDOM_ID = 1000;

/**
 * The content id of guest cluster i: 0 for zeros, ids that repeat (1–9, compressible), one
 * unique compressible id per fifth cluster, and an incompressible cluster present twice.
 */
function idOf(i: number): number {
  if (i % 13 === 12) return 0;
  if (i === 30 || i === 77) return RANDOM_ID;
  if (i === 31) return RANDOM_ID + 1;
  if (i % 5 === 4) return 100 + i;
  return ((i * 7) % 9) + 1;
}

const randomContent = new Map<number, Buffer>();
function contentOf(id: number): Buffer {
  if (id === 0) return Buffer.alloc(CS);
  if (id >= RANDOM_ID) {
    if (!randomContent.has(id)) randomContent.set(id, randomBytes(CS));
    return randomContent.get(id)!;
  }
  return Buffer.from(`content id ${id}; `.repeat(CS).slice(0, CS));
}

function disk(): Buffer {
  return Buffer.concat(Array.from({ length: N }, (_, i) => contentOf(idOf(i))));
}

/** The guest clusters holding the same bytes as cluster c, c excepted. */
function duplicatesOf(c: number): number[] {
  const out: number[] = [];
  for (let j = 0; j < N; j++) if (j !== c && idOf(j) === idOf(c)) out.push(j);
  return out;
}

/** A dedup image with compression, written from the generated disk in two writes (the second one's duplicates hit the first's copies). */
function dedupImage(): string {
  const file = join(dir, `d-${++serial}.qcow2`);
  const data = disk();
  const half = (N / 2) * CS;
  const [a, b] = [join(dir, `a-${serial}.raw`), join(dir, `b-${serial}.raw`)];
  writeFileSync(a, data.subarray(0, half));
  writeFileSync(b, data.subarray(half));
  ok(qdedup(['create', '-q', '-o', 'compression=on', file, String(N * CS)]), 'create');
  ok(qdedup(['write', '-q', '-i', a, file, '0']), 'write');
  ok(qdedup(['write', '-q', '-i', b, file, String(half)]), 'write');
  return file;
}

function convertedImage(): string {
  const raw = join(dir, `c-${++serial}.raw`);
  writeFileSync(raw, disk());
  const file = join(dir, `c-${serial}.qcow2`);
  ok(qdedup(['convert', '-q', '-c', '-f', 'raw', raw, file]), 'convert -c');
  return file;
}

describe('qdedup map: compressed copies in dedup images', () => {
  it("shared-by adds up, over a range's clusters, the other guest clusters naming the same copy", () => {
    for (const file of [dedupImage(), convertedImage()]) {
      const entries = oursJson(file);
      assert.ok(entries.some(isCompressed) && entries.some((e) => e.data && e.offset !== undefined), 'compressed and whole clusters');
      assertCounts(entries, (c) => duplicatesOf(c).length);
      assert.ok(
        entries.some((e) => isCompressed(e) && (e.length as number) > CS),
        'a compressed range of several clusters (their counts added)',
      );
      if (!NO_QEMU) assertQemuKeys(file);
      // a window starting and ending inside clusters
      const part = NO_QEMU
        ? oursJson(file, '--start-offset', '10000', '--max-length', '150000')
        : assertQemuKeys(file, '--start-offset', '10000', '--max-length', '150000');
      assertCounts(part, (c) => duplicatesOf(c).length);
      assert.equal(part[0].start, 10000);
    }
  });

  it('counted in windows of a few clusters: the same ranges as in one window', async () => {
    const file = dedupImage();
    const image = await Image.open(file);
    try {
      const accounting = await dedupShareAccounting(image);
      const all = async (copiesPerWindow?: number) => {
        const out: Entry[] = [];
        for await (const e of mapImage(image, file, { sharing: true, accounting, copiesPerWindow })) out.push(JSON.parse(mapJsonLine(e)));
        return out;
      };
      const one = await all();
      assertCounts(one, (c) => duplicatesOf(c).length);
      for (const w of [1, 2, 3, 7, 64]) assert.deepEqual(await all(w), one, `windows of ${w}`);
    } finally {
      await image.close();
    }
  });

  it('--shares on a compressed range lists the clusters naming the same copies (JSON and human)', () => {
    const file = dedupImage();
    const c = 8; // id 3, stored compressed, with duplicates before and after it
    assert.ok(idOf(c) < 100 && duplicatesOf(c).length > 1);
    const [e] = oursJson(file, '--shares', String(c * CS));
    assert.equal(e.offset, undefined);
    assert.equal(e['shared-by'], duplicatesOf(c).length);
    const sharers = e['shared-with'] as Entry[];
    assert.deepEqual(
      sharers.map((s) => [s.start, s.length, s.compressed]),
      duplicatesOf(c).map((j) => [j * CS, CS, true]),
    );
    assert.equal(new Set(sharers.map((s) => s.offset)).size, 1, 'one copy');
    assert.ok((sharers[0].offset as number) % CS !== 0, "a copy's first byte");
    // a range of several clusters: each range lists the clusters naming its clusters' copies
    const ranges = oursJson(file, '--shares', `${5 * CS},${4 * CS}`);
    for (const r of ranges) {
      const first = (r.start as number) / CS;
      const own = Array.from({ length: (r.length as number) / CS }, (_, k) => first + k);
      const want = [...new Set(own.flatMap((k) => duplicatesOf(k)))].sort((x, y) => x - y);
      assert.deepEqual(
        (r['shared-with'] as Entry[]).map((s) => (s.start as number) / CS),
        want,
        `range at ${r.start}`,
      );
    }
    // human: a row with "compressed" where the host offset would be, one line per sharer
    const human = qdedup(['map', '--shares', String(c * CS), file]);
    ok(human, 'map --shares');
    const lines = human.stdout.trimEnd().split('\n');
    assert.equal(lines[0], 'Offset          Length          Mapped to       Shared by       File');
    assert.equal(
      lines[1],
      `${`0x${(c * CS).toString(16)}`.padEnd(16)}${'0x1000'.padEnd(16)}${'compressed'.padEnd(16)}${String(duplicatesOf(c).length).padEnd(16)}${file}`,
    );
    assert.deepEqual(
      lines.slice(2),
      duplicatesOf(c).map(
        (j) => `    shared with ${j ? `0x${(j * CS).toString(16)}` : '0'} (4096 bytes compressed at 0x${(sharers[0].offset as number).toString(16)})`,
      ),
    );
  });

  it('the human table stops at compressed data as qemu-img does (exit 1)', () => {
    const file = dedupImage();
    const r = qdedup(['map', file]);
    assert.equal(r.status, 1);
    assert.equal(r.stdout, 'Offset          Length          Mapped to       Shared by       File\n');
    assert.equal(r.stderr, 'qdedup: File contains external, encrypted or compressed clusters.\n');
  });

  it('an internal snapshot names every copy once more (the holder never counts)', { skip: NO_QEMU }, () => {
    const file = dedupImage();
    ok(run('qemu-img', ['snapshot', '-c', 'snap', file]), 'qemu-img snapshot -c');
    assertCounts(assertQemuKeys(file), (c) => 2 * duplicatesOf(c).length + 1);
    const [e] = oursJson(file, '--shares', String(8 * CS));
    assert.deepEqual(
      (e['shared-with'] as Entry[]).map((s) => [s.start, s.snapshot]),
      [...duplicatesOf(8).map((j) => [j * CS, undefined]), ...[...duplicatesOf(8), 8].sort((x, y) => x - y).map((j) => [j * CS, 'snap'])],
    );
  });
});

describe('qdedup map: plain images qemu-img compressed', { skip: NO_QEMU }, () => {
  /** `qemu-img convert -c` of the generated disk, 4 KiB clusters: every copy its own, duplicates included. */
  function qemuCompressed(): string {
    const raw = join(dir, `q-${++serial}.raw`);
    writeFileSync(raw, disk());
    const file = join(dir, `q-${serial}.qcow2`);
    ok(run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4k', raw, file]), 'qemu-img convert -c');
    return file;
  }

  it('no sharing without snapshots; each snapshot names every copy once more; a rewritten cluster has its own', () => {
    const file = qemuCompressed();
    const entries = assertQemuKeys(file);
    assert.ok(entries.some(isCompressed));
    assertCounts(entries, () => 0);

    ok(run('qemu-img', ['snapshot', '-c', 's1', file]), 'snapshot s1');
    assertCounts(assertQemuKeys(file), () => 1);

    // clusters 2 and 3 rewritten (compressed again, new copies): the snapshot keeps the old ones
    const rewritten = new Set([2, 3]);
    ok(run('qemu-io', ['-f', 'qcow2', '-c', `discard ${2 * CS} ${2 * CS}`, '-c', `write -c -P 0x55 ${2 * CS} ${2 * CS}`, file]), 'qemu-io');
    ok(run('qemu-img', ['snapshot', '-c', 's2', file]), 'snapshot s2');
    const after = assertQemuKeys(file);
    assertCounts(after, (c) => (rewritten.has(c) ? 1 : 2));
    // qemu-img's first range: the compressed clusters 0–11 (cluster 12 holds zeros), their counts added
    assert.deepEqual([after[0].start, after[0].length, after[0]['shared-by']], [0, 12 * CS, 10 * 2 + 2 * 1]);

    // --shares: the snapshots' entries naming the same copies
    const ranges = oursJson(file, '--shares', `${CS},${3 * CS}`);
    assert.deepEqual(
      ranges.map((r) => [r.start, (r['shared-with'] as Entry[]).map((s) => [s.start, s.snapshot, s.compressed])]),
      [
        [
          CS,
          [
            [CS, 's1', true],
            [CS, 's2', true],
            [2 * CS, 's2', true],
            [3 * CS, 's2', true],
          ],
        ],
      ],
    );
    assert.equal(ranges[0]['shared-by'], 2 + 1 + 1);
    const human = qdedup(['map', '--shares', `${2 * CS},${2 * CS}`, file]);
    ok(human, 'map --shares');
    assert.match(
      human.stdout,
      /\n0x2000 +0x2000 +compressed +2 +\S+\n {4}shared with 0x2000 \(4096 bytes compressed at 0x[0-9a-f]+\) in snapshot 's2'\n {4}shared with 0x3000 \(4096 bytes compressed at 0x[0-9a-f]+\) in snapshot 's2'\n/,
    );
  });
});
