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
        if (arg[i + 1] === ',') {
          cur += ',';
          i++;
          continue;
        }
        parts.push(cur);
        cur = '';
      } else cur += arg[i];
    }
    parts.push(cur);
    for (const p of parts) {
      if (p === '') continue;
      const eq = p.indexOf('=');
      const key = eq < 0 ? p : p.slice(0, eq);
      if (key === 'help' || key === '?') {
        out.set('help', '');
        continue;
      }
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

/**
 * Formats a byte count exactly as qemu's size_to_str: the unit from frexp(val / (1000 / 1024))
 * (a larger unit once the value reaches 1000 of the smaller one), then printf's "%0.3g"
 * of val / unit ("0 B", "0.977 KiB", "1.12 KiB" for 1.125: ties to even, "1e+03 KiB" for
 * 999.9 KiB, as qemu-img prints them). Takes a bigint for u64 fields (snapshot VM state).
 */
export function humanSize(bytes: number | bigint): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  const val = Number(bytes); // C's (double) conversion: round to nearest, ties to even
  const scaled = val / (1000 / 1024);
  let exp = 0; // frexp's exponent: scaled in [2^(exp-1), 2^exp)
  while (2 ** exp <= scaled) exp++;
  const i = Math.min(Math.trunc((exp - 1) / 10), units.length - 1);
  return `${formatG3(BigInt(val), 10n * BigInt(i))} ${units[i]}`;
}

/** printf("%.3g") of the exact value num / 2^shift (num ≥ 0): correctly rounded, ties to even. */
function formatG3(num: bigint, shift: bigint): string {
  if (num === 0n) return '0';
  const den = 1n << shift;
  // Decimal exponent: 10^e ≤ num/den < 10^(e+1).
  let e = num.toString().length - 1 - Math.floor(Number(shift) * Math.log10(2));
  const ge = (k: number) => (k >= 0 ? num >= den * 10n ** BigInt(k) : num * 10n ** BigInt(-k) >= den);
  while (!ge(e)) e--;
  while (ge(e + 1)) e++;
  // Three significant digits: q = round(num/den * 10^(2-e)).
  const p = 2 - e;
  const n = p >= 0 ? num * 10n ** BigInt(p) : num;
  const d = p >= 0 ? den : den * 10n ** BigInt(-p);
  let q = n / d;
  const r2 = (n % d) * 2n;
  if (r2 > d || (r2 === d && q % 2n === 1n)) q++;
  if (q === 1000n) {
    q = 100n;
    e++;
  }
  const digits = q.toString(); // three digits
  const strip = (t: string) => (t.includes('.') ? t.replace(/0+$/, '').replace(/\.$/, '') : t);
  if (e < -4 || e >= 3) {
    return `${strip(`${digits[0]}.${digits.slice(1)}`)}e${e < 0 ? '-' : '+'}${String(Math.abs(e)).padStart(2, '0')}`;
  }
  const point = e + 1; // digits before the decimal point (≤ 0: leading zeros after it)
  const fixed = point <= 0 ? `0.${'0'.repeat(-point)}${digits}` : point >= 3 ? digits : `${digits.slice(0, point)}.${digits.slice(point)}`;
  return strip(fixed);
}
