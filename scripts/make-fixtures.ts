// Regenerates fixtures/: small QCOW2 images made by qemu-img and qemu-io (the oracle),
// fixtures/manifest.json (the sha256 of each image's guest content, as `qemu-img convert
// -O raw` reads it, plus its layout) and fixtures/README.md (the exact commands).
//
// Usage: npm run fixtures        (needs qemu-img and qemu-io; run from the repository)
//
// Every image is built in a scratch folder by the commands listed below, run there with
// relative file names, so the README can quote them verbatim. The images only depend on
// those commands, except that snapshot entries carry the date they were taken.
// test/interop/differential-read.test.ts reads each image through `qdedup read` and
// compares it with the manifest.

import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const ROOT = new URL('..', import.meta.url).pathname;
const OUT = join(ROOT, 'fixtures');
/** Keep the whole folder small: it is committed. */
const MAX_TOTAL_BYTES = 2 * 1024 * 1024;

interface Fixture {
  /** Image file name in fixtures/. */
  file: string;
  /** What it exercises (README and manifest). */
  about: string;
  /** Shell commands, run in order in the scratch folder. */
  commands: string[];
  /** Other files it needs in fixtures/ (backing files). */
  needs?: string[];
  /** Format of the fixture file itself (raw backing files are fixtures too). */
  format?: 'qcow2' | 'raw';
  /** Internal snapshots whose content the manifest records. */
  snapshots?: string[];
  /** Helper files made by the commands and then deleted (not committed). */
  scratch?: string[];
}

/** qemu-io with several commands, quiet (`-q` per command keeps the output short). */
const io = (file: string, cmds: string[], fmt = 'qcow2') => `qemu-io -f ${fmt} ${cmds.map((c) => `-c '${c}'`).join(' ')} ${file}`;

