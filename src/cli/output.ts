// Where command output goes: results to stdout, diagnostics to stderr, JSON documents
// with a trailing newline. Commands take an Output so tests can capture it in memory.

import { Chalk, type ChalkInstance } from 'chalk';

export interface Output {
  /** Writes text (or bytes) to stdout, waiting for the stream to drain. */
  out(data: string | Buffer): Promise<void>;
  /** Writes a diagnostic line to stderr. */
  err(line: string): void;
  /** Colour for stderr (level 0 under NO_COLOR, pipes, --no-color). */
  color: ChalkInstance;
  stdoutIsTTY: boolean;
  stderrIsTTY: boolean;
}

/** Colour level: --color/--no-color win, then FORCE_COLOR, then NO_COLOR, then the TTY. */
export function colorLevel(flag: boolean | undefined, isTTY: boolean): 0 | 1 {
  if (flag !== undefined) return flag ? 1 : 0;
  const force = process.env.FORCE_COLOR;
  if (force !== undefined && force !== '') return force === '0' || force === 'false' ? 0 : 1;
  if (process.env.NO_COLOR) return 0;
  if (process.env.TERM === 'dumb') return 0;
  return isTTY ? 1 : 0;
}

export function processOutput(colorFlag?: boolean): Output {
  return {
    out: (data) =>
      new Promise<void>((resolve, reject) => {
        process.stdout.write(data, (err) => (err ? reject(err) : resolve()));
      }),
    err: (line) => {
      process.stderr.write(line.endsWith('\n') ? line : line + '\n');
    },
    color: new Chalk({ level: colorLevel(colorFlag, Boolean(process.stderr.isTTY)) }),
    stdoutIsTTY: Boolean(process.stdout.isTTY),
    stderrIsTTY: Boolean(process.stderr.isTTY),
  };
}

/** Serialises a JSON result the way qemu-img does: indented, ending in a newline. */
export function toJson(value: unknown): string {
  return JSON.stringify(value, null, 4) + '\n';
}
