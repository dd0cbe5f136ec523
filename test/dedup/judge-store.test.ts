// One trust verdict everywhere: for every rule of judgeStore() an image
// damaged to break it gets the same verdict, the same named reason and the same text from the
// library, `info`, `dedup-stats`, `journal-dump`, `check` and the next `write`'s notice (the
// write acts on it: a fresh index, or a refusal for an algorithm it cannot use). Real images
// made by bin/qdedup, damaged byte by byte; the write runs last, on a copy.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../../src/image/image.ts';
import { DISTRUST_REASONS, judgeStore, type DistrustReason } from '../../src/dedup/judge-store.ts';
import { qdedup } from '../helpers.ts';
import { dedupExtensionPayload, qdedupOk, workFolder } from './cli-lib.ts';

const { create, dir } = workFolder('qdedup-judge-store-');
let base = '';
let serial = 0;

/** A dedup image with data in the index, 4 KiB clusters, lazy refcounts allowed (for the QCOW2 dirty bit). */
function prepared(): string {
  const img = create('16M', 'lazy_refcounts=on');
  qdedupOk(['write', '-q', '-P', '0x11', img, '0', '256k']);
  qdedupOk(['write', '-q', '-P', '0x12', img, '1M', '256k']);
  return img;
}

const json = (args: string[]) => JSON.parse(qdedup(args).stdout);

/** A copy of the prepared image with `damage` applied to its bytes. */
function damaged(damage: (b: Buffer, ext: number) => void): string {
  const img = join(dir, `case-${++serial}.qcow2`);
  const b = readFileSync(base);
  damage(b, dedupExtensionPayload(b));
  writeFileSync(img, b);
  return img;
}

/** The first refcount block's offset (refcount table entry 0). */
const firstRefblock = (b: Buffer) => Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(48))));
const configOffset = (b: Buffer, ext: number) => Number(b.readBigUInt64BE(ext + 16));

