// Options and argument checks shared by several subcommands.

import type { Argv } from 'yargs';
import { QdedupError, UsageError } from '../errors.ts';

export type OutputFormat = 'human' | 'json';

export function withOutputOption<T>(y: Argv<T>) {
  return y.option('output', {
    type: 'string',
    describe: 'output format: human or json',
    default: 'human',
    requiresArg: true,
  });
}

export function withQuietOption<T>(y: Argv<T>) {
  return y.option('quiet', { alias: 'q', type: 'boolean', describe: 'print nothing but errors', default: false });
}

export function withFormatOption<T>(y: Argv<T>) {
  return y.option('f', { type: 'string', describe: 'image format (only qcow2)', requiresArg: true });
}

export function outputFormat(value: unknown): OutputFormat {
  if (value === 'human' || value === 'json') return value;
  throw new UsageError('--output must be used with human or json');
}

/** qdedup only handles qcow2; accept `-f qcow2` like qemu-img, refuse anything else. */
export function checkFormat(value: unknown): void {
  if (value !== undefined && value !== 'qcow2') throw new UsageError(`unsupported image format '${String(value)}' (qdedup handles qcow2 only)`);
}

/**
 * The error for guest I/O beyond the virtual disk: exit 1 naming the image, not a usage
 * error (qemu-io reports it as an I/O error: "write failed: Input/output error").
 */
export function pastTheEnd(file: string, offset: number, length: number, virtualSize: number): QdedupError {
  return new QdedupError(`offset ${offset} + length ${length} is past the end of the disk (virtual size ${virtualSize})`, 'ERANGE', 1, { path: file });
}
