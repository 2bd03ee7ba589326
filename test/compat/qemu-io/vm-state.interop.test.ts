/**
 * The VM state area of a qcow2 image (`read -b`, `write -b`): what the drop-in qemu-io writes
 * there, qemu-io reads back (and the other way round), far past the disk too (the L1 table grows
 * to reach it); internal snapshots keep it (qemu-img snapshot -c/-a); qemu-img check finds the
 * image clean. A format without one (raw) refuses as qemu-io does.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));
const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

/** qemu-io's output with the timing lines dropped. */
async function io(tool: string, dir: string, file: string, fmt: string, ...cmds: string[]): Promise<string> {
  const r = await run(tool, ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), file], { cwd: dir });
  return `${r.code} ${r.stdout.replace(/^\d.*ops;.*\n/gm, '')}${r.stderr}`;
}

test('VM state written by either qemu-io reads back through the other', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const cluster of ['512', '4096', '65536']) {
    for (const [writer, reader] of [
      [COMPAT_IO, 'qemu-io'],
      ['qemu-io', COMPAT_IO],
    ] as const) {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, 'a.qcow2', '6M'], dir);
      // Near the disk, past one L2 table's reach, and a terabyte out (more than the largest L1
      // table of 512-byte clusters reaches: both refuse that).
      const far = String(2 ** 40);
      const places = cluster === '512' ? ['0', '3M'] : ['0', '3M', far];
      for (const at of places) {
        assert.match(await io(writer, dir, 'a.qcow2', 'qcow2', `write -b -P 0x11 ${at} 4k`), /^0 wrote 4096\/4096/, `${cluster} ${at}`);
      }
      if (cluster === '512') assert.equal(await io(writer, dir, 'a.qcow2', 'qcow2', `write -b 0 ${far} 4k`), await io(reader, dir, 'a.qcow2', 'qcow2', `write -b 0 ${far} 4k`));
      for (const at of places) {
        assert.match(await io(reader, dir, 'a.qcow2', 'qcow2', `read -b -P 0x11 ${at} 4k`, `read -P 0 ${at === '0' ? '0' : '1M'} 4k`), /^0 read 4096\/4096[^]*read 4096\/4096/, `${cluster} ${at}`);
        assert.doesNotMatch(await io(reader, dir, 'a.qcow2', 'qcow2', `read -b -P 0x11 ${at} 4k`), /verification failed/);
      }
      // Never written: zeros.
      assert.doesNotMatch(await io(reader, dir, 'a.qcow2', 'qcow2', 'read -b -P 0 1M 4k'), /verification failed/);
      const check = await run('qemu-img', ['check', 'a.qcow2'], { cwd: dir });
      assert.match(check.stdout, /^No errors were found on the image.\n/, check.stderr);
    }
  }
});

test('an internal snapshot keeps the VM state, as qemu-img snapshot does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const img of ['qemu-img', COMPAT_IMG]) {
    await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '64M'], dir);
    await io(COMPAT_IO, dir, 'a.qcow2', 'qcow2', 'write -b -P 0x22 1T 4k');
    assert.equal((await run(img, ['snapshot', '-c', 'foo', 'a.qcow2'], { cwd: dir })).code, 0);
    await io(COMPAT_IO, dir, 'a.qcow2', 'qcow2', 'write -b -P 0x33 1T 4k', 'write -b -P 0x44 0 4k');
    assert.equal((await run(img, ['snapshot', '-a', 'foo', 'a.qcow2'], { cwd: dir })).code, 0);
    for (const tool of ['qemu-io', COMPAT_IO]) {
      const out = await io(tool, dir, 'a.qcow2', 'qcow2', 'read -b -P 0x22 1T 4k', 'read -b -P 0 0 4k');
      assert.doesNotMatch(out, /verification failed/, `${img} ${tool}`);
    }
    const check = await run('qemu-img', ['check', 'a.qcow2'], { cwd: dir });
    assert.match(check.stdout, /^No errors were found on the image.\n/, `${img}: ${check.stdout}${check.stderr}`);
  }
});

test('a raw image has no VM state: qemu-io refuses as qemu-io does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'raw', 'a.raw', '1M'], dir);
  for (const cmd of ['write -b 0 512', 'read -b 0 512']) {
    assert.equal(await io(COMPAT_IO, dir, 'a.raw', 'raw', cmd), await io('qemu-io', dir, 'a.raw', 'raw', cmd), cmd);
  }
});
