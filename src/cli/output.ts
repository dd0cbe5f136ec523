// Where command output goes: results to stdout, diagnostics to stderr, JSON documents
// with a trailing newline. Commands take an Output so tests can capture it in memory.

import { writeSync } from 'node:fs';
import { Chalk, type ChalkInstance } from 'chalk';
import { OutputError } from '../errors.ts';
import { errnoText } from '../image/block-file.ts';

export interface Output {
  /** Writes text (or bytes) to stdout; settles once all of it was written (rejects with OutputError). */
  out(data: string | Buffer): Promise<void>;
  /** Writes a diagnostic line to stderr. */
  err(line: string): void;
  /** Colour for stderr (level 0 under NO_COLOR, pipes, --no-color). */
  color: ChalkInstance;
  /** Colour for stdout, decided the same way for stdout; absent (no colour) where output is captured. Never used for JSON. */
  outColor?: ChalkInstance;
  stdoutIsTTY: boolean;
  stderrIsTTY: boolean;
  /** stdout's file descriptor, for a command that writes it positionally (read's sparse output); absent in tests that capture output. */
  stdoutFd?: number;
}

/**
 * A failed write to stdout (`> /dev/full`: ENOSPC) as a one-line I/O error. EPIPE (a
 * reader that went away, `| head`) gets code EPIPE: main.ts ends quietly on it.
 */
export function stdoutError(err: unknown): OutputError {
  const e = err as NodeJS.ErrnoException;
  const text = errnoText(err) ?? (e?.code === 'EPIPE' ? 'Broken pipe' : e?.message || String(err));
  return new OutputError(`write to standard output failed: ${text}`, e?.code ?? 'EIO');
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

/** The `qdedup:` that starts an error line, in bold red when stderr is coloured. */
export function errorPrefix(io: Output): string {
  return io.color.red.bold('qdedup:');
}

/** process.stdout once the EPIPE handler below is on it: a closed pipe (`| head`) ends the process quietly. */
let stdoutHandled = false;

/**
 * process.stdout, for whatever writes to it as a stream (yargs' --help and --version, the
 * JSON of an error, Output.out after EAGAIN). Node makes the stream on first use, which costs
 * ~3 ms (a file) to ~8 ms (a pipe) of a start: a command that only prints its result never
 * makes it (Output.out writes the descriptor).
 */
export function stdoutStream(): NodeJS.WriteStream {
  const stream = process.stdout;
  if (!stdoutHandled) {
    stdoutHandled = true;
    stream.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    });
  }
  return stream;
}

/** True once stdout took bytes through the stream: from then on everything goes that way, in order. */
let stdoutStreaming = false;

/**
 * Writes `data` to descriptor 1 with write(2), as the stream would (stdout is synchronous for
 * files, pipes and terminals on Linux), without making the stream. What a non-blocking pipe
 * does not take at once (EAGAIN) goes through the stream, which waits for the reader; every
 * other error is the write's (EPIPE, ENOSPC).
 */
function writeStdout(data: string | Buffer): Promise<void> {
  if (stdoutStreaming) return streamWrite(data);
  const buf = typeof data === 'string' ? Buffer.from(data) : data;
  let done = 0;
  try {
    while (done < buf.length) done += writeSync(1, buf, done, buf.length - done);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') return Promise.reject(stdoutError(err));
    stdoutStreaming = true;
    return streamWrite(buf.subarray(done));
  }
  return Promise.resolve();
}

function streamWrite(data: string | Buffer): Promise<void> {
  stdoutStreaming = true;
  return new Promise<void>((resolve, reject) => {
    try {
      stdoutStream().write(data, (err) => (err ? reject(stdoutError(err)) : resolve()));
    } catch (err) {
      reject(stdoutError(err));
    }
  });
}

/**
 * The process's Output. What needs the stdio streams (whether one is a terminal, the colours
 * that follow) is worked out on first use, so that a command that only prints its result
 * makes neither stream.
 */
export function processOutput(colorFlag?: boolean): Output {
  let color: ChalkInstance | undefined;
  let outColor: ChalkInstance | undefined;
  return {
    out: writeStdout,
    err: (line) => {
      process.stderr.write(line.endsWith('\n') ? line : line + '\n');
    },
    get color() {
      color ??= new Chalk({ level: colorLevel(colorFlag, Boolean(process.stderr.isTTY)) });
      return color;
    },
    get outColor() {
      outColor ??= new Chalk({ level: colorLevel(colorFlag, Boolean(stdoutStream().isTTY)) });
      return outColor;
    },
    get stdoutIsTTY() {
      return Boolean(stdoutStream().isTTY);
    },
    get stderrIsTTY() {
      return Boolean(process.stderr.isTTY);
    },
    stdoutFd: 1,
  };
}

/** Marks a bigint during JSON.stringify (a lone surrogate: no decoded text contains one). */
const BIGINT_MARK = '\udfff\u0000bigint:';

/**
 * Serialises a JSON result the way qemu-img does (QEMU qobject/json-writer.c): indented by
 * four spaces, ending in a newline; in strings every character outside printable ASCII is
 * a \uXXXX escape with upper-case hex (\b \f \n \r \t keep their short forms), so a
 * non-ASCII file or snapshot name prints as qemu-img prints it. A bigint prints as its exact
 * digits (u64 fields beyond 2^53).
 */
export function toJson(value: unknown): string {
  const text = JSON.stringify(value, (_key, v: unknown) => (typeof v === 'bigint' ? BIGINT_MARK + v.toString() : v), 4);
  // Fast path: nothing JSON.stringify writes differently (all printable ASCII, no \u escape).
  if (!/[^\x20-\x7e\n]|\\u[0-9a-f]{4}/.test(text)) return text + '\n';
  return (
    text.replace(/"(?:[^"\\]|\\.)*"/g, (literal) => {
      const s = JSON.parse(literal) as string;
      return s.startsWith(BIGINT_MARK) ? s.slice(BIGINT_MARK.length) : quoteLikeQemu(s);
    }) + '\n'
  );
}

const SHORT_ESCAPES: Record<string, string> = { '"': '\\"', '\\': '\\\\', '\b': '\\b', '\f': '\\f', '\n': '\\n', '\r': '\\r', '\t': '\\t' };

/** A JSON string literal as qemu's json-writer quotes it (UTF-16 code units: astral characters become surrogate pairs, as there). */
function quoteLikeQemu(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const ch = s[i];
    const code = s.charCodeAt(i);
    if (SHORT_ESCAPES[ch]) out += SHORT_ESCAPES[ch];
    else if (code < 0x20 || code >= 0x7f) out += '\\u' + code.toString(16).toUpperCase().padStart(4, '0');
    else out += ch;
  }
  return out + '"';
}
