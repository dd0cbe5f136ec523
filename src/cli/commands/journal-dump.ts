// `qdedup journal-dump`: shows a dedup image's two journals (current and frozen log store)
// block by block and entry by entry, and where replay stops and why. Read-only: the image
// is opened read-only and never written. The scan: src/dedup/journal-scan.ts; the output:
// ../format-journal-dump.ts.

import type { Argv } from 'yargs';
import { UsageError } from '../../errors.ts';
import { readImageJournals } from '../../dedup/journal-scan.ts';
import { checkFormat, outputFormat, readOnlyLock, withForceShareOption, withFormatOption, withOutputOption, type OutputFormat } from '../common.ts';
import { LOCK_READ } from '../../image/image-lock.ts';
import { journalDumpJson, journalDumpText } from '../format-journal-dump.ts';
import { toJson, type Output } from '../output.ts';

export interface JournalDumpArgs {
  file: string;
  output: OutputFormat;
  /** Most entries printed per journal; undefined = all. */
  limit?: number;
  /** -U: read even while another process writes the image. */
  forceShare?: boolean;
}

export async function runJournalDump(a: JournalDumpArgs, io: Output): Promise<number> {
  const report = await readImageJournals(a.file, readOnlyLock(LOCK_READ, a.forceShare));
  await io.out(a.output === 'json' ? toJson(journalDumpJson(a.file, report, a.limit)) : journalDumpText(a.file, report, a.limit));
  return 0;
}

export function builder(y: Argv) {
  return withForceShareOption(withOutputOption(withFormatOption(y)))
    .positional('file', { type: 'string', describe: 'image file' })
    .option('limit', { type: 'string', describe: 'print at most N entries per journal (counts stay complete)', requiresArg: true })
    .example('$0 journal-dump disk.qcow2 | grep "replay stops"', 'where replay stops in each journal')
    .example('$0 journal-dump --output json disk.qcow2 | jq \'.journals[]."entries-replayed"\'', 'entries replayed per journal');
}

export function toArgs(argv: Record<string, unknown>): JournalDumpArgs {
  checkFormat(argv.f);
  let limit: number | undefined;
  if (argv.limit !== undefined) {
    const s = String(argv.limit);
    if (!/^\d+$/.test(s) || !Number.isSafeInteger(Number(s))) throw new UsageError(`--limit must be a whole number of entries, not '${s}'`);
    limit = Number(s);
  }
  return { file: String(argv.file), output: outputFormat(argv.output), limit, forceShare: Boolean(argv.U) };
}
export const run = runJournalDump;
