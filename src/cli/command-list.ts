// The subcommands: usage, one-line description, and how to load each one's module.
// main.ts loads only the module of the command that runs (start-up time, README
// "Performance"): the list itself imports nothing.

import type { Argv } from 'yargs';
import type { Output } from './output.ts';

/** What a subcommand module (./commands/*.ts) exports. */
export interface CommandModule {
  builder: (y: Argv) => Argv<any>;
  toArgs: (argv: Record<string, unknown>) => any;
  run: (args: any, io: Output) => Promise<number>;
}

export interface CommandEntry {
  /** yargs command string: name, then positionals. */
  command: string;
  describe: string;
  load: () => Promise<CommandModule>;
}

export const COMMANDS: CommandEntry[] = [
  { command: 'create [file] [size]', describe: 'create a new QCOW2 image', load: () => import('./commands/create.ts') },
  { command: 'info <file>', describe: 'show what an image is (qemu-img info keys)', load: () => import('./commands/info.ts') },
  { command: 'write <file> <offset> [length]', describe: 'write a pattern, a file or zeroes into an image (like qemu-io write)', load: () => import('./commands/write.ts') },
  { command: 'read <file> [offset] [length]', describe: 'read guest bytes: raw to stdout, verified (-P) or as a hexdump (-v)', load: () => import('./commands/read.ts') },
  { command: 'check <file>', describe: 'check an image for consistency, optionally repairing it (qemu-img check)', load: () => import('./commands/check.ts') },
  { command: 'dedup-stats <file>', describe: 'show what deduplication saves and the state of the dedup index (read-only)', load: () => import('./commands/dedup-stats.ts') },
  { command: 'journal-dump <file>', describe: "show a dedup image's journals block by block, and where replay stops", load: () => import('./commands/journal-dump.ts') },
  { command: 'estimate <files..>', describe: 'estimate what dedup would save on raw or qcow2 images, writing nothing (like zdb -S)', load: () => import('./commands/estimate.ts') },
];

/** The name of a command string ('read <file> …' → 'read'). */
export function commandName(entry: CommandEntry): string {
  return entry.command.split(' ')[0];
}

/**
 * The command `argv` names, if any: its first word that is not an option (the only
 * options before a command, --color/--help/--version, take no value).
 */
export function selectedCommand(argv: string[]): CommandEntry | undefined {
  const word = argv.find((a) => !a.startsWith('-'));
  return COMMANDS.find((c) => commandName(c) === word);
}
