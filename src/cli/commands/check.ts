// `qdedup check`: the consistency check of qemu-img check, with its output and exit codes
// (../format-check.ts). The summary goes to stdout (human or JSON, nothing under -q), each
// problem line to stderr as it is found. Exit codes: 0 clean, 1 check not completed,
// 2 corruptions, 3 leaks only, 63 not a QCOW2 image; after -r they describe the repaired image.
// On a dedup image the check also covers the dedup store (src/dedup/inspect.ts).

import type { Argv } from 'yargs';
import { UsageError, printable } from '../../errors.ts';
import { catchInterrupts, throwIfInterrupted } from '../interrupt.ts';
import { checkImage, type ImageCheck, type RepairMode } from '../../image/check-image.ts';
import { dedupCheckExtension } from '../../dedup/inspect.ts';
import {
  checkFormat,
  outputFormat,
  readOnlyLock,
  refuseForceShare,
  withForceShareOption,
  withFormatOption,
  withOutputOption,
  withQuietOption,
} from '../common.ts';
import type { OutputFormat } from '../common.ts';
import { LOCK_READ, LOCK_WRITE } from '../../image/image-lock.ts';
import { quietKeeps, reportCheck, reportUncheckable } from '../format-check.ts';
import type { Output } from '../output.ts';

export interface CheckArgs {
  file: string;
  output: OutputFormat;
  quiet: boolean;
  repair?: RepairMode;
  /** Also hash every indexed cluster and compare with its index entry. */
  deep: boolean;
  /** -U: check even while another process writes the image (not with -r). */
  forceShare?: boolean;
}

export async function runCheck(a: CheckArgs, io: Output): Promise<number> {
  let result: ImageCheck;
  // A repair finishes what it began when interrupted (a signal mid-rewrite of refcount
  // structures would leave more to repair); a plain check just ends (read-only).
  const interrupts = a.repair
    ? catchInterrupts((sig) => io.err(`qdedup: ${printable(a.file)}: ${sig} received: finishing the repair first (a second signal ends qdedup at once)`))
    : undefined;
  try {
    const lock = a.repair !== undefined ? LOCK_WRITE : readOnlyLock(LOCK_READ, a.forceShare);
    // A line may quote names from the image (snapshot names): escaped, it stays one line.
    const onMessage = (line: string) => {
      if (!a.quiet || quietKeeps(line)) io.err(printable(line));
    };
    result = await checkImage(a.file, { lock, repair: a.repair, onMessage, extension: (image) => dedupCheckExtension(image, a.deep) });
  } catch (err) {
    return reportUncheckable(err, a.file, io);
  } finally {
    interrupts?.dispose();
  }
  if (interrupts) throwIfInterrupted(interrupts, " during the repair, which was completed first; run 'qdedup check' again for the result", a.file);
  return reportCheck(result, a.output, a.quiet, io);
}

export function builder(y: Argv) {
  return withForceShareOption(withQuietOption(withOutputOption(withFormatOption(y))))
    .positional('file', { type: 'string', describe: 'image file' })
    .option('r', {
      alias: 'repair',
      type: 'string',
      requiresArg: true,
      describe: "repair: 'leaks' (leaked clusters only) or 'all' (also corruptions, rebuilding refcounts if needed; drops a bad dedup index)",
    })
    .option('deep', { type: 'boolean', default: false, describe: 'dedup images: also read every indexed cluster and check that it hashes to its index entry' })
    .example('$0 check disk.qcow2', 'report problems; exit 0 clean, 2 corruptions, 3 leaks only')
    .example('$0 check -r leaks disk.qcow2', 'give leaked clusters back')
    .example('$0 check --output json disk.qcow2', "qemu-img check's JSON document")
    .example('$0 check --deep disk.qcow2', 'also verify every dedup index entry against the cluster it names')
    .epilogue(
      'Exit codes: 0 consistent, 1 check not completed, 2 corruptions found, 3 only leaks found, 63 not a qcow2 image. After -r they describe the ' +
        'repaired image.',
    );
}

export function toArgs(argv: Record<string, unknown>): CheckArgs {
  checkFormat(argv.f);
  const r = argv.r;
  if (r !== undefined && r !== 'leaks' && r !== 'all') {
    throw new UsageError(`Unknown option for -r (expecting 'leaks' or 'all'): ${String(r)}`);
  }
  if (r !== undefined) refuseForceShare(argv.U, 'with -r');
  return {
    file: String(argv.file),
    output: outputFormat(argv.output),
    quiet: Boolean(argv.quiet),
    repair: r as RepairMode | undefined,
    deep: Boolean(argv.deep),
    forceShare: Boolean(argv.U),
  };
}

export const run = runCheck;
