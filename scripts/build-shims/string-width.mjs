// Stand-in for the `string-width` package in the dist/ bundle (scripts/build.mjs). yargs,
// cliui and wrap-ansi use it only to lay out --help text. The real module builds a
// Unicode-property RegExp (`\p{RGI_Emoji}`, flag v) and an Intl.Segmenter when it is
// loaded, ~25 ms at every start of every command; this one does the same job for what
// qdedup's help holds (ASCII) at once, and for other text counts East Asian wide and
// fullwidth characters as 2 columns, control characters and combining marks as 0.
import stripAnsi from 'strip-ansi';
import { eastAsianWidth } from 'get-east-asian-width';

export default function stringWidth(text) {
  if (typeof text !== 'string' || text.length === 0) return 0;
  const plain = text.includes('\u001b') || text.includes('\u009b') ? stripAnsi(text) : text;
  if (/^[\x20-\x7e]*$/.test(plain)) return plain.length;
  let width = 0;
  for (const ch of plain) {
    const code = ch.codePointAt(0);
    if (code <= 0x1f || (code >= 0x7f && code <= 0x9f) || (code >= 0x300 && code <= 0x36f) || code === 0x200b || code === 0x200d || code === 0xfe0f) continue;
    width += eastAsianWidth(code, { ambiguousAsWide: false });
  }
  return width;
}
