// `qdedup create`: a new, empty QCOW2 image. Options follow `qemu-img create -o`; their
// defaults and validation: src/dedup/create-options.ts.

import type { Argv } from 'yargs';
import { InterruptedError } from '../../errors.ts';
import { catchInterrupts } from '../interrupt.ts';
import { createOptionsHelp, resolveCreateOptions } from '../../dedup/create-options.ts';
import { createImage } from '../../dedup/open.ts';
import { checkFormat, withFormatOption, withQuietOption } from '../common.ts';
import { parseBool, parseOptionList, parseSize } from '../parse.ts';
import type { Output } from '../output.ts';
import type { Header } from '../../format/header.ts';

export interface CreateArgs {
  file: string;
  size?: string;
  options: string[];
  backing?: string;
  backingFormat?: string;
  force: boolean;
  quiet: boolean;
}

export async function runCreate(a: CreateArgs, io: Output): Promise<number> {
  const opts = parseOptionList(a.options);
  if (opts.has('help')) {
    await io.out(createOptionsHelp(opts));
    return 0;
  }
  const o = await resolveCreateOptions({ ...a, options: opts }, { size: parseSize, bool: parseBool });
  // Interrupted, create finishes first (it takes well under a second): a dedup image is
  // made in two steps, and a signal between them would leave a plain image.
  const interrupts = catchInterrupts();
  let header: Header;
  try {
    header = await createImage(a.file, o);
  } finally {
    interrupts.dispose();
  }
  if (interrupts.received)
    throw new InterruptedError(interrupts.received, `interrupted (${interrupts.received}); the image was created completely first`, { path: a.file });
  if (!a.quiet) {
    const backing = o.backingFile !== undefined ? ` backing_file=${o.backingFile} backing_fmt=${o.backingFormat}` : '';
    const dd = o.dedup ? ` dedup=${o.dedup.algorithm} dedup_verify=${o.dedup.verify ? 'on' : 'off'}` : ' dedup=off';
    await io.out(
      `Formatting '${a.file}', fmt=qcow2 cluster_size=${2 ** o.clusterBits} compat=${o.version === 3 ? '1.1' : '0.10'}${backing} ` +
        `size=${header.size} lazy_refcounts=${o.lazyRefcounts ? 'on' : 'off'} refcount_bits=${2 ** o.refcountOrder}${dd}\n`,
    );
  }
  return 0;
}

export function builder(y: Argv) {
  return withQuietOption(withFormatOption(y))
    .positional('file', { type: 'string', describe: 'image file to create' })
    .positional('size', { type: 'string', describe: 'virtual size (k, M, G, T, P, E suffixes: powers of 1024)' })
    .option('o', { type: 'string', array: true, nargs: 1, describe: 'options: KEY=VALUE[,KEY=VALUE…]; -o help lists them', default: [], requiresArg: true })
    .option('b', { type: 'string', describe: 'backing file', requiresArg: true })
    .option('F', { type: 'string', describe: 'backing file format (qcow2 or raw)', requiresArg: true })
    .option('force', { type: 'boolean', describe: 'replace an existing file', default: false })
    .example('$0 create disk.qcow2 10G', 'a 10 GiB dedup image (sha256, 4 KiB clusters)')
    .example('$0 create -o dedup=off disk.qcow2 10G', 'a plain image with 64 KiB clusters')
    .example('$0 create -o cluster_size=4k,compat=0.10 old.qcow2 1G', 'a v2 image with 4 KiB clusters')
    .example('$0 create -b base.qcow2 -F qcow2 overlay.qcow2', 'an overlay on a backing image')
    .example('$0 create -o help x 0', 'list the -o options');
}

export function toArgs(argv: Record<string, unknown>): CreateArgs {
  checkFormat(argv.f);
  return {
    file: argv.file === undefined ? '' : String(argv.file),
    size: argv.size === undefined ? undefined : String(argv.size),
    options: (argv.o as string[]) ?? [],
    backing: argv.b as string | undefined,
    backingFormat: argv.F as string | undefined,
    force: Boolean(argv.force),
    quiet: Boolean(argv.quiet),
  };
}
export const run = runCreate;
