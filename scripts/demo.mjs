// `npm run demo`: a tour of qdedup in a temporary folder. Creates an image, writes a
// pattern, a file and zeroes, reads them back, shows info and checks the image, printing
// each command and its output. Exits non-zero if any step does not do what it should.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const bin = new URL('../bin/qdedup', import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), 'qdedup-demo-'));
const image = join(dir, 'disk.qcow2');
const data = join(dir, 'data.bin');
writeFileSync(data, randomBytes(3 * 1024 * 1024 + 123));

function step(args, expectStatus = 0) {
  console.log(`$ qdedup ${args.join(' ')}`);
  // maxBuffer: the read-back step prints 3 MiB (spawnSync's default limit is 1 MiB).
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'buffer', maxBuffer: 64 * 1024 * 1024 });
  const out = r.stdout.toString();
  if (out) process.stdout.write(out.length > 2000 ? `(${r.stdout.length} bytes of output)\n` : out);
  if (r.stderr.length) process.stdout.write(r.stderr.toString());
  if (r.status !== expectStatus) {
    const why = r.error ? ` (${r.error.message})` : r.signal ? ` (killed by ${r.signal})` : '';
    throw new Error(`demo: expected exit ${expectStatus}, got ${r.status}${why}`);
  }
  console.log('');
  return r.stdout;
}

try {
  console.log(`Working in ${dir}\n`);
  step(['create', image, '1G']);
  step(['write', '-P', '0xab', image, '0', '1M']);
  step(['write', '-i', data, image, '1000000']);
  step(['write', '-z', image, '512k', '64k']);
  step(['read', '-P', '0xab', image, '0', '512k']);
  step(['read', '-P', '0', image, '512k', '64k']);
  step(['read', '-v', image, '1048560', '32']);
  const back = step(['read', image, '1000000', String(3 * 1024 * 1024 + 123)]);
  const same = Buffer.compare(back, readFileSync(data)) === 0;
  console.log(same ? 'read back the 3 MiB file byte for byte: identical\n' : 'read back differs!\n');
  if (!same) throw new Error('demo: the file read back differs from the one written');
  step(['info', image]);
  step(['check', image]);
  step(['check', '--output', 'json', image]);
  console.log('demo: every step did what it should');
} catch (err) {
  console.error(err.message);
  process.exitCode = 1;
} finally {
  // process.exit() would skip this: the temporary folder is removed on failure too.
  rmSync(dir, { recursive: true, force: true });
}
