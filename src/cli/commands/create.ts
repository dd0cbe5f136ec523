// `qdedup create`: a new, empty QCOW2 image. Options follow `qemu-img create -o`.

import type { Argv } from 'yargs';
import { InterruptedError, UsageError } from '../../errors.ts';
import { catchInterrupts } from '../interrupt.ts';
import { createImage, type CreateOptions } from '../../dedup/open.ts';
import { Image, probeFormat } from '../../image/image.ts';
import { checkFormat, withFormatOption, withQuietOption } from '../common.ts';
import { parseBool, parseOptionList, parseSize } from '../parse.ts';
import type { Output } from '../output.ts';
import { isAbsolute, resolve, dirname } from 'node:path';
import { defaultDedupSettings, maxStoreOrder, type DedupSettings } from '../../dedup/dedup.ts';
import { parseHashAlgorithm } from '../../dedup/hasher.ts';
import { MAX_STORE_ORDER } from '../../format/dedup-ext.ts';

/** The `-o` keys `create` accepts, with their help text (printed by `-o help`). */
export const CREATE_OPTIONS: [string, string, string][] = [
  ['backing_file', 'str', 'File name of a base image'],
  ['backing_fmt', 'str', 'Image format of the base image (qcow2 or raw)'],
  ['cluster_size', 'size', 'qcow2 cluster size, a power of two from 512 to 2M (default 65536)'],
  ['compat', 'str', 'Compatibility level (v2 [0.10] or v3 [1.1], default 1.1)'],
  ['dedup', 'str', 'Inline deduplication hash: sha256 (default), sha3-256, blake3 or off'],
  ['dedup_journal_block', 'size', 'Dedup journal block size, a power of two from 512 to 64k (default 4096)'],
  ['dedup_max_incarnations', 'num', 'Frozen log stores kept before the oldest is forgotten (0 = unlimited, default)'],
  ['dedup_order', 'num', 'Log store size: 2^N buckets of 4 hashes, 0 to 20 and at most log2(disk clusters / 2) (default: about 1/128 of the disk; RAM ≈ 49 bytes × 2^N × 4 per log store)'],
  ['dedup_verify', 'bool (on/off)', 'Compare bytes before linking a duplicate (default off)'],
  ['lazy_refcounts', 'bool (on/off)', 'Postpone refcount updates (compatible feature bit; v3 only)'],
  ['refcount_bits', 'num', 'Width of a reference count entry in bits: 1, 2, 4, 8, 16, 32 or 64 (default 16)'],
  ['size', 'size', 'Virtual disk size'],
];

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
    let text = 'Supported options:\n';
    for (const [name, type, help] of CREATE_OPTIONS) text += `  ${name}=<${type}>${' '.repeat(Math.max(1, 24 - name.length - type.length))}- ${help}\n`;
    await io.out(text);
    return 0;
  }
  if (!a.file) throw new UsageError('Expecting image file name');
  for (const key of opts.keys()) {
    if (!CREATE_OPTIONS.some(([name]) => name === key)) throw new UsageError(`Invalid parameter '${key}'`);
  }
  const compat = opts.get('compat') ?? '1.1';
  let version: 2 | 3;
  if (compat === '0.10' || compat === 'v2') version = 2;
  else if (compat === '1.1' || compat === 'v3') version = 3;
  else throw new UsageError(`Invalid compatibility level: '${compat}' (0.10 or 1.1)`);

  // Dedup is on unless turned off, and then clusters default to 4 KiB (more duplicates).
  const dedupOn = opts.get('dedup') !== 'off' && (opts.has('dedup') || (version === 3 && (!opts.has('refcount_bits') || Number(opts.get('refcount_bits')) >= 4)));
  const clusterSize = opts.has('cluster_size') ? parseSize(opts.get('cluster_size')!, 'cluster size') : dedupOn ? 4096 : 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) throw new UsageError('Cluster size must be a power of two between 512 and 2048k');

  const refcountBits = opts.has('refcount_bits') ? Number(opts.get('refcount_bits')) : 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) throw new UsageError('Refcount width must be a power of two and may not exceed 64 bits');
  if (version === 2 && refcountBits !== 16) throw new UsageError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1)');

  const lazyRefcounts = opts.has('lazy_refcounts') ? parseBool(opts.get('lazy_refcounts')!, 'lazy_refcounts') : false;
  if (lazyRefcounts && version === 2) throw new UsageError('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1)');

  const backingFile = a.backing ?? opts.get('backing_file');
  let backingFormat = a.backingFormat ?? opts.get('backing_fmt');
  if (backingFormat !== undefined && backingFormat !== 'qcow2' && backingFormat !== 'raw') throw new UsageError(`backing format '${backingFormat}' is not supported (qcow2 or raw)`);
  if (backingFormat !== undefined && backingFile === undefined) throw new UsageError('a backing format was given without a backing file');

  const sizeText = a.size ?? opts.get('size');
  let size: number | undefined = sizeText !== undefined ? parseSize(sizeText, 'image size') : undefined;
  if (backingFile !== undefined) {
    // Like qemu-img: the name is stored as given, resolved against the new image's folder.
    const backingPath = isAbsolute(backingFile) ? backingFile : resolve(dirname(a.file), backingFile);
    backingFormat ??= await probeFormat(backingPath);
    if (size === undefined) {
      if (backingFormat === 'qcow2') {
        const base = await Image.open(backingPath);
        size = base.size;
        await base.close();
      } else {
        const { RawImage } = await import('../../image/image.ts');
        const base = await RawImage.open(backingPath);
        size = base.size;
        await base.close();
      }
    }
  }
  if (size === undefined) throw new UsageError('Image creation needs a size parameter');

  const dedup = dedupSettings(opts, version, refcountBits, size, 2 ** clusterBits);
  const o: CreateOptions = { size, clusterBits, version, refcountOrder, lazyRefcounts, backingFile, backingFormat, force: a.force, dedup };
  // Interrupted, create finishes first (it takes well under a second): a dedup image is
  // made in two steps, and a signal between them would leave a plain image.
  const interrupts = catchInterrupts();
  let header;
  try {
    header = await createImage(a.file, o);
  } finally {
    interrupts.dispose();
  }
  if (interrupts.received) throw new InterruptedError(interrupts.received, `interrupted (${interrupts.received}); the image was created completely first`, { path: a.file });
  if (!a.quiet) {
    const backing = backingFile !== undefined ? ` backing_file=${backingFile} backing_fmt=${backingFormat}` : '';
    const dd = dedup ? ` dedup=${dedup.algorithm} dedup_verify=${dedup.verify ? 'on' : 'off'}` : ' dedup=off';
    await io.out(`Formatting '${a.file}', fmt=qcow2 cluster_size=${clusterSize} compat=${version === 3 ? '1.1' : '0.10'}${backing} size=${header.size} lazy_refcounts=${lazyRefcounts ? 'on' : 'off'} refcount_bits=${refcountBits}${dd}\n`);
  }
  return 0;
}