const FIXTURES: Fixture[] = [
  {
    file: 'v2-512.qcow2',
    about:
      'compat 0.10 (version 2), 512 B clusters (one L2 table maps 32 KiB: writes cross L2 tables), overlapping unaligned writes, zeroes written into a v2 image, data up to the last byte',
    commands: [
      'qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 v2-512.qcow2 80k',
      io('v2-512.qcow2', [
        'write -q -P 0x11 0 1000',
        'write -q -P 0x22 700 3000',
        'write -q -P 0x33 32000 1537',
        'write -q -z 2048 1024',
        'write -q -P 0x44 65500 100',
        'write -q -P 0x55 81910 10',
      ]),
    ],
  },
  {
    file: 'v3-4k-zero-discard.qcow2',
    about:
      '4 KiB clusters: zero clusters with a preallocated host cluster (write -z), without one (write -z -u, and write -z on unallocated clusters), discarded clusters, and a partial write into a zero cluster',
    commands: [
      'qemu-img create -q -f qcow2 -o cluster_size=4096 v3-4k-zero-discard.qcow2 128k',
      io('v3-4k-zero-discard.qcow2', [
        'write -q -P 0x5a 0 64k',
        'write -q -z 8k 8k',
        'write -q -z -u 24k 4k',
        'discard -q 40k 8k',
        'write -q -z 100k 12k',
        'write -q -P 0xa5 9000 100',
        'write -q -P 0x3c 125000 6072',
      ]),
    ],
  },
  {
    file: 'v3-4k-compressed.qcow2',
    about: '4 KiB clusters, every cluster compressed by qemu-img convert -c (deflate streams packed across host clusters); runs of zeros stay unallocated',
    commands: [
      'qemu-img create -q -f raw src-4k.raw 192k',
      io(
        'src-4k.raw',
        ['write -q -P 0x61 0 5000', 'write -q -P 0x62 5000 7000', 'write -q -P 0x63 20000 30000', 'write -q -P 0x64 100000 1', 'write -q -P 0x65 131072 61000'],
        'raw',
      ),
      'qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096 src-4k.raw v3-4k-compressed.qcow2',
    ],
    scratch: ['src-4k.raw'],
  },
  {
    file: 'v2-8k-compressed.qcow2',
    about: 'compat 0.10 with 8 KiB compressed clusters (qemu-img convert -c), then qemu-io overwrites part of a compressed cluster (copy on write)',
    commands: [
      'qemu-img create -q -f raw src-8k.raw 128k',
      io('src-8k.raw', ['write -q -P 0x71 0 40000', 'write -q -P 0x72 40000 30000', 'write -q -P 0x73 90000 38000'], 'raw'),
      'qemu-img convert -c -f raw -O qcow2 -o cluster_size=8192,compat=0.10 src-8k.raw v2-8k-compressed.qcow2',
      io('v2-8k-compressed.qcow2', ['write -q -P 0x74 10000 100']),
    ],
    scratch: ['src-8k.raw'],
  },
  {
    file: 'v3-64k-mixed.qcow2',
    about:
      '64 KiB clusters (the default) mixing normal, compressed (write -c), zero and unallocated clusters and a size that is not a multiple of the cluster size',
    commands: [
      'qemu-img create -q -f qcow2 v3-64k-mixed.qcow2 600000',
      io('v3-64k-mixed.qcow2', [
        'write -q -P 0x01 1000 60000',
        'write -q -c -P 0x02 128k 64k',
        'write -q -c -P 0x03 192k 64k',
        'write -q -z 256k 64k',
        'write -q -P 0x04 590000 10000',
      ]),
    ],
  },
  {
    file: 'v3-1k-refcount1.qcow2',
    about: '1-bit refcounts (refcount_order 0) with 1 KiB clusters',
    commands: [
      'qemu-img create -q -f qcow2 -o cluster_size=1024,refcount_bits=1 v3-1k-refcount1.qcow2 96k',
      io('v3-1k-refcount1.qcow2', ['write -q -P 0x81 1000 20000', 'write -q -P 0x82 40960 1024', 'write -q -z 4096 2048', 'write -q -P 0x83 98000 304']),
    ],
  },
  {
    file: 'v3-2k-refcount64.qcow2',
    about: '64-bit refcounts (refcount_order 6) with 2 KiB clusters',
    commands: [
      'qemu-img create -q -f qcow2 -o cluster_size=2048,refcount_bits=64 v3-2k-refcount64.qcow2 160k',
      io('v3-2k-refcount64.qcow2', ['write -q -P 0x91 0 3', 'write -q -P 0x92 4095 70000', 'discard -q 8192 4096', 'write -q -P 0x93 163000 840']),
    ],
  },
  {
    file: 'chain-base.qcow2',
    about: 'bottom of a three-image backing chain (4 KiB clusters)',
    commands: [
      'qemu-img create -q -f qcow2 -o cluster_size=4096 chain-base.qcow2 64k',
      io('chain-base.qcow2', ['write -q -P 0xb1 0 64k', 'write -q -P 0xb2 10000 5000']),
    ],
  },
  {
    file: 'chain-mid.qcow2',
    about: 'middle of the chain: 512 B clusters, backing file "chain-base.qcow2" (a relative name, resolved against the image\'s folder)',
    needs: ['chain-base.qcow2'],
    commands: [
      'qemu-img create -q -f qcow2 -o cluster_size=512 -b chain-base.qcow2 -F qcow2 chain-mid.qcow2 96k',
      io('chain-mid.qcow2', ['write -q -P 0xc1 1000 10', 'write -q -P 0xc2 60000 9000']),
    ],
  },
  {
    file: 'chain-top.qcow2',
    about:
      'top of the chain: 2 KiB clusters, backing file "chain-mid.qcow2", larger than its backing file (the tail reads as zeros), zero clusters that hide backing data',
    needs: ['chain-mid.qcow2', 'chain-base.qcow2'],
    commands: [
      'qemu-img create -q -f qcow2 -o cluster_size=2048 -b chain-mid.qcow2 -F qcow2 chain-top.qcow2 160k',
      io('chain-top.qcow2', ['write -q -P 0xd1 100 50', 'write -q -z 16k 8k', 'write -q -P 0xd2 96000 4000', 'write -q -P 0xd3 162000 1840']),
    ],
  },
  {
    file: 'raw-base.raw',
    about: 'a raw backing file (not QCOW2): guest offset = file offset',
    format: 'raw',
    commands: ['qemu-img create -q -f raw raw-base.raw 64k', io('raw-base.raw', ['write -q -P 0xe1 0 64k', 'write -q -P 0xe2 3000 3000'], 'raw')],
  },
  {
    file: 'raw-overlay.qcow2',
    about: '1 KiB clusters over the raw backing file "raw-base.raw" (relative name), larger than it',
    needs: ['raw-base.raw'],
    commands: [
      'qemu-img create -q -f qcow2 -o cluster_size=1024 -b raw-base.raw -F raw raw-overlay.qcow2 96k',
      io('raw-overlay.qcow2', ['write -q -P 0xf1 500 1000', 'write -q -z 8k 2k', 'write -q -P 0xf2 65000 2000']),
    ],
  },
  {
    file: 'v3-4k-snapshot.qcow2',
    about:
      'an internal snapshot "s1": clusters shared by the snapshot and the active L1 (refcount 2, COPIED clear), then overwritten in the active image (copy on write)',
    snapshots: ['s1'],
    commands: [
      'qemu-img create -q -f qcow2 -o cluster_size=4096 v3-4k-snapshot.qcow2 128k',
      io('v3-4k-snapshot.qcow2', ['write -q -P 0x1a 0 64k', 'write -q -P 0x1b 100000 5000']),
      'qemu-img snapshot -c s1 v3-4k-snapshot.qcow2',
      io('v3-4k-snapshot.qcow2', ['write -q -P 0x2a 1000 6000', 'write -q -z 32k 4k', 'write -q -P 0x2b 120000 3000']),
    ],
  },
];

