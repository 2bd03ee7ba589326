/**
 * raw's `offset` and `size` options (a raw view of part of a file), through --image-opts and
 * json: names, in compat/qemu-img and compat/qemu-io beside the real programs: the same output,
 * errors and exit codes; and through the library (OpenOptions.rawWindow).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';
import { openImage } from '#src/node.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));
const MiB = 1 << 20;

/** A 4 MiB raw file: 0x11 everywhere, 0x22 in its second MiB. */
async function fourMiB(dir: string): Promise<string> {
  const file = join(dir, 'r.img');
  await qemuImg(['create', '-q', '-f', 'raw', file, '4M']);
  await qemuIo(['-f', 'raw', '-c', 'write -q -P 0x11 0 4M', '-c', 'write -q -P 0x22 1M 1M', file]);
  return file;
}

/** Runs `args` through ours and QEMU's program on a fresh copy each; the outputs must agree. */
async function same(dir: string, prog: 'qemu-img' | 'qemu-io', args: string[]): Promise<void> {
  const results = [];
  for (const p of [prog === 'qemu-img' ? COMPAT_QEMU_IMG : COMPAT_QEMU_IO, prog]) {
    await fourMiB(dir);
    const r = await run(p, args, { cwd: dir });
    results.push({ code: r.code, stdout: r.stdout.replace(/\d+ ops;.*\n/g, ''), stderr: r.stderr, file: await readFile(join(dir, 'r.img')) });
  }
  const [ours, theirs] = results;
  assert.equal(ours!.stdout, theirs!.stdout, `${prog} ${args.join(' ')}`);
  assert.equal(ours!.stderr, theirs!.stderr, `${prog} ${args.join(' ')}`);
  assert.equal(ours!.code, theirs!.code, `${prog} ${args.join(' ')}`);
  assert.ok(ours!.file.equals(theirs!.file), `${prog} ${args.join(' ')}: the file differs`);
}

const opts = (o: string) => ['--image-opts', `driver=raw,${o},file.filename=r.img`];
const json = (o: string) => `json:{"driver": "raw", ${o}, "file": {"driver": "file", "filename": "r.img"}}`;

test('qemu-img info and map of a raw window: its size, its name, its place in the file', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const o of ['offset=1M,size=1M', 'offset=1M', 'size=2M', 'offset=512,size=1M', 'offset=4M']) {
    await same(dir, 'qemu-img', ['info', ...opts(o)]);
    await same(dir, 'qemu-img', ['map', '--output=json', ...opts(o)]);
    await same(dir, 'qemu-img', ['map', ...opts(o)]);
  }
  await same(dir, 'qemu-img', ['info', json('"offset": 1048576, "size": 1048576')]);
  await same(dir, 'qemu-img', ['map', '--output=json', json('"offset": 2097152')]);
});

test('qemu-img refuses windows the file cannot hold, and resizing a fixed-size one', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const o of ['offset=1M,size=5M', 'offset=5M', 'offset=1M,size=1000']) await same(dir, 'qemu-img', ['info', ...opts(o)]);
  await same(dir, 'qemu-img', ['info', json('"offset": 5242880')]);
  await same(dir, 'qemu-img', ['resize', ...opts('offset=1M,size=1M'), '2M']);
  // Without a size the window ends with the file, and resizing moves the file's end.
  await same(dir, 'qemu-img', ['resize', '-f', 'raw', json('"offset": 1048576'), '5M']);
});

test('qemu-img convert and compare read only the window', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await same(dir, 'qemu-img', ['convert', '-O', 'qcow2', ...opts('offset=1M,size=1M'), 'out.qcow2']);
  await same(dir, 'qemu-img', ['compare', '-f', 'qcow2', 'out.qcow2', json('"offset": 1048576, "size": 1048576')]);
});

