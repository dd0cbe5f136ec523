// `qdedup check`'s output: qemu-img check's JSON document and human summary for an
// ImageCheck (src/image/check-image.ts), the repair summary, which problem lines -q keeps,
// and the one-line error of a check that could not start. On a dedup image the JSON gains a
// "dedup" object (after qemu-img's keys), the human output a "Dedup index:" line.
//
// Like qemu-img, a check that cannot open the image prints no JSON document (only the
// error on stderr), unlike the other commands' {"error": …}; scripts can rely on stdout
// holding either a complete check result or nothing.

import type { ChalkInstance } from 'chalk';
import { InternalError, NotQcow2Error, QdedupError, printable } from '../errors.ts';
import { checkExitCode, type ImageCheck } from '../image/check-image.ts';
import type { DedupCheckSummary } from '../dedup/inspect.ts';
import type { OutputFormat } from './common.ts';
import { errorPrefix, type Output } from './output.ts';

/** Exit code for "this file cannot be checked" (qemu-img: the format has no checks). */
export const EXIT_CANNOT_CHECK = 63;

/** The `dedup` object of the JSON document, or undefined for a plain image. */
export function dedupJson(r: ImageCheck): DedupCheckSummary | undefined {
  if (!r.extension || r.extension.key !== 'dedup') return undefined;
  const d = r.extension.summary as unknown as DedupCheckSummary;
  return {
    trusted: d.trusted,
    ...(d.reason !== undefined ? { reason: d.reason } : {}),
    deep: d.deep,
    'entries-checked': d['entries-checked'],
    'bad-entries': d['bad-entries'],
    ...(r.extension.dropped ? { 'index-dropped': true } : {}),
  };
}

/** The human line about the dedup index, or '' for a plain image. */
export function dedupHuman(r: ImageCheck): string {
  const d = dedupJson(r);
  if (!d) return '';
  if (d['index-dropped']) return 'Dedup index: dropped by the repair (autoclear bit 60 cleared); the next write starts a fresh index.\n';
  if (!d.trusted) return `Dedup index: not trusted (${d.reason}); the holder snapshot keeps its clusters until the next write releases them.\n`;
  const what = `${d['entries-checked']} entries checked${d.deep ? ', content hashes verified' : ''}`;
  return `Dedup index: ${what}, ${d['bad-entries'] ? `${d['bad-entries']} bad` : 'no errors'}.\n`;
}

/**
 * The JSON document of `check --output json`: qemu-img's ImageCheck keys, in the order
 * qemu-img 7.2 prints them (its dictionary order), counters left out when 0.
 */
export function checkJson(r: ImageCheck): Record<string, string | number> {
  const out: Record<string, string | number> = {};
  const optional = (key: string, value: number) => {
    if (value) out[key] = value;
  };
  optional('image-end-offset', r.imageEndOffset);
  optional('compressed-clusters', r.compressedClusters);
  optional('total-clusters', r.totalClusters);
  optional('corruptions', r.corruptions);
  optional('corruptions-fixed', r.corruptionsFixed);
  out['check-errors'] = r.checkErrors;
  optional('leaks', r.leaks);
  optional('leaks-fixed', r.leaksFixed);
  optional('allocated-clusters', r.allocatedClusters);
  out.filename = r.filename;
  out.format = r.format;
  optional('fragmented-clusters', r.fragmentedClusters);
  return out;
}

/** checkJson plus, on a dedup image, the "dedup" object (last, after qemu-img's keys). */
function checkDocument(r: ImageCheck): Record<string, unknown> {
  const out: Record<string, unknown> = checkJson(r);
  const d = dedupJson(r);
  if (d) out.dedup = d;
  return out;
}

/**
 * C's printf("%.2f", v) for v ≥ 0. toFixed rounds an exact tie (a double ending in .xx5,
 * which only multiples of 1/8 can be: 3.125) away from zero; glibc rounds it to even, so
 * qemu-img prints 1/32 as 3.12 where toFixed gave 3.13.
 */
