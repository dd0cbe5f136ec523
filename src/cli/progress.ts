// Progress bar for long operations: cli-progress on stderr, shown only when stderr is a
// terminal (never in pipes, files or CI logs).

import cliProgress from 'cli-progress';
import type { Output } from './output.ts';

export interface Progress {
  update(done: number): void;
  stop(): void;
}

/** Starts a bar counting up to `total` bytes, or returns null when stderr is not a TTY. */
export function startProgress(io: Output, total: number): Progress | null {
  if (!io.stderrIsTTY || total === 0) return null;
  const bar = new cliProgress.SingleBar(
    { stream: process.stderr, format: ' {bar} {percentage}% | {value_mb}/{total_mb} MiB | ETA {eta}s', hideCursor: true, clearOnComplete: true },
    cliProgress.Presets.shades_classic,
  );
  const mb = (n: number) => (n / 1048576).toFixed(0);
  bar.start(total, 0, { value_mb: '0', total_mb: mb(total) });
  return {
    update: (done) => bar.update(done, { value_mb: mb(done) }),
    stop: () => bar.stop(),
  };
}

/** A bar for work that learns its total when it starts: started (or not: no TTY) at the first update. */
export interface LazyProgress {
  update(done: number, total: number): void;
  stop(): void;
}

export function lazyProgress(io: Output): LazyProgress {
  let bar: Progress | null | undefined; // null: no bar (not a terminal)
  return {
    update: (done, total) => {
      if (bar === undefined) bar = startProgress(io, total);
      bar?.update(done);
    },
    stop: () => bar?.stop(),
  };
}
