// CRC-32 (IEEE 802.3, the one node:zlib's crc32 computes) of dedup journal blocks and the
// dedup configuration area. node:zlib has it natively, but loading node:zlib costs ~3 ms of
// every start (docs/PERFORMANCE.md, "Start-up"), and `info` checks a few small blocks: so
// the first MiB a process checksums goes through a byte table in JavaScript, and only then
// is node:zlib loaded, for a long journal replay or scan. Both give the same values.

import { createRequire } from 'node:module';

/** Bytes checksummed in JavaScript before node:zlib takes over. */
const JS_BYTES = 1 << 20;
let jsBytes = 0;
let table: Int32Array | undefined;
let native: ((data: Uint8Array) => number) | undefined;

function makeTable(): Int32Array {
  const t = new Int32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c;
  }
  return t;
}

/** The CRC-32 of `data`, as an unsigned 32-bit number. */
export function crc32(data: Uint8Array): number {
  if (native) return native(data);
  if (jsBytes + data.length > JS_BYTES) {
    native = (createRequire(import.meta.url)('node:zlib') as typeof import('node:zlib')).crc32;
    return native(data);
  }
  jsBytes += data.length;
  table ??= makeTable();
  let c = -1;
  for (let i = 0; i < data.length; i++) c = table[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  return (c ^ -1) >>> 0;
}