export function printf2(v: number): string {
  const thousandths = v * 1000;
  if (Number.isInteger(v * 8) && Number.isInteger(thousandths) && thousandths % 10 === 5) {
    const below = (thousandths - 5) / 10; // in hundredths
    return ((below % 2 === 0 ? below : below + 1) / 100).toFixed(2);
  }
  return v.toFixed(2);
}

/** qemu-img's dump_human_image_check; with `color`, the verdicts green (clean), yellow (leaks) and red (corruptions, errors). */
export function checkHuman(r: ImageCheck, color?: ChalkInstance): string {
  const paint = (style: 'green' | 'yellow' | 'red', line: string) => (color ? color[style].bold(line) : line);
  let text = '';
  if (!(r.corruptions || r.leaks || r.checkErrors)) {
    text += paint('green', 'No errors were found on the image.') + '\n';
  } else {
    if (r.corruptions)
      text +=
        `\n${paint('red', `${r.corruptions} errors were found on the image.`)}\nData may be corrupted, or further writes to the ` + 'image may corrupt it.\n';
    if (r.leaks) text += `\n${paint('yellow', `${r.leaks} leaked clusters were found on the image.`)}\nThis means waste of disk space, but no harm to data.\n`;
    if (r.checkErrors) text += `\n${paint('red', `${r.checkErrors} internal errors have occurred during the check.`)}\n`;
  }
  if (r.totalClusters !== 0 && r.allocatedClusters !== 0) {
    const pct = (n: number, d: number) => printf2((n * 100) / d);
    text +=
      `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ` +
      `${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters\n`;
  }
  if (r.imageEndOffset) text += `Image end offset: ${r.imageEndOffset}\n`;
  return text;
}

/** The block qemu-img prints between the repair and the check of the repaired image. */
export function repairSummary(repaired: { leaksFixed: number; corruptionsFixed: number }): string {
  return (
    'The following inconsistencies were found and repaired:\n\n' +
    `    ${repaired.leaksFixed} leaked clusters\n` +
    `    ${repaired.corruptionsFixed} corruptions\n\n` +
    'Double checking the fixed image now...\n'
  );
}

/**
 * Under -q, the lines that only tell what a repair is doing ("Repairing …", "Rebuilding
 * refcount structure") and leaks (exit code 3 says it) are left out; "ERROR …" lines stay.
 * (qemu-img check -q prints them all: its driver writes them to stderr unconditionally.)
 */
export function quietKeeps(line: string): boolean {
  return !/^(Repairing|Rebuilding|Leaked cluster)\b/.test(line);
}

/**
 * Prints the result of a completed check (the repair summary, the document unless -q, the
 * failure line) and returns the exit code: 0 clean, 1 not completed, 2 corruptions, 3 leaks.
 */
export async function reportCheck(result: ImageCheck, output: OutputFormat, quiet: boolean, io: Output): Promise<number> {
  if (result.repaired && output === 'human' && !quiet) await io.out(repairSummary(result.repaired));
  if (result.failure === undefined && !quiet) {
    await io.out(output === 'json' ? JSON.stringify(checkDocument(result), null, 4) + '\n' : checkHuman(result, io.outColor) + dedupHuman(result));
  }
  if (result.failure !== undefined) io.err(`${errorPrefix(io)} Check failed: ${result.failure}`);
  else if (result.checkErrors) io.err(`${errorPrefix(io)} Check failed`);
  return checkExitCode(result);
}

/**
 * A check that could not open or read `file`: a one-line error, no result document (as
 * qemu-img), and the exit code (EXIT_CANNOT_CHECK for a file that is not QCOW2). Anything
 * but a QdedupError (or an InternalError) is thrown on.
 */
export function reportUncheckable(err: unknown, file: string, io: Output): number {
  if (!(err instanceof QdedupError) || err instanceof InternalError) throw err;
  io.err(`${errorPrefix(io)} ${printable(err.details.path ?? file)}: ${printable(err.message)}`);
  return err instanceof NotQcow2Error ? EXIT_CANNOT_CHECK : err.exitCode;
}
