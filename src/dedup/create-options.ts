// The options of a new image (`qdedup create -o …`, qemu-img's keys and messages): which
// keys exist, their defaults for the image being made (`-o help`), and their validation into
// the CreateOptions of ./open.ts createImage. The caller supplies the parsers of its syntax
// (sizes with suffixes, on/off), so the rules live here and the CLI only parses and prints.

import { UsageError } from '../errors.ts';
import { MAX_INCARNATIONS, MAX_STORE_ORDER, validJournalBlockSize } from '../format/dedup-ext.ts';
import { MAX_CLUSTER_BITS, MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS, V2_REFCOUNT_ORDER } from '../format/header.ts';
import { MAX_JOURNAL_BLOCK, MIN_JOURNAL_BLOCK } from '../format/journal-block.ts';
import { DEFAULT_CLUSTER_BITS, DEFAULT_REFCOUNT_ORDER } from '../image/create.ts';
import { Image } from '../image/image.ts';
import { RawImage, probeFormat } from '../image/guest-reader.ts';
import { isAbsolute, resolve, dirname } from 'node:path';
import { DEDUP_CLUSTER_BITS, DEFAULT_JOURNAL_BLOCK, MIN_DEDUP_REFCOUNT_ORDER, defaultDedupSettings, maxStoreOrder, type DedupSettings } from './dedup.ts';
import { parseHashAlgorithm } from './hash-algorithms.ts';
import type { CreateOptions } from './open.ts';

/** The parsers of the caller's syntax; each throws UsageError naming `what`. */
export interface OptionParsers {
  size(text: string, what: string): number;
  bool(text: string, what: string): boolean;
}

/** What a create request says, as given (the -o list and the positional/flag forms). */
export interface CreateRequest {
  file: string;
  /** The size argument; `-o size=` is used when absent. */
  size?: string;
  options: Map<string, string>;
  backing?: string;
  backingFormat?: string;
  force: boolean;
}

/** The defaults of the image being made, which depend on the other options given. */
interface Defaults {
  clusterSize: number;
  /** Dedup's default for this compat and refcount width: on (sha256) or off. */
  dedupByDefault: boolean;
}

const k = (bytes: number) => `${bytes / 1024}k`;
const CLUSTER_RANGE = `a power of two from ${2 ** MIN_CLUSTER_BITS} to ${2 ** MAX_CLUSTER_BITS / 1024 / 1024}M`;
const MIN_DEDUP_REFCOUNT_BITS = 2 ** MIN_DEDUP_REFCOUNT_ORDER;

/** The `-o` keys, their value types and help texts (printed by `-o help`, in this order). */
const CREATE_OPTIONS: [string, string, (d: Defaults) => string][] = [
  ['backing_file', 'str', () => 'File name of a base image'],
  ['backing_fmt', 'str', () => 'Image format of the base image (qcow2 or raw)'],
  ['cluster_size', 'size', (d) => `qcow2 cluster size, ${CLUSTER_RANGE} (default ${d.clusterSize})`],
  ['compat', 'str', () => 'Compatibility level (v2 [0.10] or v3 [1.1], default 1.1)'],
  ['compression', 'bool (on/off)', () => 'Write new unique clusters compressed, as every write had -c (needs dedup; default off)'],
  [
    'dedup',
    'str',
    (d) =>
      d.dedupByDefault
        ? 'Inline deduplication hash: sha256 (default), sha3-256, blake3 or off'
        : 'Inline deduplication hash: sha256, sha3-256, blake3 or off (default off: dedup needs compat=1.1 and refcount_bits of ' +
          `${MIN_DEDUP_REFCOUNT_BITS} or more)`,
  ],
  [
    'dedup_journal_block',
    'size',
    () => `Dedup journal block size, a power of two from ${MIN_JOURNAL_BLOCK} to ${k(MAX_JOURNAL_BLOCK)} (default ${DEFAULT_JOURNAL_BLOCK})`,
  ],
  ['dedup_max_incarnations', 'num', () => 'Frozen log stores kept before the oldest is forgotten (0 = unlimited, default)'],
  [
    'dedup_order',
    'num',
    () =>
      `Log store size: 2^N buckets of 4 hashes, 0 to ${MAX_STORE_ORDER} and at most log2(disk clusters / 2) ` +
      '(default: about 1/128 of the disk; RAM ≈ 49 bytes × 2^N × 4 per log store)',
  ],
  ['dedup_verify', 'bool (on/off)', () => 'Compare bytes before linking a duplicate (default off)'],
  ['lazy_refcounts', 'bool (on/off)', () => 'Postpone refcount updates (compatible feature bit; v3 only)'],
  [
    'refcount_bits',
    'num',
    () => `Width of a reference count entry in bits: 1, 2, 4, 8, 16, 32 or ${2 ** MAX_REFCOUNT_ORDER} (default ${2 ** DEFAULT_REFCOUNT_ORDER})`,
  ],
  ['size', 'size', () => 'Virtual disk size'],
];