const CASES: { name: DistrustReason | 'trusted'; damage: (b: Buffer, ext: number) => void; text: RegExp }[] = [
  { name: 'trusted', damage: () => {}, text: /^$/ },
  {
    name: 'extension',
    damage: (b, ext) => {
      b[ext + 3] = 30;
    },
    text: /^dedup header extension: store order 30 above 20$/,
  },
  {
    name: 'algorithm',
    damage: (b, ext) => {
      b[ext + 1] = 2;
    },
    text: /skein \(2\) is not supported/,
  },
  { name: 'qcow2-dirty', damage: (b) => b.writeBigUInt64BE(b.readBigUInt64BE(72) | 1n, 72), text: /^the QCOW2 dirty bit is set/ },
  {
    name: 'autoclear',
    damage: (b) => {
      b[88] &= ~0x10;
    },
    text: /^dedup autoclear bit 60 is clear/,
  },
  {
    name: 'dirty',
    damage: (b, ext) => {
      b[ext + 2] |= 1;
    },
    text: /^the image was not closed cleanly \(dedup dirty flag set\)$/,
  },
  {
    name: 'configuration',
    damage: (b, ext) => {
      b[configOffset(b, ext) + 4] ^= 0xff;
    },
    text: /^dedup configuration area: checksum mismatch$/,
  },
  {
    name: 'journal',
    damage: (b) => {
      b[journalOffset(b) + 100] ^= 0x40;
    },
    text: /^journal 0 block 0 is damaged \(checksum mismatch/,
  },
  // The configuration area's cluster counted twice: not the store's alone.
  {
    name: 'area',
    damage: (b, ext) => b.writeUInt16BE(2, firstRefblock(b) + (configOffset(b, ext) / 4096) * 2),
    text: /^dedup configuration area at 0x[0-9a-f]+: cluster 0x[0-9a-f]+ has refcount 2, not 1$/,
  },
];

/** Journal 0's offset in the prepared image (read with journal-dump). */
let journalAt = -1;
const journalOffset = (_b: Buffer) => journalAt;

test('judgeStore: the same verdict, named reason and text from the library, info, dedup-stats, journal-dump, check and the write', async () => {
  base = prepared();
  journalAt = json(['journal-dump', '--output', 'json', base]).journals[0].offset;
  const seen = new Set<string>();
  for (const c of CASES) {
    const img = damaged(c.damage);
    // The library: both modes (replayed into log stores, or the verdict only) agree.
    const image = await Image.open(img, { backing: false });
    const full = await judgeStore(image, { tolerant: true });
    const quick = await judgeStore(image, { tolerant: true, store: false });
    await image.close();
    assert.deepEqual([quick.trusted, quick.distrust, quick.reason], [full.trusted, full.distrust, full.reason], c.name);
    const reason = full.reason ?? '';
    assert.equal(full.distrust ?? 'trusted', c.name, `${c.name}: ${reason}`);
    assert.match(reason, c.text, c.name);
    seen.add(c.name);

    const info = json(['info', '--output', 'json', img])['format-specific'].data.dedup;
    assert.deepEqual([info.trusted, info.reason], [full.trusted, full.reason ?? undefined], `${c.name}: info`);

    // dedup-stats and journal-dump need the extension; without it they fail naming it.
    const stats = qdedup(['dedup-stats', '--output', 'json', img]);
    const dump = qdedup(['journal-dump', '--output', 'json', img]);
    if (c.name === 'extension') {
      for (const r of [stats, dump]) {
        assert.notEqual(r.status, 0, c.name);
        assert.ok(r.stderr.includes(reason), `${c.name}: ${r.stderr}`);
      }
    } else {
      const s = JSON.parse(stats.stdout);
      assert.deepEqual([s.trusted, s.reason], [full.trusted, full.reason ?? undefined], `${c.name}: dedup-stats`);
      if (c.name === 'configuration') {
        assert.equal(dump.status, 1, `${c.name}: the journals cannot be found`);
        assert.ok(dump.stderr.includes(reason), `${c.name}: ${dump.stderr}`);
      } else {
        const d = JSON.parse(dump.stdout);
        const said = full.trusted ? /^kept: / : c.name === 'algorithm' ? `refused: ${reason}` : `dropped: ${reason}`;
        assert.deepEqual([d.trusted, d['index-kept']], [full.trusted, full.trusted], `${c.name}: journal-dump`);
        if (typeof said === 'string') assert.equal(d['index-reason'], said, c.name);
        else assert.match(d['index-reason'], said, c.name);
      }
    }

    const check = json(['check', '--output', 'json', img]);
    assert.deepEqual([check.dedup.trusted, check.dedup.reason], [full.trusted, full.reason ?? undefined], `${c.name}: check`);

    // The write acts on the verdict, and says why (not -q: -q silences the notice).
    const copy = `${img}.write.qcow2`;
    copyFileSync(img, copy);
    const w = qdedup(['write', '-P', '0x44', copy, '4M', '64k']);
    if (c.name === 'algorithm') {
      assert.equal(w.status, 1, `${c.name}: refused`);
      assert.ok(w.stderr.includes(reason), `${c.name}: ${w.stderr}`);
      assert.ok(readFileSync(copy).equals(readFileSync(img)), `${c.name}: nothing written`);
      continue;
    }
    assert.equal(w.status, 0, `${c.name}: ${w.stderr}`);
    if (full.trusted) assert.equal(w.stderr, '', 'a trusted index is kept without a word');
    else assert.ok(w.stderr.includes(`dedup index not trusted: ${reason}; `) && w.stderr.includes('starting a fresh index'), `${c.name}: ${w.stderr}`);
    assert.equal(json(['info', '--output', 'json', copy])['format-specific'].data.dedup.trusted, true, `${c.name}: trusted after the write`);
  }
  assert.deepEqual(
    [...seen].filter((n) => n !== 'trusted').sort(),
    DISTRUST_REASONS.filter((r) => r !== 'store').sort(),
    'every reason a file can reach is exercised',
  );
});
