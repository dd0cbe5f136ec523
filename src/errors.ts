// Error hierarchy and exit codes. Library code throws these; only src/cli/main.ts turns
// them into a message on stderr (or {"error":…} under --output json) and an exit code.
//
// Exit codes follow qemu-img: every failure of a command is 1. `check` alone adds its
// verdicts (2 corruptions, 3 leaks only, 63 not a QCOW2 image), computed from its result.

export interface ErrorDetails {
  path?: string;
  /** Byte offset in the image file where the problem is, when there is one. */
  offset?: number;
  /** The on-disk structure concerned, e.g. "header", "L2 table". */
  structure?: string;
}

export class QdedupError extends Error {
  readonly code: string;
  readonly exitCode: number;
  readonly details: ErrorDetails;
  constructor(message: string, code: string, exitCode = 1, details: ErrorDetails = {}) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    this.exitCode = exitCode;
    this.details = details;
  }
  toJSON(): object {
    return { code: this.code, message: this.message, ...this.details };
  }
}

/** Bad command-line arguments. */
export class UsageError extends QdedupError {
  constructor(message: string) {
    super(message, 'EUSAGE', 1);
  }
}

/** The host file system failed us (missing file, EIO, ENOSPC, permission). */
export class IoError extends QdedupError {
  constructor(message: string, details: ErrorDetails = {}, code = 'EIO') {
    super(message, code, 1, details);
  }
}

/** The image's bytes break the QCOW2 rules: malformed, truncated, hostile. */
export class CorruptImageError extends QdedupError {
  constructor(message: string, details: ErrorDetails = {}) {
    super(message, 'ECORRUPT', 1, details);
  }
}

/** A file that is not a QCOW2 image at all (bad magic). `check` maps it to 63. */
export class NotQcow2Error extends QdedupError {
  constructor(message: string, details: ErrorDetails = {}) {
    super(message, 'ENOTQCOW2', 1, details);
  }
}

/** A valid image using a feature qdedup does not implement (zstd, encryption, …). */
export class UnsupportedError extends QdedupError {
  constructor(message: string, details: ErrorDetails = {}) {
    super(message, 'EUNSUPPORTED', 1, details);
  }
}

/**
 * Writing results to standard output failed (`> /dev/full`: ENOSPC, EIO). Names no file:
 * the message says "standard output".
 */
export class OutputError extends IoError {
  constructor(message: string, code = 'EIO') {
    super(message, {}, code);
  }
}

/** Exit codes of a command ended by a signal, as a shell reports a process killed by it (128 + signal number). */
export const SIGNAL_EXIT_CODES = { SIGHUP: 129, SIGINT: 130, SIGTERM: 143 } as const;
export type InterruptSignal = keyof typeof SIGNAL_EXIT_CODES;

/**
 * A command stopped early by SIGINT, SIGTERM or SIGHUP after finishing what it had begun:
 * the message says what was done (and that it is durable). Exit 130, 143 or 129.
 */
export class InterruptedError extends QdedupError {
  readonly signal: InterruptSignal;
  constructor(signal: InterruptSignal, message: string, details: ErrorDetails = {}) {
    super(message, 'EINTR', SIGNAL_EXIT_CODES[signal], details);
    this.signal = signal;
  }
}

/** A bug in qdedup: the CLI prints the stack and asks for a report. */
export class InternalError extends QdedupError {
  constructor(message: string) {
    super(message, 'EINTERNAL', 1);
  }
}

/**
 * Text safe on one line of a terminal: C0 and C1 control characters (newline, carriage
 * return, ESC of an escape sequence, CSI 0x9b) and DEL become \xNN, a backslash stays
 * as it is. Used for file names and messages in diagnostics, so an error is one line.
 */
export function printable(text: string): string {
  return text.replace(/[\x00-\x1f\x7f-\x9f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/** Formats a byte offset the way QEMU's messages do: 0x-prefixed lower-case hex. */
export function hex(n: number | bigint): string {
  return '0x' + n.toString(16);
}
