// PLACEHOLDER — being written.
import type { Argv } from 'yargs';
import type { Output } from '../output.ts';
export const command = 'check <file>';
export const describe = 'check an image for consistency';
export function builder(y: Argv) { return y; }
export function toArgs(argv: Record<string, unknown>) { return argv; }
export async function run(_a: unknown, _io: Output): Promise<number> { return 1; }