/**
 * The dedup settings from the -o list, or undefined for a plain image. Dedup defaults to
 * sha256 on v3 images with refcounts of 4 bits or more (it needs an autoclear bit and room
 * to count shared clusters); asking for it explicitly where it cannot be is an error.
 */
function dedupSettings(opts: Map<string, string>, version: 2 | 3, refcountBits: number, size: number, clusterSize: number): DedupSettings | undefined {
  const name = opts.get('dedup');
  const dedupKeys = [...opts.keys()].filter((k) => k.startsWith('dedup_'));
  if (name === 'off') {
    if (dedupKeys.length) throw new UsageError(`'${dedupKeys[0]}' needs dedup on (dedup=off was given)`);
    return undefined;
  }
  if (name === undefined && (version === 2 || refcountBits < 4)) {
    if (dedupKeys.length) throw new UsageError(`'${dedupKeys[0]}' needs dedup, which needs compat=1.1 and refcount_bits of 4 or more`);
    return undefined;
  }
  if (version === 2) throw new UsageError('dedup needs compatibility level 1.1 (use compat=1.1 or dedup=off)');
  if (refcountBits < 4) throw new UsageError('dedup needs refcount_bits of 4 or more (or dedup=off)');
  const d = defaultDedupSettings(size, clusterSize);
  const algorithm = name === undefined ? d.algorithm : parseHashAlgorithm(name);
  const verify = opts.has('dedup_verify') ? parseBool(opts.get('dedup_verify')!, 'dedup_verify') : d.verify;
  const maxIncarnations = opts.has('dedup_max_incarnations') ? parseCount(opts.get('dedup_max_incarnations')!, 'dedup_max_incarnations', 0, 0xffffffff) : d.maxIncarnations;
  const order = opts.has('dedup_order') ? parseCount(opts.get('dedup_order')!, 'dedup_order', 0, MAX_STORE_ORDER) : d.order;
  const maxOrder = maxStoreOrder(size, clusterSize);
  if (order > maxOrder) {
    // A log store larger than the disk can fill is never frozen: it only costs RAM and file space.
    const clusters = Math.ceil(size / clusterSize);
    throw new UsageError(`dedup_order ${order} is too large for this disk (${clusters} clusters of ${clusterSize} bytes): the largest is ${maxOrder} (a log store of 2^${maxOrder} × 4 slots, at most twice the disk's clusters)`);
  }
  const journalBlockSize = opts.has('dedup_journal_block') ? parseSize(opts.get('dedup_journal_block')!, 'dedup journal block size') : d.journalBlockSize;
  if (journalBlockSize < 512 || journalBlockSize > 65536 || (journalBlockSize & (journalBlockSize - 1)) !== 0) throw new UsageError('dedup_journal_block must be a power of two from 512 to 64k');
  return { algorithm, verify, maxIncarnations, order, journalBlockSize };
}

function parseCount(text: string, what: string, min: number, max: number): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || n < min || n > max) throw new UsageError(`${what} must be a whole number from ${min} to ${max}, not '${text}'`);
  return n;
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
