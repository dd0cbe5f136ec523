// The qdedup command line: registers the subcommands with yargs and holds the one place
// where errors become messages and exit codes (see docs/COMMANDS.md "Exit codes").

import { readFileSync } from 'node:fs';
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { InternalError, OutputError, QdedupError, UsageError, printable } from '../errors.ts';
import { errorPrefix, processOutput, stdoutStream, toJson, type Output } from './output.ts';
import { COMMANDS, commandName, selectedCommand, unknownCommand } from './command-list.ts';

/**
 * qdedup's version from package.json. yargs' own lookup fails once the CLI is bundled into
 * dist/qdedup.cjs (it printed "unknown"), so search upwards from this module: one level
 * from dist/, two from src/cli/.
 */
function packageVersion(): string {
  for (const rel of ['../package.json', '../../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), 'utf8'));
      if (pkg.name === 'qdedup' && typeof pkg.version === 'string') return pkg.version;
    } catch {
      // not there: try the next level
    }
  }
  return 'unknown';
}

/**
 * The first option in `argv` that is not in `known`, or undefined. yargs lets an unknown
 * option swallow the next word (`info -x disk.qcow2` became "Not enough non-option
 * arguments"), so a failed parse is re-examined for the option the user actually mistyped.
 */
export function unknownOption(argv: string[], known: Set<string>): string | undefined {
  for (const token of argv) {
    if (token === '--') break;
    if (!token.startsWith('-') || token === '-') continue;
    const names = token.startsWith('--') ? [token.slice(2).split('=')[0].replace(/^no-/, '')] : [...token.slice(1).split('=')[0]];
    for (const name of names) {
      const camel = name.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
      if (!known.has(name) && !known.has(camel)) return name;
    }
  }
  return undefined;
}

/** `--color=WHEN` values (GNU ls's words): true always, false never, undefined auto. */
const COLOR_WHEN: Record<string, boolean | undefined> = {
  always: true,
  yes: true,
  force: true,
  never: false,
  no: false,
  none: false,
  auto: undefined,
  tty: undefined,
  'if-tty': undefined,
};

/** The last --color/--no-color/--color=WHEN before `--` (undefined: auto, or a bad WHEN). */
function colorAsTyped(argv: string[]): boolean | undefined {
  let flag: boolean | undefined;
  for (const token of argv) {
    if (token === '--') break;
    if (token === '--color' || token === '--no-color') flag = token === '--color';
    else if (token.startsWith('--color=')) flag = COLOR_WHEN[token.slice(8)];
  }
  return flag;
}

/** A word after `--` that looks like an option, hidden from yargs (NUL never occurs in argv). */
const HIDDEN = /\u0000(\d+)\u0000/g;

/**
 * The command line as yargs should see it, and how to undo what was hidden from it:
 * - `--color=always|never|auto` (and GNU's synonyms) become `--color`, `--no-color` or
 *   nothing (yargs' boolean takes no value);
 * - `--` ends the options: it is dropped, and each later word that starts with '-' is
 *   replaced by a placeholder (yargs read `info -- disk.qcow2` as a missing argument and a
 *   later `-x` as an option); `reveal` turns placeholders back into the words.
 */
export function prepareArgv(argv: string[]): { argv: string[]; reveal: (s: string) => string } {
  const out: string[] = [];
  const hidden: string[] = [];
  let operands = false;
  for (const token of argv) {
    if (operands) {
      if (token.startsWith('-') && token !== '-') {
        out.push(`\u0000${hidden.length}\u0000`);
        hidden.push(token);
      } else out.push(token);
    } else if (token === '--') {
      operands = true;
    } else if (token.startsWith('--color=')) {
      const when = token.slice('--color='.length);
      if (!(when in COLOR_WHEN)) throw new UsageError(`invalid argument '${printable(when)}' for '--color' (always, never or auto)`);
      const flag = COLOR_WHEN[when];
      if (flag !== undefined) out.push(flag ? '--color' : '--no-color');
    } else out.push(token);
  }
  return { argv: out, reveal: (s) => (hidden.length ? s.replace(HIDDEN, (_, i: string) => hidden[Number(i)]) : s) };
}