/** compat=… as a version, or undefined for a level qcow2 does not have. */
function compatVersion(compat: string | undefined): 2 | 3 | undefined {
  if (compat === undefined || compat === '1.1' || compat === 'v3') return 3;
  if (compat === '0.10' || compat === 'v2') return 2;
  return undefined;
}

/** Dedup is on unless turned off, by default on v3 images with refcounts of 4 bits or more (it needs an autoclear bit and room to count). */
function dedupByDefault(version: 2 | 3, opts: Map<string, string>): boolean {
  return version === 3 && (!opts.has('refcount_bits') || Number(opts.get('refcount_bits')) >= MIN_DEDUP_REFCOUNT_BITS);
}

function defaultsFor(version: 2 | 3, opts: Map<string, string>): Defaults {
  const byDefault = dedupByDefault(version, opts);
  const dedup = opts.get('dedup');
  const on = dedup !== 'off' && (dedup !== undefined || byDefault);
  return { clusterSize: 2 ** (on ? DEDUP_CLUSTER_BITS : DEFAULT_CLUSTER_BITS), dedupByDefault: byDefault };
}

/**
 * The `-o help` text: every key with the defaults of the image the other options describe
 * (a dedup image gets 4096-byte clusters, dedup=off or compat=0.10 65536). Never throws:
 * an option that does not parse counts as absent.
 */
export function createOptionsHelp(opts: Map<string, string>): string {
  const d = defaultsFor(compatVersion(opts.get('compat')) ?? 3, opts);
  let text = 'Supported options:\n';
  for (const [name, type, help] of CREATE_OPTIONS) text += `  ${name}=<${type}>${' '.repeat(Math.max(1, 24 - name.length - type.length))}- ${help(d)}\n`;
  return text;
}

/**
 * Validates a create request into the options of createImage, in qemu-img's order and with
 * its messages (UsageError). Opens the backing file for its size when no size is given.
 */
export async function resolveCreateOptions(a: CreateRequest, parse: OptionParsers): Promise<CreateOptions> {
  const opts = a.options;
  if (!a.file) throw new UsageError('Expecting image file name');
  for (const key of opts.keys()) {
    if (!CREATE_OPTIONS.some(([name]) => name === key)) throw new UsageError(`Invalid parameter '${key}'`);
  }
  const version = compatVersion(opts.get('compat'));
  if (!version) throw new UsageError(`Invalid compatibility level: '${opts.get('compat')}' (0.10 or 1.1)`);

  const clusterSize = opts.has('cluster_size') ? parse.size(opts.get('cluster_size')!, 'cluster size') : defaultsFor(version, opts).clusterSize;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new UsageError(`Cluster size must be a power of two between ${2 ** MIN_CLUSTER_BITS} and ${k(2 ** MAX_CLUSTER_BITS)}`);
  }
  const refcountBits = opts.has('refcount_bits') ? Number(opts.get('refcount_bits')) : 2 ** DEFAULT_REFCOUNT_ORDER;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > MAX_REFCOUNT_ORDER) {
    throw new UsageError(`Refcount width must be a power of two and may not exceed ${2 ** MAX_REFCOUNT_ORDER} bits`);
  }
  if (version === 2 && refcountOrder !== V2_REFCOUNT_ORDER) {
    throw new UsageError(`Different refcount widths than ${2 ** V2_REFCOUNT_ORDER} bits require compatibility level 1.1 or above (use compat=1.1)`);
  }
  const lazyRefcounts = opts.has('lazy_refcounts') ? parse.bool(opts.get('lazy_refcounts')!, 'lazy_refcounts') : false;
  if (lazyRefcounts && version === 2) throw new UsageError('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1)');

  const backingFile = a.backing ?? opts.get('backing_file');
  let backingFormat = a.backingFormat ?? opts.get('backing_fmt');
  if (backingFormat !== undefined && backingFormat !== 'qcow2' && backingFormat !== 'raw') {
    throw new UsageError(`backing format '${backingFormat}' is not supported (qcow2 or raw)`);
  }
  if (backingFormat !== undefined && backingFile === undefined) throw new UsageError('a backing format was given without a backing file');

  const sizeText = a.size ?? opts.get('size');
  let size = sizeText !== undefined ? parse.size(sizeText, 'image size') : undefined;
  if (backingFile !== undefined) {
    // Like qemu-img: the name is stored as given, resolved against the new image's folder.
    const backingPath = isAbsolute(backingFile) ? backingFile : resolve(dirname(a.file), backingFile);
    backingFormat ??= await probeFormat(backingPath);
    if (size === undefined) {
      const base = backingFormat === 'qcow2' ? await Image.open(backingPath) : await RawImage.open(backingPath);
      size = base.size;
      await base.close();
    }
  }
  if (size === undefined) throw new UsageError('Image creation needs a size parameter');
  const dedup = dedupSettings(opts, version, refcountOrder, size, clusterSize, parse);
  return { size, clusterBits, version, refcountOrder, lazyRefcounts, backingFile, backingFormat, force: a.force, dedup };
}

