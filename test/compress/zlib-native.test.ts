/**
 * zlib clusters through the host addon's calls into node:zlib's own zlib against node:zlib's
 * streams they replace: the same deflated bytes (`convert -c` output must not depend on whether
 * the addon is built), the same inflated clusters and refusals, and the fallback when the addon,
 * its zlib functions or the right zlib are not there.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { deflateRawSync } from 'node:zlib';
import { hostAddon, type HostAddon } from '#src/host/native.node.js';
import { deflateRawNode, deflateRawWith, inflateRawNode, inflateRawWith, nativeZlibOf } from '#src/compress/kernels.node.js';
import { QcowError } from '#src/core/errors.js';
import { CLI, needs, qemuImg, randomBytes, run, scratch, sha256 } from '../support/qemu.js';
import { clusterKinds, mixedSource } from '../support/mixed-source.js';

const native = nativeZlibOf(hostAddon());
const noNative = native ? {} : { skip: 'no host addon with node:zlib\'s zlib here' };

const isCorrupt = (e: unknown) => e instanceof QcowError && e.code === 'QCOW_CORRUPT';
const pack = (b: Uint8Array) => new Uint8Array(deflateRawSync(b, { level: 6, windowBits: 12, memLevel: 9 }));

/** The cluster kinds of the codec tests, and an empty one (deflate of nothing). */
const clusters = (): Uint8Array[] => [...clusterKinds('zlib cluster through the addon or node:zlib; ', 51), new Uint8Array(0)];

test('an addon without zlib (built before version 6), with another zlib than node:zlib\'s, or none at all: no native zlib', () => {
  assert.equal(nativeZlibOf(undefined), null);
  const base = { version: 5 } as unknown as HostAddon;
  assert.equal(nativeZlibOf(base), null, 'a stale build/ is a fallback, not a crash');
  const v6 = { ...base, version: 6, inflateRaw: () => 0, deflateRaw: () => 0 };
  assert.equal(nativeZlibOf({ ...v6, zlibVersion: () => undefined } as HostAddon, '1.3.1'), null, 'no zlib found in the process');
  assert.equal(nativeZlibOf({ ...v6, zlibVersion: () => '1.2.13' } as HostAddon, '1.3.1-e00f703'), null, 'a zlib other than node:zlib\'s (V8\'s Cr_z_ copy)');
  assert.equal(nativeZlibOf({ ...v6, zlibVersion: () => '1.3' } as HostAddon, '1.3.1'), null, 'a version prefix is not the version');
  assert.notEqual(nativeZlibOf({ ...v6, zlibVersion: () => '1.3.1' } as HostAddon, '1.3.1-e00f703'), null, 'a build suffix on node:zlib\'s version');
  assert.notEqual(nativeZlibOf({ ...v6, zlibVersion: () => '1.3.1' } as HostAddon, '1.3.1'), null);
});

test('the addon deflates every cluster to node:zlib\'s bytes, one after the other on its kept stream', noNative, () => {
  const z = native!;
  // Twice round, larger inputs between smaller ones: the kept stream and output buffer carry nothing over.
  for (const c of [...clusters(), ...clusters().reverse()]) {
    const want = pack(c);
    assert.deepEqual(deflateRawWith(z, c), want);
    assert.deepEqual(deflateRawNode(c), want);
  }
});

test('a cluster that shrinks is deflated into a buffer of its own; one that does not, into the kept buffer', noNative, () => {
  const z = native!;
  const text = new Uint8Array(65536).fill(0x61);
  const random = randomBytes(65536, 57);
  const small = deflateRawWith(z, text)!;
  const big = deflateRawWith(z, random)!;
  // Every writer stores a cluster that did not shrink as it is and looks only at the length: no
  // fresh buffer for it. Its bytes are still the stream's until the next call.
  assert.ok(big.length >= random.length);
  assert.deepEqual(big, pack(random));
  assert.notEqual(big.byteLength, big.buffer.byteLength, 'a view of the kept buffer');
  assert.equal(small.byteLength, small.buffer.byteLength, 'a buffer of its own');
  deflateRawWith(z, randomBytes(65536, 58));
  assert.deepEqual(small, pack(text), 'not overwritten by the next call');
});

test('the addon refuses to deflate into too small a buffer (node:zlib then does it)', noNative, () => {
  const c = randomBytes(65536, 54);
  assert.equal(native!.deflate(c, new Uint8Array(100)), -1);
  assert.deepEqual(deflateRawWith(native!, c), pack(c), 'and the next call is whole');
});

