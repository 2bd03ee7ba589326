/** The CLI on raw images, checked against qemu-img where it has the same command. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { hostAddon } from '#src/host/native.node.js';
import { needs, qcow, qcowOk, qemuGuestSha256, qemuImg, qemuIo, randomBytes, scratch, sha256 } from '../support/qemu.js';

test('create, io write/read with patterns, info and map on a raw image', async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'a.raw');
  await qcowOk(['create', '-q', '-f', 'raw', img, '1M']);
  assert.equal((await stat(img)).size, 1024 * 1024);
  await qcowOk(['io', '-f', 'raw', '-c', 'write -P 0xab 1000 3000', '-c', 'write -z 2000 10', img]);
  const r = await qcowOk(['io', '-f', 'raw', '-c', 'read -P 0xab 1000 1000', '-c', 'read -P 0 2000 10', '-c', 'read -P 0xab 2010 1990', img]);
  assert.match(r.stdout, /read 1000\/1000 bytes at offset 1000/);
  const bad = await qcow(['io', '-f', 'raw', '-c', 'read -P 0xab 0 1001', img]);
  assert.equal(bad.code, 1);
  assert.match(bad.stdout, /Pattern verification failed at offset 0/);
  const info = JSON.parse((await qcowOk(['info', '--output=json', img])).stdout);
  assert.equal(info.format, 'raw');
  assert.equal(info['virtual-size'], 1048576);
  const map = JSON.parse((await qcowOk(['map', '--output=json', '-f', 'raw', img])).stdout);
  // With the host addon the file's holes show as zeros, as qemu-img maps them (the write made
  // the first 4 KiB block data); without it every byte counts as data.
  const written = { start: 0, length: 4096, depth: 0, present: true, zero: false, data: true, offset: 0 };
  const hole = { start: 4096, length: 1048576 - 4096, depth: 0, present: true, zero: true, data: false, offset: 4096 };
  assert.deepEqual(map, hostAddon() ? [written, hole] : [{ ...written, length: 1048576 }]);
});

test('raw to raw convert gives the same bytes, and qemu-img agrees', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const src = join(dir, 'src.raw');
  const data = new Uint8Array(3 * 1024 * 1024);
  data.set(randomBytes(100_000, 7), 12345);
  data.fill(0x5a, 2 * 1024 * 1024, 2 * 1024 * 1024 + 4096);
  await writeFile(src, data);
  const dst = join(dir, 'dst.raw');
  await qcowOk(['convert', '-f', 'raw', '-O', 'raw', src, dst]);
  assert.equal(sha256(await readFile(dst)), sha256(data));
  assert.equal(await qemuGuestSha256(['-f', 'raw', dst]), sha256(data));
  // Sparse: the all-zero tail was not written, yet the file has the full size.
  assert.equal((await stat(dst)).size, data.length);
  assert.ok((await stat(dst)).blocks * 512 < data.length);
  const same = await qcow(['compare', '-f', 'raw', '-F', 'raw', src, dst]);
  assert.equal(same.code, 0, same.stderr);
  assert.match(same.stdout, /Images are identical/);
});

test('compare reports the first differing sector and size mismatches as qemu-img does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const a = join(dir, 'a.raw');
  const b = join(dir, 'b.raw');
  await qemuImg(['create', '-q', '-f', 'raw', a, '2M']);
  await qemuImg(['create', '-q', '-f', 'raw', b, '3M']);
  await qemuIo(['-f', 'raw', '-c', 'write -P 1 1000 1', a]);
  for (const [args, code] of [
    [[a, b], 1],
    [[b, b], 0],
    [['-s', a, b], 1],
  ] as const) {
    const ours = await qcow(['compare', '-f', 'raw', '-F', 'raw', ...args]);
    const theirs = await qemuImg(['compare', '-f', 'raw', '-F', 'raw', ...args]).catch((e: Error) => ({ stdout: e.message }));
    assert.equal(ours.code, code);
    assert.equal(ours.stdout.trim().split('\n').pop(), theirs.stdout.trim().split('\n').pop());
  }
  await qemuIo(['-f', 'raw', '-c', 'write -P 1 2500000 1', b]);
  const tail = await qcow(['compare', '-f', 'raw', '-F', 'raw', a, b]);
  assert.equal(tail.code, 1);
  assert.match(tail.stdout, /Content mismatch at offset 512!/);
});

test('bad input gives one line on stderr and a non-zero exit, never a stack trace', async (t) => {
  const dir = await scratch(t);
  const cases: [string[], RegExp][] = [
    [['info', join(dir, 'missing.raw')], /^qcow: .*missing\.raw: No such file or directory$/],
    [['create', '-f', 'raw', join(dir, 'x.raw'), '12Q'], /^qcow: invalid size '12Q'/],
    [['create', '-f', 'nosuch', join(dir, 'x.raw'), '1M'], /^qcow: .*Unknown file format 'nosuch'/],
    [['convert', join(dir, 'only-one')], /^qcow: /],
    [['frobnicate'], /^qcow: unknown command 'frobnicate'/],
    [['info', '--output=xml', join(dir, 'missing.raw')], /^qcow: --output must be human or json/],
    [['compare', join(dir, 'n1'), join(dir, 'n2')], /^qcow: .*n1: No such file or directory$/],
  ];
  for (const [args, re] of cases) {
    const r = await qcow(args);
    assert.notEqual(r.code, 0, args.join(' '));
    const lines = r.stderr.trim().split('\n');
    assert.equal(lines.length, 1, `one line for ${args.join(' ')}: ${r.stderr}`);
    assert.match(lines[0]!, re);
    assert.doesNotMatch(r.stderr, /\n\s+at /);
  }
});

test('a create that fails leaves no file behind, and never removes one that existed', async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'bad.qcow2');
  const r = await qcow(['create', '-q', '-f', 'qcow2', '-o', 'bogus=1', img, '1M']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /bogus/);
  await assert.rejects(stat(img));
  const kept = join(dir, 'kept.raw');
  await writeFile(kept, 'x');
  assert.equal((await qcow(['create', '-q', '-f', 'qcow2', '-o', 'bogus=1', kept, '1M'])).code, 1);
  await stat(kept);
});

test('create -o help lists the options of the format', async () => {
  const r = await qcowOk(['create', '-f', 'qcow2', '-o', 'help', 'unused', '1M']);
  assert.match(r.stdout, /compat/);
  assert.match(r.stdout, /cluster_size/);
});

test('info shows where the backing file is without opening it, like qemu-img', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'raw', join(dir, 'base.raw'), '1M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(dir, 'top.qcow2')]);
  const ours = JSON.parse((await qcowOk(['info', '--output=json', join(dir, 'top.qcow2')])).stdout);
  const theirs = JSON.parse((await qemuImg(['info', '--output=json', join(dir, 'top.qcow2')])).stdout);
  for (const key of ['backing-filename', 'full-backing-filename', 'backing-filename-format', 'virtual-size', 'cluster-size', 'format-specific']) {
    assert.deepEqual(ours[key], theirs[key], key);
  }
});
