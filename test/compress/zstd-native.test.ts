/**
 * zstd clusters through the system's libzstd (the host addon) against the WebAssembly decoder
 * they replace: the same bytes, the same refusals, and the fallback when the addon, its zstd
 * functions or libzstd.so.1 are not there.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { hostAddon, type HostAddon } from '#src/host/native.node.js';
import { nativeZstdOf, zstdDecompressWith } from '#src/compress/kernels.node.js';
import { frameOnly, zstdCompressLoaded, zstdDecompressLoaded, zstdReady } from '#src/compress/zstd.js';
import { QcowError } from '#src/core/errors.js';
import { CLI, needs, qemuImg, randomBytes, run, scratch, sha256 } from '../support/qemu.js';
import { clusterKinds, mixedSource } from '../support/mixed-source.js';

const native = nativeZstdOf(hostAddon());
const noNative = native ? {} : { skip: 'no host addon with libzstd here' };

const isCorrupt = (e: unknown) => e instanceof QcowError && e.code === 'QCOW_CORRUPT';

const clusters = (): Uint8Array[] => clusterKinds('zstd cluster through libzstd or WebAssembly; ', 41);

test('an addon without zstd (built before version 5), without libzstd, or none at all: no native decoder', () => {
  assert.equal(nativeZstdOf(undefined), null);
  const base = { version: 4 } as unknown as HostAddon;
  assert.equal(nativeZstdOf(base), null, 'a stale build/ is a fallback, not a crash');
  assert.equal(nativeZstdOf({ ...base, version: 5, zstdVersion: () => 0, zstdDecompress: () => 0 } as HostAddon), null, 'libzstd.so.1 not loadable');
  assert.equal(nativeZstdOf({ ...base, version: 5, zstdVersion: () => 10504 } as HostAddon), null, 'a decoder is needed too');
});

test('libzstd and WebAssembly decode the same clusters to the same bytes, into a buffer or not, padding ignored', noNative, async () => {
  await zstdReady();
  const decode = native!;
  for (const c of clusters()) {
    const frame = zstdCompressLoaded(c);
    // What follows a cluster's frame in the file: QEMU's padding, or the next cluster's frame.
    for (const tail of [new Uint8Array(0), new Uint8Array(511).fill(0), zstdCompressLoaded(randomBytes(4096, 44))]) {
      const data = new Uint8Array(frame.length + tail.length);
      data.set(frame);
      data.set(tail, frame.length);
      const viaWasm = zstdDecompressLoaded(data, c.length);
      assert.deepEqual(viaWasm, c);
      assert.deepEqual(zstdDecompressWith(decode, data, c.length), c);
      const big = new Uint8Array(c.length + 200).fill(0xee);
      const into = big.subarray(100, 100 + c.length);
      assert.equal(zstdDecompressWith(decode, data, c.length, into), into, 'the result is the given buffer');
      assert.deepEqual(into, c);
      assert.ok(big.subarray(0, 100).every((b) => b === 0xee) && big.subarray(100 + c.length).every((b) => b === 0xee), 'nothing written outside it');
    }
  }
});

test('libzstd and WebAssembly refuse the same bad clusters with QCOW_CORRUPT', noNative, async () => {
  await zstdReady();
  const decode = native!;
  const c = clusters()[3]!;
  const frame = zstdCompressLoaded(c);
  const damaged = frame.slice();
  // The first block's content (after the 4-byte magic, a header of a few bytes and the 3-byte
  // block header): literals and sequences that no longer make sense.
  damaged.fill(0xff, 12, 40);
  const cases: [string, Uint8Array, number][] = [
    ['not a zstd frame', randomBytes(300, 45), 65536],
    ['a cut-off frame', frame.subarray(0, frame.length >> 1), c.length],
    ['damaged blocks', damaged, c.length],
    ['fewer bytes than a cluster', frame, c.length * 2],
    ['more bytes than a cluster', frame, c.length / 2],
  ];
  for (const [what, data, outSize] of cases) {
    assert.throws(() => zstdDecompressLoaded(data, outSize), isCorrupt, `WebAssembly: ${what}`);
    assert.throws(() => zstdDecompressWith(decode, data, outSize), isCorrupt, `libzstd: ${what}`);
    assert.throws(() => zstdDecompressWith(decode, data, outSize, new Uint8Array(outSize)), isCorrupt, `libzstd into a buffer: ${what}`);
  }
});

/**
 * Offset of the first zstd frame of at least `min` bytes in `file` after `from` (past the header's
 * cluster): a compressed cluster whose blocks can be damaged without touching what follows it.
 */
function frameAt(file: Uint8Array, from: number, min: number): number {
  for (let i = from; i + 4 <= file.length; i++) {
    if (file[i] === 0x28 && file[i + 1] === 0xb5 && file[i + 2] === 0x2f && file[i + 3] === 0xfd && frameOnly(file.subarray(i)).length >= min) return i;
  }
  throw new Error(`no zstd frame of ${min} bytes in the image`);
}

test('qemu-img zstd images convert to the same bytes with the addon and with QCOW_NO_NATIVE=1; a damaged cluster is one error line in both', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  // Mixed clusters: text (small frames, decoded inline), half-random (large frames, the pool's
  // path), random (stored as plain clusters by qemu-img), and zeros between them.
  const src = mixedSource('a qcow2 image with zstd clusters; ', 46);
  await writeFile(join(dir, 'src.raw'), src);
  await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', 'src.raw', 'z.qcow2'], dir);
  await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=4k', 'src.raw', 'z4k.qcow2'], dir);
  const envs: [string, NodeJS.ProcessEnv][] = [
    ['addon', { ...process.env, QCOW_NO_NATIVE: '' }],
    ['QCOW_NO_NATIVE=1', { ...process.env, QCOW_NO_NATIVE: '1' }],
  ];
  for (const img of ['z.qcow2', 'z4k.qcow2']) {
    for (const [name, env] of envs) {
      const out = join(dir, `${img}.${name === 'addon' ? 'n' : 'w'}.raw`);
      const r = await run(process.execPath, [CLI, 'convert', '-f', 'qcow2', '-O', 'raw', img, out], { cwd: dir, env });
      assert.equal(r.code, 0, `${img} with ${name}: ${r.stderr}`);
      assert.equal(sha256(await readFile(out)), sha256(src), `${img} with ${name}`);
    }
  }

  const image = new Uint8Array(await readFile(join(dir, 'z.qcow2')));
  const at = frameAt(image, 65536, 200);
  image.fill(0xff, at + 12, at + 40);
  await writeFile(join(dir, 'bad.qcow2'), image);
  const errors: string[] = [];
  for (const [name, env] of envs) {
    const r = await run(process.execPath, [CLI, 'convert', '-f', 'qcow2', '-O', 'raw', 'bad.qcow2', 'bad.raw'], { cwd: dir, env });
    assert.notEqual(r.code, 0, `${name}: a damaged cluster fails the convert`);
    const lines = r.stderr.trim().split('\n');
    assert.equal(lines.length, 1, `${name}: one line: ${r.stderr}`);
    assert.match(lines[0]!, new RegExp(`compressed cluster at host offset 0x${at.toString(16)} \\(zstd\\)`), name);
    errors.push(lines[0]!);
  }
  t.diagnostic(`addon: ${errors[0]}`);
  t.diagnostic(`QCOW_NO_NATIVE=1: ${errors[1]}`);
});
