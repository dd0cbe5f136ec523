// `npm run demo`: a tour of qdedup in a temporary folder. Creates an image, writes a
// pattern, a file and zeroes, reads them back, shows info and checks the image; then takes in
// an existing disk: estimates it, converts it into a dedup image and back to raw, and
// deduplicates a plain image in place. Prints each command and its output; exits non-zero if
// any step does not do what it should.
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

  // An existing disk: 8 MiB, the same 2 MiB four times.
  const raw = join(dir, 'vm.raw');
  const block = randomBytes(2 * 1024 * 1024);
  writeFileSync(raw, Buffer.concat([block, block, block, block]));
  step(['estimate', raw]);
  const vm = join(dir, 'vm.qcow2');
  step(['convert', raw, vm]);
  step(['dedup-stats', vm]);
  const exported = join(dir, 'exported.raw');
  step(['convert', '-O', 'raw', vm, exported]);
  if (Buffer.compare(readFileSync(exported), readFileSync(raw)) !== 0) throw new Error('demo: the exported disk differs from the one converted');
  console.log('converted to a dedup image and back to raw: identical\n');
  const plain = join(dir, 'plain.qcow2');
  step(['convert', '-o', 'dedup=off,cluster_size=4k', raw, plain]);
  step(['dedup', plain]);
  step(['check', plain]);
  console.log('demo: every step did what it should');
} catch (err) {
  console.error(err.message);
  process.exitCode = 1;
} finally {
  // process.exit() would skip this: the temporary folder is removed on failure too.
  rmSync(dir, { recursive: true, force: true });
}
