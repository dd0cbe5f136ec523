// SIGINT, SIGTERM and SIGHUP while a command changes an image: the first one is only
// recorded (an AbortSignal the command's loop checks between steps), so the command
// finishes the step in flight, commits and closes the image, then exits 128 + the signal's
// number with a note of what was done (InterruptedError, reported by main.ts). A second
// signal ends the process at once, with the signal's default action: the image is then
// left as after a crash (I3: dirty, the dedup index dropped at the next write).
// Commands that only read install nothing: a signal ends them at once.

import { InterruptedError, type InterruptSignal } from '../errors.ts';

const SIGNALS: InterruptSignal[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

export interface Interrupts {
  /** Aborted at the first signal. */
  readonly signal: AbortSignal;
  /** The first signal received, if any. */
  readonly received: InterruptSignal | undefined;
  /** Restores the signals' default actions. */
  dispose(): void;
}

/**
 * Catches the three signals until dispose() is called (always call it: `finally`).
 * `onFirst` runs at the first signal (e.g. to say that a long repair is being finished).
 */
export function catchInterrupts(onFirst?: (sig: InterruptSignal) => void): Interrupts {
  const controller = new AbortController();
  let received: InterruptSignal | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    if (received === undefined) {
      received = sig as InterruptSignal;
      controller.abort(sig);
      onFirst?.(received);
      return;
    }
    // The second signal: die by it now (default action), as the power-loss case.
    dispose();
    process.kill(process.pid, sig);
  };
  const dispose = () => {
    for (const s of SIGNALS) process.removeListener(s, onSignal);
  };
  for (const s of SIGNALS) process.on(s, onSignal);
  return {
    signal: controller.signal,
    get received() {
      return received;
    },
    dispose,
  };
}

/**
 * After the work: when a signal came, the InterruptedError that reports it (exit 128 + its
 * number), worded `interrupted (SIGNAL)` + `after` (what was done), naming `path`.
 */
export function throwIfInterrupted(interrupts: Interrupts, after: string, path: string): void {
  const sig = interrupts.received;
  if (sig) throw new InterruptedError(sig, `interrupted (${sig})${after}`, { path });
}