/**
 * The dedup settings from the -o list, or undefined for a plain image. Asking for dedup
 * (or a dedup_ key) where it cannot be is an error.
 */
export function dedupSettings(
  opts: Map<string, string>,
  version: 2 | 3,
  refcountOrder: number,
  size: number,
  clusterSize: number,
  parse: OptionParsers,
): DedupSettings | undefined {
  const name = opts.get('dedup');
  const dedupKeys = [...opts.keys()].filter(isDedupKey);
  if (name === 'off') {
    if (dedupKeys.length) throw new UsageError(`'${dedupKeys[0]}' needs dedup on (dedup=off was given)`);
    return undefined;
  }
  if (name === undefined && !dedupByDefault(version, opts)) {
    if (dedupKeys.length) throw new UsageError(`'${dedupKeys[0]}' needs dedup, which needs compat=1.1 and refcount_bits of ${MIN_DEDUP_REFCOUNT_BITS} or more`);
    return undefined;
  }
  if (version === 2) throw new UsageError('dedup needs compatibility level 1.1 (use compat=1.1 or dedup=off)');
  if (refcountOrder < MIN_DEDUP_REFCOUNT_ORDER) throw new UsageError(`dedup needs refcount_bits of ${MIN_DEDUP_REFCOUNT_BITS} or more (or dedup=off)`);
  const d = defaultDedupSettings(size, clusterSize);
  const algorithm = name === undefined ? d.algorithm : parseHashAlgorithm(name);
  const verify = opts.has('dedup_verify') ? parse.bool(opts.get('dedup_verify')!, 'dedup_verify') : d.verify;
  const maxIncarnations = opts.has('dedup_max_incarnations')
    ? parseCount(opts.get('dedup_max_incarnations')!, 'dedup_max_incarnations', 0, MAX_INCARNATIONS)
    : d.maxIncarnations;
  const order = opts.has('dedup_order') ? parseCount(opts.get('dedup_order')!, 'dedup_order', 0, MAX_STORE_ORDER) : d.order;
  const maxOrder = maxStoreOrder(size, clusterSize);
  if (order > maxOrder) {
    // A log store larger than the disk can fill is never frozen: it only costs RAM and file space.
    const clusters = Math.ceil(size / clusterSize);
    throw new UsageError(
      `dedup_order ${order} is too large for this disk (${clusters} clusters of ${clusterSize} bytes): the largest is ${maxOrder} (a log ` +
        `store of 2^${maxOrder} × 4 slots, at most twice the disk's clusters)`,
    );
  }
  const journalBlockSize = opts.has('dedup_journal_block') ? parse.size(opts.get('dedup_journal_block')!, 'dedup journal block size') : d.journalBlockSize;
  if (!validJournalBlockSize(journalBlockSize)) {
    throw new UsageError(`dedup_journal_block must be a power of two from ${MIN_JOURNAL_BLOCK} to ${k(MAX_JOURNAL_BLOCK)}`);
  }
  const compress = opts.has('compression') ? parse.bool(opts.get('compression')!, 'compression') : d.compress;
  return { algorithm, verify, compress, maxIncarnations, order, journalBlockSize };
}

/** Keys kept in the dedup extension: they need dedup on. */
function isDedupKey(key: string): boolean {
  return key.startsWith('dedup_') || key === 'compression';
}

function parseCount(text: string, what: string, min: number, max: number): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || n < min || n > max) throw new UsageError(`${what} must be a whole number from ${min} to ${max}, not '${text}'`);
  return n;
}

/**
 * The dedup settings `-o` asks for when dedup is turned on in an existing image (`qdedup
 * dedup`): only the dedup keys, checked as create checks them for this image's geometry.
 */
export function offlineDedupSettings(
  opts: Map<string, string>,
  header: { version: 2 | 3; refcountOrder: number; size: number },
  clusterSize: number,
  parse: OptionParsers,
): DedupSettings {
  checkOfflineKeys(opts);
  const settings = dedupSettings(new Map([['dedup', 'sha256'], ...opts]), header.version, header.refcountOrder, header.size, clusterSize, parse);
  if (!settings) throw new UsageError(`dedup needs compat=1.1 and refcount_bits of ${MIN_DEDUP_REFCOUNT_BITS} or more`);
  return settings;
}

/** Refuses `-o` keys that do not apply to an existing image (all but the dedup ones), before it is opened. */
export function checkOfflineKeys(opts: Map<string, string>): void {
  for (const key of opts.keys()) {
    if (key !== 'dedup' && !key.startsWith('dedup_')) throw new UsageError(`Invalid parameter '${key}' (only the dedup options apply to an existing image)`);
  }
  if (opts.get('dedup') === 'off') throw new UsageError('dedup=off: nothing to do (qdedup dedup turns deduplication on)');
}
