// The content keys of one batch of the write path (Dedup.writeClusters): the first 48 bits of
// a cluster's hash → the batch index of the first cluster stored under that key. An
// open-addressing table in typed arrays: a Map keyed by 48-bit numbers (heap numbers, not
// small integers) was a sixth of the decision loop's own time. Same answers as such a Map.

export class BatchKeys {
  /** Bytes 0–3 and 4–5 of each stored key; `at` the value, -1 for an empty slot. */
  private readonly hi: Uint32Array;
  private readonly lo: Uint16Array;
  private readonly at: Int32Array;
  private readonly mask: number;

  /** A table for at most `count` keys (kept at most half full). */
  constructor(count: number) {
    let size = 16;
    while (size < 2 * count) size *= 2;
    this.hi = new Uint32Array(size);
    this.lo = new Uint16Array(size);
    this.at = new Int32Array(size).fill(-1);
    this.mask = size - 1;
  }

  /** The value stored under the key of `hash` (its bytes 0–5), or -1. */
  get(hash: Uint8Array): number {
    return this.at[this.slotOf(hash)];
  }

  /** Stores `value` (≥ 0) under the key of `hash`, replacing what was there. */
  set(hash: Uint8Array, value: number): void {
    const s = this.slotOf(hash);
    this.hi[s] = keyHi(hash);
    this.lo[s] = keyLo(hash);
    this.at[s] = value;
  }

  /** The slot holding the key of `hash`, or the empty slot where it would go (linear probing). */
  private slotOf(hash: Uint8Array): number {
    const hi = keyHi(hash);
    const lo = keyLo(hash);
    let s = Math.imul(hi ^ Math.imul(lo, 0x9e37_79b1), 0x85eb_ca6b) & this.mask;
    while (this.at[s] >= 0 && (this.hi[s] !== hi || this.lo[s] !== lo)) s = (s + 1) & this.mask;
    return s;
  }
}

function keyHi(hash: Uint8Array): number {
  return ((hash[0] << 24) | (hash[1] << 16) | (hash[2] << 8) | hash[3]) >>> 0;
}

function keyLo(hash: Uint8Array): number {
  return (hash[4] << 8) | hash[5];
}
