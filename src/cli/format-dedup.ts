// `qdedup dedup`'s output: what an offline pass (src/dedup/offline.ts) shared and released,
// as a JSON document or as human lines, with a warning when holes could not be punched.

import type { OfflineResult } from '../dedup/offline.ts';
import type { OutputFormat } from './common.ts';
import { toJson, type Output } from './output.ts';
import { humanSize } from './parse.ts';

/** The JSON document of `dedup --output json` (documented in docs/COMMANDS.md "dedup"). */
function offlineDedupJson(r: OfflineResult): Record<string, unknown> {
  return {
    'dedup-enabled': r.enabled,
    'index-notice': r.notice,
    clusters: r.clusters,
    linked: r.linked,
    stored: r.stored,
    'zero-clusters': r.zero,
    'punched-clusters': r.discard.punched,
    'truncated-clusters': r.discard.truncated,
    'holes-supported': r.discard.holesSupported,
    'bytes-before': r.bytesBefore,
    'bytes-after': r.bytesAfter,
    'bytes-released': r.bytesReleased,
    compressed: r.compressed,
    interrupted: r.interrupted,
  };
}

/** Prints the result of the pass over `file`: the JSON document, or (unless -q) the human lines. */
export async function reportOfflineDedup(file: string, r: OfflineResult, output: OutputFormat, quiet: boolean, io: Output): Promise<void> {
  if (output === 'json') return io.out(toJson(offlineDedupJson(r)));
  if (quiet) return;
  if (r.enabled) await io.out(`Deduplication turned on for ${file}\n`);
  await io.out(
    `${r.clusters} clusters read: ${r.linked} linked to a copy, ${r.stored} stored as the indexed copy${r.compressed ? ' (compressed)' : ''}, ${r.zero} made zero clusters\n`,
  );
  await io.out(
    `Released ${humanSize(r.bytesReleased)}: the file takes ${humanSize(r.bytesAfter)} on disk (was ${humanSize(r.bytesBefore)}); ` +
      `${r.discard.punched} free clusters punched, ${r.discard.truncated} cut off the end\n`,
  );
  if (!r.discard.holesSupported) io.err(`qdedup: ${file}: the file system cannot punch holes: free clusters inside the file were left in place`);
}
