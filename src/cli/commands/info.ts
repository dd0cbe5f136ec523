// `qdedup info`: what the image is, with qemu-img info's keys, meanings and layout, the
// internal snapshot list included. The document and its text: ../format-info.ts.

import type { Argv } from 'yargs';
import { checkFormat, outputFormat, readOnlyLock, withForceShareOption, withFormatOption, withOutputOption, type OutputFormat } from '../common.ts';
import { LOCK_INFO } from '../../image/image-lock.ts';
import { toJson, type Output } from '../output.ts';
import { imageInfo, infoText } from '../format-info.ts';

export interface InfoArgs {
  file: string;
  output: OutputFormat;
  /** -U: take no image locks (qemu-img info -U). */
  forceShare?: boolean;
}

export async function runInfo(a: InfoArgs, io: Output): Promise<number> {
  const info = await imageInfo(a.file, readOnlyLock(LOCK_INFO, a.forceShare));
  await io.out(a.output === 'json' ? toJson(info) : infoText(info));
  return 0;
}

export function builder(y: Argv) {
  return withForceShareOption(withOutputOption(withFormatOption(y)))
    .positional('file', { type: 'string', describe: 'image file' })
    .example('$0 info disk.qcow2', 'human-readable summary')
    .example('$0 info --output json disk.qcow2 | jq \'."virtual-size"\'', 'one field for a script');
}

export function toArgs(argv: Record<string, unknown>): InfoArgs {
  checkFormat(argv.f);
  return { file: String(argv.file), output: outputFormat(argv.output), forceShare: Boolean(argv.U) };
}
export const run = runInfo;