interface ManifestEntry {
  file: string;
  format: 'qcow2' | 'raw';
  about: string;
  bytes: number;
  virtualSize: number;
  clusterSize?: number;
  compat?: string;
  refcountBits?: number;
  backingFile?: string;
  /** sha256 of the guest content (qemu-img convert -O raw), hex. */
  sha256: string;
  /** sha256 of each internal snapshot's guest content. */
  snapshots?: Record<string, string>;
}

function sh(cmd: string, cwd: string): string {
  const r = spawnSync('sh', ['-c', cmd], { cwd, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`make-fixtures: '${cmd}' failed (${r.status}): ${r.stderr || r.stdout}`);
  return r.stdout;
}

function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

function main(): void {
  if (spawnSync('qemu-img', ['--version']).status !== 0 || spawnSync('qemu-io', ['--version']).status !== 0) {
    console.error('make-fixtures: qemu-img and qemu-io are needed (apt-get install qemu-utils)');
    process.exit(1);
  }
  const version = sh('qemu-img --version', ROOT).split('\n')[0];
  const work = mkdtempSync(join(tmpdir(), 'qdedup-fixtures-'));
  try {
    const manifest: ManifestEntry[] = [];
    for (const f of FIXTURES) {
      for (const cmd of f.commands) sh(cmd, work);
      for (const s of f.scratch ?? []) unlinkSync(join(work, s));
      const format = f.format ?? 'qcow2';
      const info = JSON.parse(sh(`qemu-img info -f ${format} --output=json ${f.file}`, work));
      const guest = join(work, `${f.file}.guest`);
      sh(`qemu-img convert -f ${format} -O raw ${f.file} ${f.file}.guest`, work);
      const entry: ManifestEntry = {
        file: f.file,
        format,
        about: f.about,
        bytes: statSync(join(work, f.file)).size,
        virtualSize: info['virtual-size'],
        sha256: sha256(guest),
      };
      unlinkSync(guest);
      if (format === 'qcow2') {
        entry.clusterSize = info['cluster-size'];
        entry.compat = info['format-specific'].data.compat;
        entry.refcountBits = info['format-specific'].data['refcount-bits'];
        if (info['backing-filename']) entry.backingFile = info['backing-filename'];
        const check = spawnSync('qemu-img', ['check', '-q', '-f', 'qcow2', f.file], { cwd: work });
        if (check.status !== 0) throw new Error(`make-fixtures: qemu-img check ${f.file} exited ${check.status}`);
      }
      for (const s of f.snapshots ?? []) {
        sh(`qemu-img convert -f qcow2 -l snapshot.name=${s} -O raw ${f.file} ${f.file}.${s}`, work);
        (entry.snapshots ??= {})[s] = sha256(join(work, `${f.file}.${s}`));
        unlinkSync(join(work, `${f.file}.${s}`));
      }
      manifest.push(entry);
    }

    // Replace the images in fixtures/ (only the ones this script makes, plus stale ones it made before).
    const old = (() => {
      try {
        return JSON.parse(readFileSync(join(OUT, 'manifest.json'), 'utf8')).images as ManifestEntry[];
      } catch {
        return [];
      }
    })();
    for (const e of old) rmSync(join(OUT, e.file), { force: true });
    let total = 0;
    for (const e of manifest) {
      copyFileSync(join(work, e.file), join(OUT, e.file));
      total += e.bytes;
    }
    if (total > MAX_TOTAL_BYTES) throw new Error(`make-fixtures: the images take ${total} bytes, more than ${MAX_TOTAL_BYTES}`);
    writeFileSync(
      join(OUT, 'manifest.json'),
      JSON.stringify(
        {
          generator: 'scripts/make-fixtures.ts (npm run fixtures)',
          qemu: version,
          hash: 'sha256 of the guest content as `qemu-img convert -f FORMAT -O raw` reads it',
          images: manifest,
        },
        null,
        2,
      ) + '\n',
    );
    writeFileSync(join(OUT, 'README.md'), readme(manifest, version));
    const listed = new Set([...manifest.map((e) => e.file), 'manifest.json', 'README.md']);
    const strays = readdirSync(OUT).filter((n) => !listed.has(n));
    console.log(`make-fixtures: ${manifest.length} images, ${total} bytes in fixtures/ (${version})`);
    if (strays.length) console.log(`make-fixtures: files in fixtures/ not made by this script: ${strays.join(', ')}`);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

function readme(manifest: ManifestEntry[], version: string): string {
  let text = `# Fixtures

Small images made by \`qemu-img\` and \`qemu-io\` (${version}), committed so that the
tests can read QEMU-written images without QEMU installed. **Do not edit by hand**:
\`npm run fixtures\` (scripts/make-fixtures.ts) rebuilds every image, \`manifest.json\` and
this file. Each image is built in an empty scratch folder by exactly the commands listed
under it, run there in order (relative names: the backing chains store relative backing
file names, resolved against the image's own folder).

\`manifest.json\` records, for each image, its layout (virtual size, cluster size, compat,
refcount width, backing file) and the **sha256 of its guest content** as \`qemu-img
convert -f FORMAT -O raw IMAGE OUT\` reads it (backing files included; internal snapshots
separately). \`test/interop/differential-read.test.ts\` reads every image through
\`qdedup read\` and compares the hash.

Regenerated images differ from the committed ones only in snapshot dates; the guest
hashes stay the same.

| Image | Bytes | Virtual size | Cluster | compat | refcount bits | Backing |
|---|---:|---:|---:|---|---:|---|
`;
  for (const e of manifest) {
    text += `| \`${e.file}\` | ${e.bytes} | ${e.virtualSize} | ${e.clusterSize ?? '—'} | ${e.compat ?? (e.format === 'raw' ? 'raw' : '—')} | ${e.refcountBits ?? '—'} | ${e.backingFile ? `\`${e.backingFile}\`` : '—'} |\n`;
  }
  for (const f of FIXTURES) {
    const e = manifest.find((m) => m.file === f.file)!;
    text += `\n## ${f.file}\n\n${f.about}.\n\n`;
    if (f.needs?.length) text += `Needs (in the same folder): ${f.needs.map((n) => `\`${n}\``).join(', ')}.\n\n`;
    text += '```sh\n' + f.commands.join('\n') + '\n';
    if (f.scratch?.length) text += `rm ${f.scratch.join(' ')}\n`;
    text += '```\n\n';
    text += `Guest sha256: \`${e.sha256}\`\n`;
    for (const [s, h] of Object.entries(e.snapshots ?? {})) text += `Snapshot \`${s}\` sha256: \`${h}\`\n`;
  }
  return text;
}

main();
