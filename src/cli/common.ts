// Options and argument checks shared by several subcommands.

import type { Argv } from 'yargs';
import { UsageError } from '../errors.ts';

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
