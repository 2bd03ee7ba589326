/**
 * `backing.*` options in --image-opts and json: names (`backing.driver`, `backing.file.filename`,
 * a raw backing file's `backing.offset`): the backing file QEMU opens in place of the recorded one,
 * in compat/qemu-img and compat/qemu-io beside the real programs; info refuses them, as QEMU's does.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';
import { holesWork } from '../../support/addon.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

/** t.qcow2 over b1.qcow2 (0x55 in its first 64 KiB), and b2.raw (0x66 there) beside them. */
async function images(dir: string): Promise<void> {
  await qemuImg(['create', '-q', '-f', 'qcow2', 'b1.qcow2', '1M'], dir);
  await qemuIo(['-c', 'write -q -P 0x55 0 64k', 'b1.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'raw', 'b2.raw', '1M'], dir);
  await qemuIo(['-f', 'raw', '-c', 'write -q -P 0x66 0 64k', 'b2.raw'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'b1.qcow2', '-F', 'qcow2', 't.qcow2'], dir);
}

async function same(dir: string, prog: 'qemu-img' | 'qemu-io', args: string[]): Promise<void> {
  const ours = await run(prog === 'qemu-img' ? COMPAT_QEMU_IMG : COMPAT_QEMU_IO, args, { cwd: dir });
  const theirs = await run(prog, args, { cwd: dir });
  const strip = (s: string) => s.replace(/\d+ ops;.*\n/g, '');
  assert.deepEqual({ code: ours.code, stdout: strip(ours.stdout), stderr: ours.stderr }, { code: theirs.code, stdout: strip(theirs.stdout), stderr: theirs.stderr }, `${prog} ${args.join(' ')}`);
}

const TOP = 'driver=qcow2,file.filename=t.qcow2';
const JSON_RAW_BACKING = 'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "t.qcow2"}, "backing": {"driver": "raw", "file": {"driver": "file", "filename": "b2.raw"}}}';

test('map, compare and qemu-io follow backing.file.filename and backing.driver', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await images(dir);
  for (const o of [`${TOP},backing.driver=raw,backing.file.filename=b2.raw`, `${TOP},backing.driver=raw,backing.file.filename=b2.raw,backing.offset=4096`, `${TOP},backing.driver=qcow2,backing.file.filename=b1.qcow2`]) {
    // A raw backing file's holes show in map only where qcow sees them (the host addon).
    if (holesWork() || !o.includes('backing.driver=raw')) await same(dir, 'qemu-img', ['map', '--output=json', '--image-opts', o]);
    await same(dir, 'qemu-io', ['-c', 'read -P 0x66 0 64k', '-c', 'read -P 0x55 0 64k', '--image-opts', o]);
  }
  if (holesWork()) await same(dir, 'qemu-img', ['map', '--output=json', JSON_RAW_BACKING]);
  await same(dir, 'qemu-img', ['compare', '-f', 'raw', 'b2.raw', JSON_RAW_BACKING]);
  await same(dir, 'qemu-img', ['compare', '--image-opts', 'driver=raw,file.filename=b2.raw', `${TOP},backing.driver=raw,backing.file.filename=b2.raw`]);
  // The recorded format (qcow2) over a raw file: refused as QEMU refuses it.
  await same(dir, 'qemu-io', ['-c', 'read 0 512', '--image-opts', `${TOP},backing.file.filename=b2.raw`]);
});

test('qemu-img info refuses backing options, naming the first as QEMU orders them', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await images(dir);
  for (const o of [`${TOP},backing.file.filename=b2.raw`, `${TOP},backing.file.filename=b2.raw,backing.driver=raw,backing.offset=0`, `${TOP},backing=null`]) {
    await same(dir, 'qemu-img', ['info', '--image-opts', o]);
  }
  await same(dir, 'qemu-img', ['info', JSON_RAW_BACKING]);
});

test('a file in the wrong format is refused in QEMU\'s words', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await images(dir);
  for (const f of ['qcow2', 'qcow']) {
    await same(dir, 'qemu-img', ['info', '-f', f, 'b2.raw']);
    await same(dir, 'qemu-io', ['-f', f, '-c', 'read 0 512', 'b2.raw']);
  }
});
