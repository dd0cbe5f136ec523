// `qdedup write`'s report once the image is committed and closed, in this order: the dedup
// notices on stderr, the interruption (an InterruptedError), a stream too long for the disk,
// the `wrote N/M bytes` line (qemu-io's), then an input that ended before LENGTH.

import { printable } from '../errors.ts';
import type { GuestWriteResult } from '../dedup/guest-write.ts';
import { throwIfInterrupted, type Interrupts } from './interrupt.ts';
import type { Output } from './output.ts';

/** Reports the write of `r` at `offset` of `file`; throws what it ended with (after a successful commit). */
export async function reportWrite(file: string, offset: number, r: GuestWriteResult, interrupts: Interrupts, quiet: boolean, io: Output): Promise<void> {
  // After the write, so that a write that fails says one line, its error.
  if (r.notice && !quiet) io.err(`qdedup: ${printable(file)}: ${r.notice}`);
  if (r.mismatches) {
    io.err(
      `qdedup: ${printable(file)}: warning: ${r.mismatches} dedup index ${r.mismatches === 1 ? 'entry names a cluster' : 'entries name clusters'} ` +
        `holding other content; not used (a damaged index: 'qdedup check --deep' lists such entries)`,
    );
  }
  const of = r.total !== undefined ? `${r.written} of ${r.total} bytes` : `${r.written} bytes (of an input of unknown length)`;
  throwIfInterrupted(interrupts, ` after writing ${of} at offset ${offset}; the data written is durable`, file);
  if (r.overflow) throw r.overflow;
  if (!quiet) await io.out(`wrote ${r.written}/${r.total ?? r.written} bytes at offset ${offset}\n`);
  if (r.short) throw r.short;
}
