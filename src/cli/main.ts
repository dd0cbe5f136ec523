// The qdedup command line: registers the subcommands with yargs and holds the one place
// where errors become messages and exit codes (see README "Exit codes").

import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { InternalError, QdedupError, UsageError } from '../errors.ts';
import { processOutput, toJson, type Output } from './output.ts';
import * as create from './commands/create.ts';
import * as info from './commands/info.ts';
import * as write from './commands/write.ts';
import * as read from './commands/read.ts';
import * as check from './commands/check.ts';

interface CommandModule {
  command: string;
  describe: string;
  builder: (y: Argv) => Argv<any>;
  toArgs: (argv: Record<string, unknown>) => any;
  run: (args: any, io: Output) => Promise<number>;
}

const COMMANDS: CommandModule[] = [create, info, write, read, check];

/** Prints an error as one line (and JSON under --output json) and returns its exit code. */
export function report(err: unknown, io: Output, json: boolean): number {
  if (err instanceof QdedupError && !(err instanceof InternalError)) {
    const where = err.details.path ? `${err.details.path}: ` : '';
    io.err(`qdedup: ${where}${err.message}`);
    if (err instanceof UsageError) io.err("Try 'qdedup --help' for more information.");
    if (json) process.stdout.write(toJson({ error: err.toJSON() }));
    return err.exitCode;
  }
  const e = err as Error;
  io.err(`qdedup: internal error: ${e && e.message ? e.message : String(err)}`);
  io.err('This is a bug in qdedup; please report it with the command line and this trace:');
  io.err(String(e && e.stack ? e.stack : err));
  return 1;
}

export async function main(argv: string[]): Promise<void> {
  // `| head` closing stdout ends the command quietly.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0);
  });
  let io = processOutput();
  let parser = yargs(argv)
    .scriptName('qdedup')
    .parserConfiguration({ 'parse-numbers': false, 'parse-positional-numbers': false })
    .usage('$0 <command> [options]\n\nCreate, write, read and check QCOW2 disk images.')
    .option('color', { type: 'boolean', describe: 'colour diagnostics (default: when stderr is a terminal; NO_COLOR honoured)' })
    .strict()
    .demandCommand(1, 'a command is needed')
    .recommendCommands()
    .help()
    .alias('h', 'help')
    .version()
    .alias('V', 'version')
    .wrap(Math.min(100, process.stdout.columns || 100))
    .showHelpOnFail(false)
    .fail((msg, err) => {
      if (err) throw err;
      throw new UsageError(msg);
    });
  for (const mod of COMMANDS) {
    parser = parser.command({
      command: mod.command,
      describe: mod.describe,
      builder: mod.builder,
      handler: async (args: Record<string, unknown>) => {
        io = processOutput(args.color as boolean | undefined);
        process.exitCode = await mod.run(mod.toArgs(args), io);
      },
    });
  }
  try {
    await parser.parseAsync();
  } catch (err) {
    const json = argv.some((a, i) => a === '--output=json' || (a === '--output' && argv[i + 1] === 'json'));
    process.exitCode = report(err, io, json);
  }
}

await main(hideBin(process.argv));
