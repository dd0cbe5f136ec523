// The subcommands: usage, one-line description, and how to load each one's module.
// main.ts loads only the module of the command that runs (start-up time, docs/PERFORMANCE.md):
// the list itself imports nothing.

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
  {
    command: 'write <file> <offset> [length]',
    describe: 'write a pattern, a file or zeroes into an image (like qemu-io write)',
    load: () => import('./commands/write.ts'),
  },
  {
    command: 'read <file> [offset] [length]',
    describe: 'read guest bytes: raw to stdout, verified (-P) or as a hexdump (-v)',
    load: () => import('./commands/read.ts'),
  },
  {
    command: 'convert <files..>',
    describe: 'copy raw or qcow2 images into a new dedup image or a raw file (qemu-img convert)',
    load: () => import('./commands/convert.ts'),
  },
  {
    command: 'dedup <file>',
    describe: 'deduplicate an existing image in place, turning dedup on if it was off',
    load: () => import('./commands/dedup.ts'),
  },
  { command: 'check <file>', describe: 'check an image for consistency, optionally repairing it (qemu-img check)', load: () => import('./commands/check.ts') },
  {
    command: 'dedup-stats <file>',
    describe: 'show what deduplication saves and the state of the dedup index (read-only)',
    load: () => import('./commands/dedup-stats.ts'),
  },
  { command: 'map <file>', describe: 'show how guest ranges map to the file (qemu-img map), and which share storage', load: () => import('./commands/map.ts') },
  {
    command: 'journal-dump <file>',
    describe: "show a dedup image's journals block by block, and where replay stops",
    load: () => import('./commands/journal-dump.ts'),
  },
  {
    command: 'estimate <files..>',
    describe: 'estimate what dedup would save on raw or qcow2 images, writing nothing (like zdb -S)',
    load: () => import('./commands/estimate.ts'),
  },
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

/**
 * For a word that names no command: the command it is clearly a typo of (one letter wrong,
 * missing, extra, or two neighbours swapped; two for words of 6 letters or more), or
 * undefined. A loose guess ("foo" → "info") helps nobody.
 */
export function unknownCommand(word: string): string | undefined {
  const limit = word.length >= 6 ? 2 : 1;
  let best: { name: string; d: number } | undefined;
  for (const c of COMMANDS) {
    const name = commandName(c);
    const d = editDistance(word.toLowerCase(), name);
    if (d <= limit && (!best || d < best.d)) best = { name, d };
  }
  return best?.name;
}

/** Optimal string alignment distance: insertions, deletions, substitutions, adjacent swaps. */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.length][b.length];
}
