// `qdedup info`: what the image is, with qemu-img info's keys and meanings.

import type { Argv } from 'yargs';
import { isAbsolute } from 'node:path';
import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, backingFormatOf } from '../../format/header.ts';
import { Image } from '../../image/image.ts';
import { checkFormat, outputFormat, withFormatOption, withOutputOption, type OutputFormat } from '../common.ts';
import { humanSize } from '../parse.ts';
import { toJson, type Output } from '../output.ts';

export interface InfoArgs {
  file: string;
  output: OutputFormat;
}

/** The JSON document of `info --output json` (qemu-img's ImageInfo keys). */
export interface ImageInfo {
  'virtual-size': number;
  filename: string;
  'cluster-size': number;
  format: 'qcow2';
  'actual-size': number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific': { type: 'qcow2'; data: Record<string, unknown> };
  'dirty-flag': boolean;
}

export async function imageInfo(path: string): Promise<ImageInfo> {
  // Like qemu-img info, the backing chain is not opened: info must describe an image whose
  // backing file is missing or loops (it names the backing file instead of failing).
  const image = await Image.open(path, { backing: false });
  try {
    const h = image.header;
    const data: Record<string, unknown> = h.version === 3
      ? {
          compat: '1.1',
          'compression-type': 'zlib',
          'lazy-refcounts': (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n,
          'refcount-bits': 2 ** h.refcountOrder,
          corrupt: (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n,
          'extended-l2': false,
        }
      : { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 };
    const info: ImageInfo = {
      'virtual-size': h.size,
      filename: path,
      'cluster-size': image.clusterSize,
      format: 'qcow2',
      'actual-size': await image.file.allocatedBytes(),
      'format-specific': { type: 'qcow2', data },
      'dirty-flag': (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
    };
    if (h.backingFile !== undefined) {
      info['backing-filename'] = h.backingFile;
      // qemu's path_combine(): the image path up to its last '/', then the name; not made
      // absolute (`info o.qcow2` shows "a.qcow2", as qemu-img info does).
      const slash = path.lastIndexOf('/');
      info['full-backing-filename'] = isAbsolute(h.backingFile) || slash < 0 ? h.backingFile : path.slice(0, slash + 1) + h.backingFile;
      const format = backingFormatOf(h);
      if (format) info['backing-filename-format'] = format;
    }
    return info;
  } finally {
    await image.close();
  }
}

export async function runInfo(a: InfoArgs, io: Output): Promise<number> {
  const info = await imageInfo(a.file);
  if (a.output === 'json') {
    await io.out(toJson(info));
    return 0;
  }
  const d = info['format-specific'].data;
  const lines = [
    `image: ${info.filename}`,
    'file format: qcow2',
    `virtual size: ${humanSize(info['virtual-size'])} (${info['virtual-size']} bytes)`,
    `disk size: ${humanSize(info['actual-size'])}`,
    `cluster_size: ${info['cluster-size']}`,
  ];
  if (info['backing-filename'] !== undefined) {
    lines.push(`backing file: ${info['backing-filename']}` + (info['full-backing-filename'] !== info['backing-filename'] ? ` (actual path: ${info['full-backing-filename']})` : ''));
    if (info['backing-filename-format']) lines.push(`backing file format: ${info['backing-filename-format']}`);
  }
  lines.push('Format specific information:');
  lines.push(`    compat: ${d.compat}`);
  lines.push(`    compression type: ${d['compression-type']}`);
  if ('lazy-refcounts' in d) lines.push(`    lazy refcounts: ${d['lazy-refcounts']}`);
  lines.push(`    refcount bits: ${d['refcount-bits']}`);
  if ('corrupt' in d) lines.push(`    corrupt: ${d.corrupt}`);
  if ('extended-l2' in d) lines.push(`    extended l2: ${d['extended-l2']}`);
  await io.out(lines.join('\n') + '\n');
  return 0;
}

export const command = 'info <file>';
export const describe = 'show what an image is (qemu-img info keys)';

export function builder(y: Argv) {
  return withOutputOption(withFormatOption(y))
    .positional('file', { type: 'string', describe: 'image file' })
    .example('$0 info disk.qcow2', 'human-readable summary')
    .example("$0 info --output json disk.qcow2 | jq '.\"virtual-size\"'", 'one field for a script');
}

export function toArgs(argv: Record<string, unknown>): InfoArgs {
  checkFormat(argv.f);
  return { file: String(argv.file), output: outputFormat(argv.output) };
}
export const run = runInfo;
