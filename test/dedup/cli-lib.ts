// Helpers shared by the dedup tests that drive bin/qdedup: a folder of numbered images and
// inputs, a command that must succeed, cluster contents made from a tag, and where an
// image's dedup extension lies (to damage it).

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qdedup, tempDir, type RunResult } from '../helpers.ts';
import { EXT_DEDUP } from '../../src/format/dedup-ext.ts';

/** Runs bin/qdedup and asserts exit 0. */
export function qdedupOk(args: string[]): RunResult {
  const r = qdedup(args);
  assert.equal(r.status, 0, `qdedup ${args.join(' ')} failed: ${r.stderr}`);
  return r;
}

/** One cluster (`size` bytes) of content derived from `tag`: equal tags, equal clusters. */
export function clusterOf(tag: string, size = 4096): Buffer {
  const h = createHash('sha256').update(tag).digest();
  return Buffer.concat(Array.from({ length: size / h.length }, () => h));
}

export const sha256File = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

/** A temporary folder of numbered images (`qdedup create -q [-o OPTS] FILE SIZE`) and random input files. */
export function workFolder(prefix: string) {
  const dir = tempDir(prefix);
  let serial = 0;
  return {
    dir,
    create(size: string, opts?: string): string {
      const file = join(dir, `img-${++serial}.qcow2`);
      qdedupOk(['create', '-q', ...(opts ? ['-o', opts] : []), file, size]);
      return file;
    },
    randomFile(bytes: number): { path: string; data: Buffer } {
      const data = randomBytes(bytes);
      const path = join(dir, `input-${++serial}.raw`);
      writeFileSync(path, data);
      return { path, data };
    },
  };
}

/**
 * Where the dedup header extension's payload starts in an image's bytes, or -1: the header's
 * extension list is walked as it stands (at most 64 entries, inside the first cluster), so
 * the bytes may be a damaged image's.
 */
export function findDedupExtension(b: Buffer): number {
  if (b.length < 112) return -1;
  const end = Math.min(2 ** Math.min(b.readUInt32BE(20), 21), b.length);
  for (let pos = b.readUInt32BE(100), n = 0; pos + 8 <= end && n < 64; n++) {
    const type = b.readUInt32BE(pos);
    if (type === 0) break;
    if (type === EXT_DEDUP) return pos + 8;
    pos += 8 + Math.ceil(b.readUInt32BE(pos + 4) / 8) * 8;
  }
  return -1;
}

/** findDedupExtension() of an image that must have the extension. */
export function dedupExtensionPayload(bytes: Buffer): number {
  const at = findDedupExtension(bytes);
  assert.ok(at >= 0, 'the image has a dedup extension');
  return at;
}
