// Options and argument checks shared by several subcommands.

import type { Argv } from 'yargs';
import { UsageError } from '../errors.ts';
import { forceShare, type LockRequest } from '../image/image-lock.ts';

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

/** `-U`/`--force-share`, as qemu-img's read-only commands take it. */
export function withForceShareOption<T>(y: Argv<T>) {
  return y.option('U', {
    alias: 'force-share',
    type: 'boolean',
    default: false,
    describe: "open the image even while another process writes it (QEMU's image locks are not checked; what is read may be inconsistent)",
  });
}

/** The locks of a read-only command: `profile`, or with -U the same permissions, everything shared. */
export function readOnlyLock(profile: LockRequest, force: unknown): LockRequest {
  return force ? forceShare(profile) : profile;
}

/** qemu-img refuses -U on an open for writing ("force-share=on can only be used with read-only images"). */
export function refuseForceShare(force: unknown, what: string): void {
  if (force) throw new UsageError(`-U (force-share) can only be used with read-only images, not ${what}`);
}
