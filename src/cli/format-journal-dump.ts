// `qdedup journal-dump`'s output: the journals report of src/dedup/journal-scan.ts as a
// JSON document (documented in docs/COMMANDS.md "journal-dump") or as greppable text, one
// line per fact, block and entry; --limit caps the entries shown, never the counts.

import { hex } from '../errors.ts';
import type { JournalScan, JournalsReport, ScannedBlock } from '../dedup/journal-scan.ts';
import { entriesPerBlock } from '../format/journal-block.ts';

/** Entries to print for each block of a journal, at most `limit` in all. */
function shownEntries(scan: JournalScan, limit: number | undefined): { perBlock: Map<ScannedBlock, number>; omitted: number } {
  const perBlock = new Map<ScannedBlock, number>();
  let left = limit ?? Number.POSITIVE_INFINITY;
  let omitted = 0;
  for (const b of scan.blocks) {
    const n = Math.min(left, b.entries.length);
    perBlock.set(b, n);
    left -= n;
    omitted += b.entries.length - n;
  }
  return { perBlock, omitted };
}

/** The JSON document of `journal-dump --output json` (documented in docs/COMMANDS.md "journal-dump"). */
export function journalDumpJson(file: string, r: JournalsReport, limit?: number): Record<string, unknown> {
  return {
    filename: file,
    'hash-algorithm': r.algorithm,
    verify: r.ext.verify,
    trusted: r.trusted,
    'autoclear-bit': r.autoclearBit,
    dirty: r.dirty,
    'journal-block-size': r.ext.journalBlockSize,
    'entries-per-block': entriesPerBlock(r.ext.journalBlockSize),
    'config-offset': r.ext.configOffset,
    'config-size': r.ext.configBytes,
    'current-journal': r.config.currentJournal,
    'index-kept': r.indexKept,
    'index-reason': r.indexReason,
    journals: r.journals.map(({ index, role, scan }) => {
      const { perBlock, omitted } = shownEntries(scan, limit);
      return {
        index,
        role,
        offset: scan.desc.offset,
        'blocks-total': scan.desc.blocks,
        'start-sequence': scan.desc.startSequence,
        'replay-stop': { block: scan.stop.block, verdict: scan.stop.verdict, reason: scan.stop.reason },
        'blocks-replayed': scan.stop.block,
        'entries-replayed': scan.replayedEntries,
        insertions: scan.insertions,
        deletions: scan.deletions,
        'live-hashes': scan.liveHashes,
        'deleted-hashes': scan.deletedHashes,
        'entries-omitted': omitted,
        blocks: scan.blocks.map((b) => ({
          index: b.index,
          offset: b.fileOffset,
          'expected-sequence': b.expectedSequence,
          sequence: b.sequence,
          'checksum-valid': b.checksumValid,
          verdict: b.verdict,
          reason: b.reason,
          replayed: b.replayed,
          'entry-count': b.entries.length,
          entries: b.entries.slice(0, perBlock.get(b)).map((e) => ({
            'journal-offset': e.journalOffset,
            offset: b.fileOffset + e.offsetInBlock,
            type: e.type === 1 ? 'hash' : e.type,
            size: e.size,
            hash: e.hash,
            'host-offset': e.hostOffset,
            'guest-offset': e.firstGuestOffset,
            deleted: e.deleted,
          })),
        })),
      };
    }),
  };
}

/** The human report: one line per fact, per block and per entry (greppable). */
export function journalDumpText(file: string, r: JournalsReport, limit?: number): string {
  const yes = (b: boolean) => (b ? 'yes' : 'no');
  const lines = [
    `image: ${file}`,
    `dedup: ${r.algorithm}, verify ${r.ext.verify ? 'on' : 'off'}`,
    `trusted: ${yes(r.trusted)} (autoclear bit 60 ${r.autoclearBit ? 'set' : 'clear'}, dirty flag ${r.dirty ? 'set' : 'clear'})`,
    `journal block size: ${r.ext.journalBlockSize} bytes (${entriesPerBlock(r.ext.journalBlockSize)} hash entries a block)`,
    `configuration area: ${hex(r.ext.configOffset)}, ${r.ext.configBytes} bytes`,
    `index at the next write: ${r.indexReason}`,
  ];
  for (const { index, role, scan } of r.journals) {
    const { perBlock, omitted } = shownEntries(scan, limit);
    lines.push('');
    lines.push(`journal ${index} (${role}): offset ${hex(scan.desc.offset)}, ${scan.desc.blocks} blocks, start sequence ${scan.desc.startSequence}`);
    for (const b of scan.blocks) {
      const seq = b.sequence === null ? '-' : String(b.sequence);
      const tail = b.verdict === 'valid' ? `valid, ${b.entries.length} entries` : `${b.verdict}: ${b.reason}`;
      lines.push(
        `  block ${b.index} at ${hex(b.fileOffset)}: sequence ${seq} (expected ${b.expectedSequence}), checksum ` +
          `${b.checksumValid === null ? '-' : b.checksumValid ? 'ok' : 'bad'}, ${tail}${b.replayed ? '' : ', not replayed'}`,
      );
      for (const e of b.entries.slice(0, perBlock.get(b))) {
        lines.push(
          `    ${b.replayed ? 'entry' : 'ignored entry'} +${e.journalOffset} (${hex(b.fileOffset + e.offsetInBlock)}): ` +
            `${e.type === 1 ? 'hash' : `type ${e.type}`}, ${e.size} bytes, host ${hex(e.hostOffset)}, guest ${hex(e.firstGuestOffset)}, deleted ` +
            `${yes(e.deleted)}, hash ${e.hash}`,
        );
      }
    }
    if (omitted) lines.push(`    … ${omitted} more entries not shown (--limit ${limit})`);
    lines.push(`  replay stops at block ${scan.stop.block}: ${scan.stop.verdict} (${scan.stop.reason})`);
    lines.push(
      `  replayed: ${scan.stop.block} blocks, ${scan.replayedEntries} entries (${scan.insertions} insertions, ${scan.deletions} deletions), ` +
        `${scan.liveHashes} live hashes, ${scan.deletedHashes} deleted`,
    );
  }
  return lines.join('\n') + '\n';
}