/**
 * True when `argv` (as prepareArgv left it: words after `--` hidden) names help or the
 * version anywhere: --help, --version (=…, --no-…), or h or V among short options (`-Uh`).
 * Then yargs may print, and is set up as for `qdedup --help`.
 */
export function asksHelpOrVersion(argv: string[]): boolean {
  return argv.some((token) => {
    if (token.startsWith('--')) return /^(?:no-)?(?:help|version)$/.test(token.slice(2).split('=')[0]);
    return token.startsWith('-') && /[hV]/.test(token.slice(1).split('=')[0]);
  });
}

/** Option names (and aliases) a yargs instance knows. */
function optionNames(y: Argv<any>): Set<string> {
  const o = (y as unknown as { getOptions(): { key: Record<string, unknown>; alias: Record<string, string[]> } }).getOptions();
  const names = new Set<string>(['help', 'h', 'version', 'V', 'color', ...Object.keys(o.key)]);
  for (const [k, aliases] of Object.entries(o.alias ?? {})) {
    names.add(k);
    for (const a of aliases) names.add(a);
  }
  return names;
}

/**
 * yargs renders the whole help text whenever a command is parsed (usage.cacheHelpMessage,
 * so that help asked for later shows the command's usage): ~20 ms of every start for a
 * text nobody reads. qdedup never shows help after a command ran (showHelpOnFail(false)),
 * so the cache is not filled; help itself renders as before. Internal API: if it is
 * gone, nothing changes.
 */
function skipHelpCache(y: Argv<any>): void {
  type Internals = { getInternalMethods?(): { getUsageInstance?(): { cacheHelpMessage?: () => void } } };
  const usage = (y as unknown as Internals).getInternalMethods?.().getUsageInstance?.();
  if (usage && typeof usage.cacheHelpMessage === 'function') usage.cacheHelpMessage = () => {};
}

/** Prints an error as one line (and JSON under --output json) and returns its exit code. */
export function report(err: unknown, io: Output, json: boolean): number {
  // A reader that went away (`| head`): a quiet end, as when the stream reports it.
  if (err instanceof OutputError && err.code === 'EPIPE') return typeof process.exitCode === 'number' ? process.exitCode : 0;
  if (err instanceof QdedupError && !(err instanceof InternalError)) {
    // One line whatever the file name holds: control characters and escape sequences escaped.
    const where = err.details.path ? `${printable(err.details.path)}: ` : '';
    io.err(`${errorPrefix(io)} ${where}${printable(err.message)}`);
    if (err instanceof UsageError) io.err("Try 'qdedup --help' for more information.");
    if (json && !(err instanceof OutputError)) stdoutStream().write(toJson({ error: err.toJSON() }), () => {});
    return err.exitCode;
  }
  const e = err as Error;
  io.err(`${errorPrefix(io)} internal error: ${printable(e?.message ? e.message : String(err))}`);
  io.err('This is a bug in qdedup; please report it with the command line and this trace:');
  io.err(String(e?.stack ? e.stack : err));
  return 1;
}

