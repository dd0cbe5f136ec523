// `qdedup map`: qemu-img map's ranges and output (src/image/map.ts), plus `shared-by` on
// each range with data (compressed ranges: per compressed copy, src/image/map-copies.ts), and
// with --shares OFFSET[,LENGTH] the guest ranges that share a range's storage. Read-only,
// with the locks `qemu-img map` takes (-U: none refused).

import type { Argv } from 'yargs';
import { UsageError } from '../../errors.ts';
import { Image } from '../../image/image.ts';
import { LOCK_READ } from '../../image/image-lock.ts';
import { pastTheEnd } from '../../image/guest-range.ts';
import { mapHumanRows, mapImage, mapJsonLine, mapShares, type MapEntry } from '../../image/map.ts';
import { dedupShareAccounting } from '../../dedup/sharing.ts';
import { checkFormat, outputFormat, readOnlyLock, withForceShareOption, withFormatOption, withOutputOption, type OutputFormat } from '../common.ts';
import { parseSize } from '../parse.ts';
import { errorPrefix, type Output } from '../output.ts';

export interface MapArgs {
  file: string;
  output: OutputFormat;
  start?: number;
  length?: number;
  /** --shares OFFSET[,LENGTH]: the guest range whose sharers are listed. */
  shares?: { offset: number; length?: number };
  forceShare?: boolean;
}

export async function runMap(a: MapArgs, io: Output): Promise<number> {
  const image = await Image.open(a.file, { lock: readOnlyLock(LOCK_READ, a.forceShare) });
  try {
    const accounting = await dedupShareAccounting(image);
    let entries: AsyncIterable<MapEntry> | MapEntry[];
    if (a.shares) {
      const { offset } = a.shares;
      const length = a.shares.length ?? Math.min(image.clusterSize, image.size - offset);
      if (offset >= image.size || offset + length > image.size) throw pastTheEnd(a.file, offset, length, image.size);
      entries = await mapShares(image, a.file, offset, length, accounting);
    } else {
      entries = mapImage(image, a.file, { start: a.start, length: a.length, sharing: true, accounting });
    }
    if (a.output === 'json') {
      // qemu-img's layout: "[" + one object a line, ",\n" between them, "]\n".
      const lines: string[] = [];
      for await (const e of entries) lines.push(mapJsonLine(e));
      await io.out(`[${lines.join(',\n')}]\n`);
      return 0;
    }
    const collected: MapEntry[] = [];
    for await (const e of entries) collected.push(e);
    const { rows, error } = mapHumanRows(collected, a.shares ? a.file : undefined);
    await io.out(rows.map((r) => r + '\n').join(''));
    if (error) {
      io.err(`${errorPrefix(io)} ${error}`);
      return 1;
    }
    return 0;
  } finally {
    await image.close();
  }
}

/** OFFSET[,LENGTH] of --shares. */
function parseShares(text: string): { offset: number; length?: number } {
  const [offset, length, extra] = text.split(',');
  if (extra !== undefined || offset === '') throw new UsageError(`--shares takes OFFSET[,LENGTH], not '${text}'`);
  return { offset: parseSize(offset, 'offset'), ...(length !== undefined ? { length: parseSize(length, 'length') } : {}) };
}

export function builder(y: Argv) {
  return withForceShareOption(withOutputOption(withFormatOption(y)))
    .positional('file', { type: 'string', describe: 'image file' })
    .option('start-offset', { type: 'string', requiresArg: true, describe: 'first guest byte to map (default 0)' })
    .option('max-length', { type: 'string', requiresArg: true, describe: 'bytes to map from --start-offset (default: to the end)' })
    .option('shares', {
      type: 'string',
      requiresArg: true,
      describe:
        'OFFSET[,LENGTH]: map only this guest range (LENGTH default: one cluster) and list, under each range with data, the guest ranges of the ' +
        'disk and of its snapshots that use the same host clusters (compressed ranges: the guest clusters naming the same compressed copies)',
    })
    .example('$0 map disk.qcow2', "qemu-img map's table, with a 'Shared by' column")
    .example('$0 map --output json disk.qcow2', 'qemu-img map\'s JSON; "shared-by": other guest clusters using the range\'s host clusters')
    .example('$0 map --shares 1M,64k disk.qcow2', 'which guest ranges share the storage of guest bytes 1M to 1M+64k')
    .epilogue(
      "shared-by counts, from the refcounts, the guest clusters other than the range's own (in the disk and its internal snapshots; the dedup " +
        "holder snapshot's reference excluded) that use the host clusters the range touches: 0 means the storage is the range's alone. Leaked references (see " +
        "'qdedup check') count too. On compressed ranges (no offset) it counts, for each cluster, the other guest clusters whose entries name the same " +
        "compressed copy. Over a range of several clusters the counts are added up; the ranges are qemu-img's.",
    );
}

export function toArgs(argv: Record<string, unknown>): MapArgs {
  checkFormat(argv.f);
  const start = argv['start-offset'] === undefined ? undefined : parseSize(String(argv['start-offset']), 'offset');
  const length = argv['max-length'] === undefined ? undefined : parseSize(String(argv['max-length']), 'length');
  const shares = argv.shares === undefined ? undefined : parseShares(String(argv.shares));
  if (shares && (start !== undefined || length !== undefined))
    throw new UsageError('--shares cannot be combined with --start-offset or --max-length (it ' + 'names its own range)');
  return { file: String(argv.file), output: outputFormat(argv.output), start, length, shares, forceShare: Boolean(argv.U) };
}

export const run = runMap;