test('qemu-io reads and writes inside the window and refuses past its end', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const cmds = ['-c', 'read -P 0x22 0 1M', '-c', 'write -P 0x33 512 512', '-c', 'write 1048576 512', '-c', 'read 1048064 1024', '-c', 'write -z 0 4096', '-c', 'discard 0 512'];
  await same(dir, 'qemu-io', [...cmds, ...opts('offset=1M,size=1M')]);
  await same(dir, 'qemu-io', [...cmds, json('"offset": 1048576, "size": 1048576')]);
  await same(dir, 'qemu-io', ['-c', 'read -P 0x11 0 2M', '-c', 'write -P 0x44 2M 4096', ...opts('offset=2M')]);
  await same(dir, 'qemu-io', ['-c', 'read 0 512', json('"offset": 5242880')]);
  // A qcow2 image inside the window, its file a raw child.
  await same(dir, 'qemu-io', ['-c', 'read -P 0x22 0 512', '--image-opts', 'driver=raw,file.driver=raw,file.offset=1M,file.size=1M,file.file.filename=r.img']);
});

test('the library opens a raw window: reads, writes, bounds and checks', async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'w.img');
  const base = await openImage(file, { format: 'raw', readOnly: false }).catch(() => undefined);
  await base?.close();
  const { writeFile } = await import('node:fs/promises');
  const bytes = new Uint8Array(4 * MiB).fill(0x11);
  bytes.fill(0x22, MiB, 2 * MiB);
  await writeFile(file, bytes);
  const dev = await openImage(file, { format: 'raw', rawWindow: { offset: MiB, size: MiB } });
  try {
    assert.equal(dev.size, MiB);
    const buf = new Uint8Array(MiB);
    await dev.read(0, buf);
    assert.ok(buf.every((b) => b === 0x22));
    await dev.write(0, new Uint8Array(512).fill(0x33));
    await assert.rejects(dev.write(MiB, new Uint8Array(512)));
    await assert.rejects(dev.resize!(2 * MiB), { code: 'QCOW_UNSUPPORTED' });
    const [extent] = await dev.blockStatus(0, MiB);
    assert.equal(extent!.hostOffset, MiB);
  } finally {
    await dev.close();
  }
  const after = await readFile(file);
  assert.equal(after[MiB], 0x33);
  assert.equal(after[MiB - 1], 0x11);
  assert.equal(after.length, 4 * MiB);
  await assert.rejects(openImage(file, { format: 'raw', rawWindow: { offset: 5 * MiB } }), { code: 'QCOW_INVALID_ARGUMENT' });
  await assert.rejects(openImage(file, { format: 'raw', rawWindow: { offset: MiB, size: 1000 } }), { code: 'QCOW_INVALID_ARGUMENT' });
});

test('a qcow2 image inside a raw window of a file: info, map and qemu-io as QEMU', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const inner = join(dir, 'in.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', inner, '1M']);
  await qemuIo(['-c', 'write -q -P 0x3c 0 64k', inner]);
  const { appendFile } = await import('node:fs/promises');
  const outer = join(dir, 'outer.raw');
  await qemuImg(['create', '-q', '-f', 'raw', outer, '1M']);
  await appendFile(outer, await readFile(inner));
  const opts = 'driver=qcow2,file.driver=raw,file.offset=1M,file.file.filename=outer.raw';
  const jsonName = 'json:{"driver":"qcow2","file":{"driver":"raw","offset":1048576,"file":{"driver":"file","filename":"outer.raw"}}}';
  for (const [prog, ours] of [['qemu-img', COMPAT_QEMU_IMG], ['qemu-io', COMPAT_QEMU_IO]] as const) {
    const cases = prog === 'qemu-img'
      ? [['info', '--image-opts', opts], ['map', '--output=json', '--image-opts', opts], ['info', jsonName], ['map', '--output=json', jsonName], ['info', '--image-opts', opts.replace('1M', '5M')]]
      : [['-c', 'read -P 0x3c 0 64k', '-c', 'write -P 0x4d 128k 64k', '--image-opts', opts]];
    for (const args of cases) {
      const results = [];
      for (const p of [ours, prog]) {
        const r = await run(p, args, { cwd: dir });
        results.push({ code: r.code, out: r.stdout.replace(/\d+ ops;.*\n/g, '').replace(/^disk size: .*\n/m, ''), err: r.stderr });
      }
      assert.deepEqual(results[0], results[1], `${prog} ${args.join(' ')}`);
    }
  }
  // What our qemu-io wrote inside is where QEMU reads it.
  assert.match((await qemuIo(['-c', 'read -P 0x4d 128k 64k', '--image-opts', opts], dir)).stdout, /read 65536\/65536/);
});