test('the addon and node:zlib inflate the same clusters to the same bytes, into a buffer or not, what follows ignored', noNative, () => {
  const z = native!;
  // No empty cluster: there is none in an image, and node:zlib fails one (no room to inflate into).
  for (const c of clusters().filter((c) => c.length > 0)) {
    const packed = pack(c);
    for (const tail of [new Uint8Array(0), new Uint8Array(511), pack(randomBytes(4096, 55)), randomBytes(300, 56)]) {
      const data = new Uint8Array(packed.length + tail.length);
      data.set(packed);
      data.set(tail, packed.length);
      assert.deepEqual(inflateRawNode(data, c.length), c);
      assert.deepEqual(inflateRawWith(z, data, c.length), c);
      const big = new Uint8Array(c.length + 200).fill(0xee);
      const into = big.subarray(100, 100 + c.length);
      assert.equal(inflateRawWith(z, data, c.length, into), into, 'the result is the given buffer');
      assert.deepEqual(into, c);
      assert.ok(big.subarray(0, 100).every((b) => b === 0xee) && big.subarray(100 + c.length).every((b) => b === 0xee), 'nothing written outside it');
    }
  }
});

test('the addon and node:zlib refuse the same bad clusters with QCOW_CORRUPT, and go on after each', noNative, () => {
  const z = native!;
  const text = new TextEncoder().encode('qcow2 cluster '.repeat(20_000));
  const a = text.subarray(0, 65536);
  const za = pack(a);
  const garbage = za.slice();
  garbage[0]! ^= 0xff;
  garbage[5]! ^= 0x55;
  const cases: [string, Uint8Array, number, RegExp][] = [
    ['garbage', garbage, 65536, /bad deflate data in compressed cluster: /],
    ['random bytes', randomBytes(300, 57), 4096, /compressed cluster/],
    ['cut short', za.subarray(0, 100), 65536, /inflated to \d+ bytes, expected 65536/],
    ['fewer bytes than a cluster', za, 2 * 65536, /inflated to 65536 bytes, expected 131072/],
    ['more bytes than a cluster', za, 4096, /inflates to more than 4096 bytes/],
    ['empty', new Uint8Array(0), 4096, /inflated to 0 bytes/],
  ];
  for (const [what, data, size, want] of cases) {
    const check = (e: unknown) => isCorrupt(e) && want.test((e as Error).message);
    assert.throws(() => inflateRawNode(data, size), check, `node:zlib: ${what}`);
    assert.throws(() => inflateRawWith(z, data, size), check, `addon: ${what}`);
    assert.throws(() => inflateRawWith(z, data, size, new Uint8Array(size)), check, `addon into a buffer: ${what}`);
    assert.deepEqual(inflateRawWith(z, za, 65536), a, `addon after ${what}`);
  }
});

test('zlib images convert to the same bytes with the addon and with QCOW_NO_NATIVE=1, and convert -c writes the same file with both', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const src = mixedSource('a qcow2 image with zlib clusters; ', 58);
  await writeFile(join(dir, 'src.raw'), src);
  await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'z.qcow2'], dir);
  const envs: [string, NodeJS.ProcessEnv][] = [
    ['addon', { ...process.env, QCOW_NO_NATIVE: '' }],
    ['QCOW_NO_NATIVE=1', { ...process.env, QCOW_NO_NATIVE: '1' }],
  ];
  const written: string[] = [];
  for (const [name, env] of envs) {
    const out = join(dir, `${name === 'addon' ? 'n' : 'w'}.raw`);
    const r = await run(process.execPath, [CLI, 'convert', '-f', 'qcow2', '-O', 'raw', 'z.qcow2', out], { cwd: dir, env });
    assert.equal(r.code, 0, `${name}: ${r.stderr}`);
    assert.equal(sha256(await readFile(out)), sha256(src), name);
    const c = join(dir, `${name === 'addon' ? 'n' : 'w'}.qcow2`);
    const rc = await run(process.execPath, [CLI, 'convert', '-c', '-f', 'raw', '-O', 'qcow2', 'src.raw', c], { cwd: dir, env });
    assert.equal(rc.code, 0, `${name}: ${rc.stderr}`);
    written.push(sha256(await readFile(c)));
  }
  assert.equal(written[0], written[1], 'convert -c: the same file with and without the addon');
  await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', 'src.raw', 'n.qcow2'], dir);
});
