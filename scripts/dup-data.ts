// Benchmark input with a known share of duplicate 4 KiB blocks: each block repeats an
// earlier one with probability `dupShare`, else it is new. New blocks are one random
// 4 KiB block stamped with a counter (distinct hashes, no zero runs). Seeded: the same
// file every run.

import { closeSync, openSync, writeSync } from 'node:fs';

const BLOCK = 4096;

export function writeDuplicateFile(path: string, size: number, dupShare = 0.5, seed = 1): { blocks: number; unique: number } {
  let x = seed >>> 0 || 1;
  const rnd = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x1_0000_0000;
  };
  const base = Buffer.alloc(BLOCK);
  for (let i = 0; i < BLOCK; i += 4) base.writeUInt32LE((rnd() * 0x1_0000_0000) >>> 0, i);
  const fd = openSync(path, 'w');
  const chunk = Buffer.alloc(16 * 1024 * 1024);
  let unique = 0;
  let blocks = 0;
  try {
    for (let done = 0; done < size; done += chunk.length) {
      const n = Math.min(chunk.length, size - done);
      for (let p = 0; p < n; p += BLOCK, blocks++) {
        const id = unique > 0 && rnd() < dupShare ? Math.floor(rnd() * unique) : unique++;
        base.copy(chunk, p);
        chunk.writeUInt32LE(id, p);
        chunk.writeUInt32LE(id ^ 0x5bd1e995, p + 2048);
      }
      writeSync(fd, chunk, 0, n);
    }
  } finally {
    closeSync(fd);
  }
  return { blocks, unique };
}
