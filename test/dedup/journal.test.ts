import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Journal, replayJournal } from '../../src/dedup/journal.ts';
import { MemFile } from '../doubles/mem-file.ts';
import type { JournalEntry } from '../../src/format/journal-block.ts';

const entry = (i: number, deleted = false): JournalEntry => ({ hash: Buffer.alloc(32, i), hostOffset: 4096 * (i + 1), firstGuestOffset: 512 * i, deleted });
/** Journal.append of an entry object. */
const append = (j: Journal, e: JournalEntry) => j.append(e.hash, 0, e.hostOffset, e.firstGuestOffset, e.deleted);
const strip = (es: JournalEntry[]) => es.map(({ offsetInBlock, ...e }) => e);
const desc = { offset: 8192, blocks: 8, startSequence: 100, written: 0 };

test('appended entries replay in order, across full and partly filled blocks', async () => {
  const file = new MemFile();
  const j = new Journal(file, desc, 512); // 9 entries a block
  const written: JournalEntry[] = [];
  for (let i = 0; i < 12; i++) {
    append(j, entry(i));
    written.push(entry(i));
  }
  await j.flush(); // block 0 full, block 1 holds 3
  assert.equal(j.blocksUsed, 3); // the 3 pending entries will go to block 2
  append(j, entry(5, true));
  written.push(entry(5, true));
  await j.flush(); // block 2: entries 9, 10, 11 again, then the deletion
  const r = await replayJournal(file, desc, 512);
  assert.equal(r.stop.block, 3);
  assert.equal(r.stop.verdict, 'empty');
  // Replay sees the re-written entries twice; applying them in order gives the same state.
  assert.deepEqual(strip(r.entries), [...written.slice(0, 12), ...written.slice(9, 13)]);
});

test('a torn block stops replay there; nothing after it is used', async () => {
  const file = new MemFile();
  const j = new Journal(file, desc, 512);
  for (let i = 0; i < 27; i++) append(j, entry(i)); // blocks 0, 1, 2 full
  await j.flush();
  const bytes = file.bytes();
  bytes.fill(0, 8192 + 512 + 100, 8192 + 1024); // tear block 1 after byte 100
  const r = await replayJournal(new MemFile('torn', bytes), desc, 512);
  assert.deepEqual([r.stop.block, r.stop.verdict], [1, 'bad-checksum']);
  assert.equal(r.entries.length, 9);
});

test('blocks from an earlier use of the area are stale: the sequence number stops replay', async () => {
  const file = new MemFile();
  const old = new Journal(file, desc, 512);
  for (let i = 0; i < 27; i++) append(old, entry(i));
  await old.flush();
  const reset = { ...desc, startSequence: desc.startSequence + 3 }; // reset after 3 blocks
  const fresh = new Journal(file, reset, 512);
  append(fresh, entry(99));
  await fresh.flush();
  const r = await replayJournal(file, reset, 512);
  assert.deepEqual(strip(r.entries), [entry(99)]);
  assert.deepEqual([r.stop.block, r.stop.verdict], [1, 'bad-sequence']);
});

test('the journal refuses to overflow its blocks', async () => {
  const j = new Journal(new MemFile(), { offset: 0, blocks: 2, startSequence: 0, written: 0 }, 512);
  for (let i = 0; i < 18; i++) append(j, entry(i));
  assert.ok(j.wouldOverflow(1));
  assert.throws(() => append(j, entry(18)), RangeError);
  const r = await replayJournal(new MemFile(), { offset: 0, blocks: 2, startSequence: 0, written: 0 }, 512);
  assert.deepEqual([r.entries.length, r.stop.verdict], [0, 'empty']);
});
