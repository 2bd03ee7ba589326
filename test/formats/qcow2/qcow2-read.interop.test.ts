/**
 * Reading every kind of qcow2 image qemu 7.2 makes (docs/notes/commands.md §3): our guest content is
 * byte-identical to qemu's (the SHA-256s of commands.md §6), `map --output=json` and
 * `info --output=json` agree with qemu-img's, snapshots read as qemu reads them.
 */
import { test, before, after } from 'node:test';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { openImage } from '#src/node.js';
import { imageInfo } from '#src/ops/info.js';
import { mapJson } from '#src/ops/map.js';
import { isQcowError } from '#src/core/errors.js';
import { deviceSha256, needs, qemuImg, run, runOk } from '../../support/qemu.js';

const SRC = '90d40fd268e7c7243a568dc7f395082bc62d0fd19baa692da3a96cef61dd79c2';
const PASSWORD = 'hunter2';

/** commands.md §0 (the 4 MiB source) and §3 (every qcow2 kind), without the expected failures. */
const MAKE_IMAGES = String.raw`
qemu-img create -q -f raw src.raw 4M
qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'write -P 0xcd 2M 64k' src.raw >/dev/null
head -c 1048576 /dev/zero | openssl enc -aes-128-ctr -nosalt -K 000102030405060708090a0b0c0d0e0f -iv 00000000000000000000000000000000 | dd of=src.raw bs=1M seek=3 conv=notrunc status=none
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 4M
qemu-io -f qcow2 -c 'write -P 0xab 128k 64k' v2.qcow2
qemu-img create -q -f qcow2 v3.qcow2 4M
qemu-io -f qcow2 -c 'write -P 0xab 128k 64k' v3.qcow2
for cs in 512 4k 64k 2M; do qemu-img convert -O qcow2 -o cluster_size=$cs src.raw v3-cs$cs.qcow2; done
qemu-img convert -c -O qcow2 src.raw v3-zlib.qcow2
qemu-img convert -c -O qcow2 -o compression_type=zstd src.raw v3-zstd.qcow2
qemu-img convert -c -O qcow2 -o compat=0.10 src.raw v2-zlib.qcow2
qemu-img convert -c -O qcow2 -o cluster_size=4k src.raw v3-zlib-4k.qcow2
qemu-img convert -O qcow2 --object secret,id=sec0,data=hunter2 -o encrypt.format=aes,encrypt.key-secret=sec0 src.raw v3-aes.qcow2
qemu-img convert -O qcow2 --object secret,id=sec0,data=hunter2 -o compat=0.10,encrypt.format=aes,encrypt.key-secret=sec0 src.raw v2-aes.qcow2
# qemu-img's PBKDF2 calibration sometimes fails on a busy machine ("Unable to get accurate CPU usage"): retry
for i in 1 2 3 4 5; do qemu-img convert -O qcow2 --object secret,id=sec0,data=hunter2 -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100 src.raw v3-luks.qcow2 2>luks.err && break; sleep 1; done
test -s v3-luks.qcow2 || { cat luks.err >&2; exit 1; }
qemu-img convert -O qcow2 src.raw v3-snap.qcow2
qemu-img snapshot -c snap1 v3-snap.qcow2
qemu-io -f qcow2 -c 'write -P 0x77 0 64k' v3-snap.qcow2
qemu-img snapshot -c snap2 v3-snap.qcow2
qemu-io -f qcow2 -c 'write -P 0x78 64k 64k' v3-snap.qcow2
qemu-img convert -O qcow2 -o compat=0.10 src.raw v2-snap.qcow2
qemu-img snapshot -c s1 v2-snap.qcow2
qemu-io -f qcow2 -c 'write -P 0x77 0 64k' v2-snap.qcow2
cp v3-snap.qcow2 v3-snap-applied.qcow2
qemu-img snapshot -a snap1 v3-snap-applied.qcow2
qemu-img snapshot -d snap2 v3-snap-applied.qcow2
qemu-img convert -O qcow2 src.raw v3-zero.qcow2
qemu-io -f qcow2 -c 'write -z 0 64k' -c 'write -z -u 64k 64k' -c 'write -z 1M 128k' v3-zero.qcow2
qemu-img convert -O qcow2 -o compat=0.10 src.raw v2-zero.qcow2
qemu-io -f qcow2 -c 'write -z 0 64k' -c 'write -z -u 64k 64k' v2-zero.qcow2
qemu-img convert -O qcow2 src.raw v3-discard.qcow2
qemu-io -f qcow2 -c 'discard 0 128k' v3-discard.qcow2
qemu-img convert -O qcow2 -o compat=0.10 src.raw v2-discard.qcow2
qemu-io -f qcow2 -c 'discard 0 128k' v2-discard.qcow2
qemu-img create -q -f qcow2 -b src.raw -F raw v3-discard-bk.qcow2
qemu-io -f qcow2 -c 'write -P 1 0 128k' -c 'discard 64k 64k' v3-discard-bk.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k v3-xl2.qcow2 4M
qemu-io -f qcow2 -c 'write -P 0xab 4k 2k' -c 'write -z 128k 4k' -c 'write -P 1 256k 64k' -c 'write -z 256k 2k' v3-xl2.qcow2
qemu-img convert -O qcow2 -o extended_l2=on,cluster_size=32k src.raw v3-xl2-conv.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on -b src.raw -F raw v3-xl2-bk.qcow2
qemu-io -f qcow2 -c 'write -P 0x42 10k 6k' v3-xl2-bk.qcow2
for rb in 1 2 4 8 16 32 64; do qemu-img convert -O qcow2 -o refcount_bits=$rb src.raw v3-rb$rb.qcow2; done
qemu-img convert -O qcow2 -o data_file=v3-ext.data src.raw v3-ext.qcow2
qemu-img convert -O qcow2 -o data_file=v3-extraw.data,data_file_raw=on src.raw v3-extraw.qcow2
qemu-img create -q -f qcow2 -b src.raw -F raw v3-chain1.qcow2
qemu-io -f qcow2 -c 'write -P 0xa1 1M 1M' v3-chain1.qcow2
qemu-img create -q -f qcow2 -b v3-chain1.qcow2 -F qcow2 v3-chain2.qcow2
qemu-io -f qcow2 -c 'write -P 0xa2 2M 512k' v3-chain2.qcow2
qemu-img create -q -f qcow2 -b v3-chain2.qcow2 -F qcow2 v3-chain3.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0xa3 2M 4k' -c 'write -P 0xa4 6M 64k' v3-chain3.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 -b v3.qcow2 -F qcow2 v2-over-v3.qcow2
qemu-io -f qcow2 -c 'write -P 0x5f 0 4k' v2-over-v3.qcow2
qemu-img create -q -f qcow2 -o lazy_refcounts=on v3-dirty.qcow2 4M
qemu-io -f qcow2 -c 'write -P 0x5a 0 64k' -c abort v3-dirty.qcow2 >/dev/null 2>&1 || true
qemu-img create -q -f qcow2 v3-corrupt.qcow2 4M
qemu-io -f qcow2 -c 'write -P 0xab 128k 64k' v3-corrupt.qcow2
printf '\x80\x00\x00\x00\x00\x03\x00\x00' | dd of=v3-corrupt.qcow2 bs=1 seek=$((0x40010)) conv=notrunc status=none
qemu-io -f qcow2 -c 'write -P 1 128k 4k' v3-corrupt.qcow2 >/dev/null 2>&1 || true
qemu-img convert -O qcow2 src.raw v3-bitmaps.qcow2
qemu-img bitmap --add v3-bitmaps.qcow2 bm0
qemu-img bitmap --add -g 128k --disable v3-bitmaps.qcow2 bm1
qemu-img create -q -f qcow2 -o preallocation=metadata v3-prealloc.qcow2 4M
cp v3-zero.qcow2 v3-zero-amended-v2.qcow2
qemu-img amend -f qcow2 -o compat=0.10 v3-zero-amended-v2.qcow2
cp v3.qcow2 v3-amended-rb64.qcow2
qemu-img amend -f qcow2 -o refcount_bits=64 v3-amended-rb64.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 qbase.qcow2 4M
qemu-io -f qcow2 -c 'write -P 0x11 0 3M' qbase.qcow2
qemu-img create -q -f qcow2 -b qbase.qcow2 -F qcow2 -o extended_l2=on qxl2.qcow2
qemu-io -f qcow2 -c 'write -P 0x42 10k 6k' -c 'write -z 80k 4k' qxl2.qcow2
qemu-img create -q -f qcow2 -b qxl2.qcow2 -F qcow2 -o compat=0.10 qtop.qcow2 6M
qemu-io -f qcow2 -c 'write -P 0x43 1M 4k' -c 'write -z 5M 64k' qtop.qcow2
`;