export async function main(given: string[]): Promise<void> {
  // Until the command line is parsed, only --color/--no-color as typed decide the colour.
  let io = processOutput(colorAsTyped(given));
  let argv: string[] = given;
  let reveal = (s: string) => s;
  try {
    ({ argv, reveal } = prepareArgv(given));
    // A word that names no command: say so (yargs said only "Did you mean read?", or
    // "Unknown argument: foo"), with a suggestion only when it is clearly a typo.
    const word = argv.find((a) => !a.startsWith('-'));
    if (word !== undefined && !selectedCommand(argv)) {
      const typo = unknownCommand(reveal(word));
      throw new UsageError(`unknown command '${printable(reveal(word))}'${typo ? ` (did you mean '${typo}'?)` : ''}`);
    }
  } catch (err) {
    process.exitCode = report(err, io, false);
    return;
  }
  // Only the module of the command that runs is loaded. yargs is given every command, --help,
  // --version and the terminal's width only when it may print help or the version; otherwise
  // only the command that runs (docs/PERFORMANCE.md, "Start-up"): it parses the same way.
  const selected = selectedCommand(argv);
  const full = !selected || asksHelpOrVersion(argv);
  // yargs prints help and the version through process.stdout: with the handler that makes
  // a closed pipe (`| head`) a quiet end.
  if (full) stdoutStream();
  let parser = yargs(argv)
    .scriptName('qdedup')
    .parserConfiguration({ 'parse-numbers': false, 'parse-positional-numbers': false })
    .usage('$0 <command> [options]\n\nCreate, write, read and check QCOW2 disk images.')
    .option('color', {
      type: 'boolean',
      describe:
        'colour errors, check verdicts and dedup figures: --color[=always|never|auto], --no-color (default auto: on a terminal, unless NO_COLOR ' +
        'is set; FORCE_COLOR=1/0 forces)',
    })
    .strict()
    .demandCommand(1, 'a command is needed')
    .showHelpOnFail(false)
    .fail((msg, err) => {
      if (err) {
        // yargs' own parse errors (`create -o` without a value: "Not enough arguments
        // following: o") are usage errors, not bugs to report with a stack trace.
        if (!(err instanceof QdedupError) && err.name === 'YError') throw new UsageError(reveal(err.message));
        throw err;
      }
      // Name a mistyped option rather than the argument it swallowed; this also replaces
      // yargs' "Unknown arguments: cluster-size, clusterSize" (its camel-case twin).
      const unknown = unknownOption(argv, commandOptions ?? optionNames(parser));
      if (unknown !== undefined) throw new UsageError(`Unknown argument: ${reveal(unknown)}`);
      throw new UsageError(reveal(msg));
    });
  // --help and --version: the bundle's yargs gives an instance neither (scripts/build.mjs).
  if (full)
    parser = parser
      .help()
      .alias('h', 'help')
      .version(packageVersion())
      .alias('V', 'version')
      .wrap(Math.min(100, process.stdout.columns || 100));
  /** Options of the subcommand being parsed (set by its builder). */
  let commandOptions: Set<string> | undefined;
  try {
    const mod = selected ? await selected.load() : undefined;
    for (const entry of full ? COMMANDS : [selected]) {
      // No handler: the command runs once parsing is over (below).
      parser = parser.command(entry.command, entry.describe, (y: Argv) => {
        if (entry !== selected || !mod) return y; // yargs builds only the command it matched
        const built = mod.builder(y);
        commandOptions = optionNames(built);
        return built;
      });
    }
    skipHelpCache(parser);
    const args = (await parser.parseAsync()) as Record<string, unknown> & { _: unknown[] };
    // Words given after `--` go back in place of their placeholders.
    for (const [k, v] of Object.entries(args)) if (typeof v === 'string') args[k] = reveal(v);
    if (!mod || args._[0] !== commandName(selected!) || args.help || args.version) return;
    io = processOutput(args.color as boolean | undefined);
    try {
      process.exitCode = await mod.run(mod.toArgs(args), io);
    } catch (err) {
      // Errors found after an image was opened (refcount table, allocation) come from
      // code that knows no path: they are in the command's image, so name it.
      // (Not a failed stdout, which is no fault of the image.)
      const ofTheImage = err instanceof QdedupError && !(err instanceof UsageError) && !(err instanceof OutputError);
      if (ofTheImage && !err.details.path && typeof args.file === 'string') err.details.path = args.file;
      throw err;
    }
  } catch (err) {
    const json = argv.some((a, i) => a === '--output=json' || (a === '--output' && argv[i + 1] === 'json'));
    process.exitCode = report(err, io, json);
  }
}

/**
 * Runs main() on this process's command line. Not through a top-level await: bin/qdedup runs
 * the bundle, dist/qdedup.cjs, as a classic script, the kind V8 keeps a code cache for
 * (docs/PERFORMANCE.md), and a script has none. What such an await did is kept: an error
 * main() lets through ends the process as an uncaught one (exit code 1), and a process whose
 * command never settled (the event loop ran dry while it waited) exits 13 with Node's warning
 * instead of 0. process.exit() (a reader gone away) exits as it says, as before.
 */
function runMain(): void {
  let settled = false;
  process.on('beforeExit', () => {
    if (settled || process.exitCode !== undefined) return;
    process.exitCode = 13;
    process.stderr.write('Warning: Detected unsettled top-level await: qdedup main() never finished\n');
  });
  main(hideBin(process.argv)).then(() => {
    settled = true;
  });
}

runMain();
