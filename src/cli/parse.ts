// Parsers for command-line values in qemu's syntax: sizes/offsets/lengths, pattern bytes
// and `-o key=value,…` option lists. Pure; errors are UsageError with qemu-like wording.

import { UsageError } from '../errors.ts';

const SUFFIX_SHIFT: Record<string, number> = { B: 0, K: 10, M: 20, G: 30, T: 40, P: 50, E: 60 };

/**
 * Parses a size as qemu does: bytes, a k/M/G/T/P/E suffix (powers of 1024, any case),
 * `b` for bytes, decimals with a suffix (`1.5G`), hex (`0x100000`). Throws UsageError
 * naming `what` for anything else, and above 2^53 (JavaScript's exact integer range).
 */
export function parseSize(text: string, what = 'size'): number {
  const m = /^(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)([bBkKmMgGtTpPeE])?$/.exec(text.trim());
  const invalid = () => new UsageError(`invalid ${what} '${text}': use a number of bytes, with an optional k, M, G, T, P or E suffix (powers of 1024)`);
  if (!m) throw invalid();
  const [, num, suffix] = m;
  const hexNumber = /^0x/i.test(num);
  const fraction = !hexNumber && num.includes('.');
  const shift = suffix ? SUFFIX_SHIFT[suffix.toUpperCase()] : 0;
  if (fraction && shift === 0) throw invalid(); // qemu: a fraction needs a unit
  const value = hexNumber ? Number.parseInt(num, 16) * 2 ** shift : Number.parseFloat(num) * 2 ** shift;
  const bytes = fraction ? Math.floor(value) : value;
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`${what} '${text}' is too large`);
  return bytes;
}

/** Parses a pattern byte like qemu-io: decimal, 0x hex or 0-prefixed octal, 0–255. */
export function parsePattern(text: string): number {
  let value = Number.NaN;
  if (/^0[xX][0-9a-fA-F]+$/.test(text)) value = Number.parseInt(text.slice(2), 16);
  else if (/^0[0-7]+$/.test(text)) value = Number.parseInt(text, 8);
  else if (/^[0-9]+$/.test(text)) value = Number.parseInt(text, 10);
  if (!(value >= 0 && value <= 255)) throw new UsageError(`${text} is not a valid pattern byte`);
  return value;
}

/**
 * Splits repeated `-o` arguments into key/value pairs: `a=1,b=2`; a comma inside a value
 * is written `,,`; a bare key means `on`; `help` and `?` are returned as key 'help'.
 */
export function parseOptionList(args: string[]): Map<string, string> {
  const out = new Map<string, string>();
  for (const arg of args) {
    const parts: string[] = [];
    let cur = '';
    for (let i = 0; i < arg.length; i++) {
      if (arg[i] === ',') {
        if (arg[i + 1] === ',') { cur += ','; i++; continue; }
        parts.push(cur);
        cur = '';
      } else cur += arg[i];
    }
    parts.push(cur);
    for (const p of parts) {
      if (p === '') continue;
      const eq = p.indexOf('=');
      const key = eq < 0 ? p : p.slice(0, eq);
      if (key === 'help' || key === '?') { out.set('help', ''); continue; }
      out.set(key, eq < 0 ? 'on' : p.slice(eq + 1));
    }
  }
  return out;
}

/** Parses on/off (and qemu's synonyms) for a named option. */
export function parseBool(text: string, what: string): boolean {
  if (['on', 'yes', 'true'].includes(text)) return true;
  if (['off', 'no', 'false'].includes(text)) return false;
  throw new UsageError(`parameter '${what}' expects 'on' or 'off', not '${text}'`);
}

/** Formats a byte count like qemu's size_to_str: three significant digits, binary units. */
export function humanSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let i = 0;
  while (i < units.length - 1 && bytes >= 1000 * 2 ** (10 * i)) i++;
  // qemu switches to the larger unit once the value reaches 1000 of the smaller one
  const value = bytes / 2 ** (10 * i);
  return `${Number(value.toPrecision(3))} ${units[i]}`;
}