/** commands.md §6: guest-content SHA-256 as qemu reads each image. */
const EXPECTED: Record<string, string> = {
  v2: 'efbf2bd592a7df82bfe4fb59979c07345a4e8f1690a81b4c2f351f0d9a02dedc',
  v3: 'efbf2bd592a7df82bfe4fb59979c07345a4e8f1690a81b4c2f351f0d9a02dedc',
  'v3-amended-rb64': 'efbf2bd592a7df82bfe4fb59979c07345a4e8f1690a81b4c2f351f0d9a02dedc',
  'v3-snap': 'ae96e3db10d08e0994a4502053623709fd3af85a75da8fd61369d5014b29f24f',
  'v2-snap': 'b91e69256118e382ffa5d603b726928e897a27f0eedf4cf238b9282946f4a623',
  'v3-zero': 'ff33ac5a6b3c33dfedee267efac61d267b06f9fb5445c0c440885017b99ea93c',
  'v2-zero': 'ff33ac5a6b3c33dfedee267efac61d267b06f9fb5445c0c440885017b99ea93c',
  'v3-discard': 'ff33ac5a6b3c33dfedee267efac61d267b06f9fb5445c0c440885017b99ea93c',
  'v2-discard': 'ff33ac5a6b3c33dfedee267efac61d267b06f9fb5445c0c440885017b99ea93c',
  'v3-zero-amended-v2': 'ff33ac5a6b3c33dfedee267efac61d267b06f9fb5445c0c440885017b99ea93c',
  'v3-discard-bk': '9accd68ff5838a142907f604160c91165ae32c1e93c9111f850c8e6031c1af85',
  'v3-xl2': '407fbd3b14a215bb10e061278aceecd89887fbb0c442aade695ea31345bd2c51',
  'v3-xl2-bk': '490bcbe5d00e69b2b402a00d5c591f236f024dbe5c81482eaba25c7467c46871',
  'v3-chain3': '4c3c05fdbcb43510c547133900fe4f547cc757aab2f82798c8e0fd1a4db45a93',
  'v2-over-v3': 'cecff4fd4b8103a71fa6c3c78c2cb856dba7ae4a6b8c2680febea3547c14da11',
  'v3-prealloc': 'bb9f8df61474d25e71fa00722318cd387396ca1736605e1248821cc0de3d3af8',
  'v3-dirty': 'cb6d4ec922a9ef7377c0e08358fa5c1c93bc261c77610fa04bc6073db571a15a',
};
for (const n of ['v3-cs512', 'v3-cs4k', 'v3-cs64k', 'v3-cs2M', 'v3-zlib', 'v3-zstd', 'v2-zlib', 'v3-zlib-4k', 'v3-xl2-conv', 'v3-rb1', 'v3-rb2', 'v3-rb4', 'v3-rb8', 'v3-rb16', 'v3-rb32', 'v3-rb64', 'v3-ext', 'v3-extraw', 'v3-bitmaps', 'v3-aes', 'v2-aes', 'v3-luks', 'v3-snap-applied']) {
  EXPECTED[n] = SRC;
}
const ENCRYPTED = new Set(['v3-aes', 'v2-aes', 'v3-luks']);
/** Chains with a raw layer: our raw driver cannot see file holes, so qemu's map differs there. */
const RAW_IN_CHAIN = new Set(['v3-discard-bk', 'v3-xl2-bk', 'v3-chain3']);

