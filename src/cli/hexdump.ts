// Guest bytes as a hexdump, the layout of qemu-io's dump_buffer (`qdedup read -v`).

/** Guest bytes dumped per step: a hexdump takes ~4.3 characters a byte, smaller steps keep its strings small. */
export const HEXDUMP_CHUNK_BYTES = 1024 * 1024;

/** qemu-io's dump_buffer: offset, 16 hex bytes, then the alphanumerics (others as '.'). */
export function hexdumpLines(data: Buffer, baseOffset: number): string {
  let out = '';
  for (let i = 0; i < data.length; i += 16) {
    const row = data.subarray(i, Math.min(i + 16, data.length));
    let hexPart = '';
    let text = '';
    for (const b of row) {
      hexPart += b.toString(16).padStart(2, '0') + ' ';
      text += (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a) ? String.fromCharCode(b) : '.';
    }
    out += `${(baseOffset + i).toString(16).padStart(8, '0')}:  ${hexPart} ${text}\n`;
  }
  return out;
}
