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

  /** The value stored under the key of the hash at byte `at` of `hash` (its bytes 0–5), or -1. */
  get(hash: Uint8Array, at = 0): number {
    return this.at[this.slotOf(hash, at)];
  }

  /** Stores `value` (≥ 0) under the key of the hash at byte `at` of `hash`, replacing what was there. */
  set(hash: Uint8Array, value: number, at = 0): void {
    const s = this.slotOf(hash, at);
    this.hi[s] = keyHi(hash, at);
    this.lo[s] = keyLo(hash, at);
    this.at[s] = value;
  }

  /** The slot holding the key, or the empty slot where it would go (linear probing). */
  private slotOf(hash: Uint8Array, at: number): number {
    const hi = keyHi(hash, at);
    const lo = keyLo(hash, at);
    let s = Math.imul(hi ^ Math.imul(lo, 0x9e37_79b1), 0x85eb_ca6b) & this.mask;
    while (this.at[s] >= 0 && (this.hi[s] !== hi || this.lo[s] !== lo)) s = (s + 1) & this.mask;
    return s;
  }
}

function keyHi(hash: Uint8Array, at: number): number {
  return ((hash[at] << 24) | (hash[at + 1] << 16) | (hash[at + 2] << 8) | hash[at + 3]) >>> 0;
}

function keyLo(hash: Uint8Array, at: number): number {
  return (hash[at + 4] << 8) | hash[at + 5];
}