const qemuOpenArgs = (path: string, name: string) =>
  ENCRYPTED.has(name)
    ? ['--object', `secret,id=sec0,data=${PASSWORD}`, '--image-opts', `driver=qcow2,file.filename=${path},encrypt.key-secret=sec0`]
    : ['-U', path];

let dir = '';
const ready = needs('qemu-img', 'qemu-io', 'openssl');

before(async () => {
  if (ready.skip) return;
  dir = await mkdtemp(join(tmpdir(), 'qcow2-read-'));
  await runOk('bash', ['-e', '-c', MAKE_IMAGES], { cwd: dir, timeoutMs: 300_000 });
});

after(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

const open = (name: string, extra: Parameters<typeof openImage>[1] = {}) =>
  openImage(join(dir, `${name}.qcow2`), { readOnly: true, password: ENCRYPTED.has(name) ? PASSWORD : undefined, ...extra });

test('guest content of every qcow2 kind equals what qemu reads (commands.md §6)', ready, async () => {
  for (const [name, sha] of Object.entries(EXPECTED)) {
    const dev = await open(name);
    try {
      assert.equal(await deviceSha256(dev), sha, name);
    } finally {
      await dev.close();
    }
  }
});

test('map --output=json equals qemu-img map for images whose chain is all qcow2', ready, async (t) => {
  const names = [...Object.keys(EXPECTED).filter((n) => !RAW_IN_CHAIN.has(n)), 'qtop', 'qxl2', 'v3-corrupt'];
  for (const name of names) {
    if (name === 'v3-xl2') continue; // below, as a known difference
    const dev = await open(name);
    try {
      const ours = await mapJson(dev);
      // qemu 7.2 resolves data_file names against its current directory: run it in the image's folder.
      const theirs = (await runOk('qemu-img', ['map', '--output=json', ...qemuOpenArgs(`${name}.qcow2`, name)], { cwd: dir })).stdout;
      assert.equal(ours, theirs, name);
    } finally {
      await dev.close();
    }
  }
  await t.test('extended L2 subclusters with a host cluster but no data map like qemu', async () => {
    const dev = await open('v3-xl2');
    try {
      assert.equal(await mapJson(dev), (await runOk('qemu-img', ['map', '--output=json', join(dir, 'v3-xl2.qcow2')])).stdout);
    } finally {
      await dev.close();
    }
  });
});

test('a qcow2-only chain mixing v2, v3, extended L2 and 512 B clusters reads as qemu reads it', ready, async () => {
  const dev = await open('qtop');
  try {
    const { stdout } = await runOk('sh', ['-c', `qemu-img convert -U -O raw qtop.qcow2 qtop.raw && sha256sum qtop.raw && rm qtop.raw`], { cwd: dir });
    assert.equal(await deviceSha256(dev), stdout.split(' ')[0]);
  } finally {
    await dev.close();
  }
});

test('info --output=json equals qemu-img info (all keys but actual-size) for every kind', ready, async () => {
  const sorted = (v: unknown): unknown =>
    Array.isArray(v)
      ? v.map(sorted)
      : v && typeof v === 'object'
        ? Object.fromEntries(
            Object.keys(v)
              .filter((k) => k !== 'actual-size' && k !== 'full-backing-filename')
              .sort()
              .map((k) => [k, sorted((v as Record<string, unknown>)[k])]),
          )
        : v;
  for (const name of [...Object.keys(EXPECTED), 'v3-corrupt', 'qxl2']) {
    const path = join(dir, `${name}.qcow2`);
    // info needs no password: it describes encrypted images from their headers.
    const dev = await openImage(path, { readOnly: true, inspectOnly: true, noBacking: true });
    try {
      const ours = JSON.parse(JSON.stringify(await imageInfo(dev)));
      const theirs = JSON.parse((await runOk('qemu-img', ['info', '-U', '--output=json', path])).stdout);
      assert.deepEqual(sorted(ours), sorted(theirs), name);
    } finally {
      await dev.close();
    }
  }
});

test('internal snapshots: opening snap1 / s1 reads the content at snapshot time, by name, id or snapshot.name=', ready, async () => {
  for (const [name, snap] of [
    ['v3-snap', 'snap1'],
    ['v3-snap', 'snapshot.name=snap1'],
    ['v3-snap', '1'],
    ['v3-snap', 'snapshot.id=1'],
    ['v2-snap', 's1'],
  ] as const) {
    const dev = await open(name, { snapshot: snap });
    try {
      assert.equal(dev.readOnly, true);
      assert.equal(await deviceSha256(dev), SRC, `${name} -l ${snap}`);
    } finally {
      await dev.close();
    }
  }
  const dev = await open('v3-snap', { snapshot: 'snapshot.name=snap2' });
  try {
    const { stdout } = await runOk('sh', ['-c', 'qemu-img convert -U -O raw -l snapshot.name=snap2 v3-snap.qcow2 s2.raw && sha256sum s2.raw && rm s2.raw'], { cwd: dir });
    assert.equal(await deviceSha256(dev), stdout.split(' ')[0]);
  } finally {
    await dev.close();
  }
  await assert.rejects(open('v3-snap', { snapshot: 'nosuch' }), (e) => isQcowError(e) && e.code === 'QCOW_NOT_FOUND');
});

test('dirty and corrupt bits: read-only opens read correctly; a corrupt image refuses read-write', ready, async () => {
  const dirty = await openImage(join(dir, 'v3-dirty.qcow2'), { readOnly: true });
  assert.equal(await deviceSha256(dirty), EXPECTED['v3-dirty']);
  assert.equal((await dirty.describe()).dirty, true);
  await dirty.close();
  const corrupt = await openImage(join(dir, 'v3-corrupt.qcow2'), { readOnly: true });
  const qemuSha = (await runOk('sh', ['-c', 'qemu-img convert -U -O raw v3-corrupt.qcow2 c.raw && sha256sum c.raw && rm c.raw'], { cwd: dir })).stdout.split(' ')[0];
  assert.equal(await deviceSha256(corrupt), qemuSha);
  await corrupt.close();
  await assert.rejects(openImage(join(dir, 'v3-corrupt.qcow2'), { readOnly: false }), (e) => isQcowError(e) && e.code === 'QCOW_CORRUPT' && /corrupt/.test(e.message));
  // The image is left as it was: qemu still sees the corrupt bit.
  const info = JSON.parse((await qemuImg(['info', '-U', '--output=json', join(dir, 'v3-corrupt.qcow2')])).stdout);
  assert.equal(info['format-specific'].data.corrupt, true);
});

test('encrypted images: no password is QCOW_NEED_PASSWORD, a wrong LUKS password QCOW_BAD_PASSWORD', ready, async () => {
  for (const name of ENCRYPTED) {
    await assert.rejects(openImage(join(dir, `${name}.qcow2`), { readOnly: true }), (e) => isQcowError(e) && e.code === 'QCOW_NEED_PASSWORD', name);
  }
  await assert.rejects(openImage(join(dir, 'v3-luks.qcow2'), { readOnly: true, password: 'wrong' }), (e) => isQcowError(e) && e.code === 'QCOW_BAD_PASSWORD');
  // Inspection without a password works, but reading does not.
  const dev = await openImage(join(dir, 'v3-luks.qcow2'), { readOnly: true, inspectOnly: true });
  await assert.rejects(dev.read(3 << 20, new Uint8Array(512)), (e) => isQcowError(e) && e.code === 'QCOW_NEED_PASSWORD');
  await dev.close();
});

test('an external data file is found next to the image, whatever the current directory', ready, async () => {
  assert.notEqual(process.cwd(), dir);
  const dev = await open('v3-ext');
  const ext = await dev.blockStatus(0, 65536);
  assert.equal(ext[0]!.hostFile, join(dir, 'v3-ext.data'));
  await dev.close();
});

test('CLI: snapshot -l prints qemu-img snapshot -l; convert -l snapshot.name= extracts a snapshot', ready, async () => {
  const cli = (args: string[]) => run(process.execPath, [join(import.meta.dirname, '../../../bin/qcow.cjs'), ...args], { cwd: dir });
  for (const name of ['v3-snap', 'v2-snap', 'v3']) {
    const ours = await cli(['snapshot', '-l', `${name}.qcow2`]);
    const theirs = await runOk('qemu-img', ['snapshot', '-U', '-l', `${name}.qcow2`], { cwd: dir });
    assert.equal(ours.code, 0, ours.stderr);
    assert.equal(ours.stdout, theirs.stdout, name);
  }
  const r = await cli(['convert', '-O', 'raw', '-l', 'snapshot.name=snap1', 'v3-snap.qcow2', 'snap1.raw']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal((await run('cmp', ['snap1.raw', 'src.raw'], { cwd: dir })).code, 0);
});
