// Guest bytes verified against a one-byte pattern (`qdedup read -P`, as qemu-io read -P):
// finds the first byte that differs, comparing a block at a time.

/** Bytes of the expected pattern compared at a time. */
const PATTERN_BYTES = 64 * 1024;

export class PatternCheck {
  private readonly expected: Buffer;
  /** Guest offset of the first byte that differs from the pattern; -1 while there is none. */
  firstMismatch = -1;

  constructor(readonly pattern: number) {
    this.expected = Buffer.alloc(PATTERN_BYTES, pattern);
  }

  /** Checks `data`, the guest bytes from `guestOffset` (nothing more once a mismatch is found). */
  check(data: Buffer, guestOffset: number): void {
    if (this.firstMismatch >= 0) return;
    const at = this.mismatchIn(data);
    if (at >= 0) this.firstMismatch = guestOffset + at;
  }

  /** Index of the first byte of `data` that is not the pattern, or -1. */
  private mismatchIn(data: Buffer): number {
    const expected = this.expected;
    for (let at = 0; at < data.length; at += expected.length) {
      const n = Math.min(expected.length, data.length - at);
      if (data.compare(expected, 0, n, at, at + n) === 0) continue;
      for (let i = at; i < at + n; i++) if (data[i] !== this.pattern) return i;
    }
    return -1;
  }
}
