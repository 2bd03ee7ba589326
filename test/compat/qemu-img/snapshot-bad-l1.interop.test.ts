/**
 * `snapshot -d` of a snapshot whose L1 table qemu refuses (offset not cluster aligned, table too
 * large): qemu-img validates the table before it removes the entry, so the snapshot stays listed
 * and the image is left as it was (iotest 080); the drop-in qemu-img must do the same.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('snapshot -d of a snapshot whose L1 table qemu refuses leaves it, as qemu-img does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  // [what, offset in the snapshot entry, width, value]
  const cases: Array<[string, number, 4 | 8, bigint]> = [
    ['L1 offset not cluster aligned', 0, 8, 0x400200n],
    ['L1 table too large', 8, 4, 0x10000000n],
  ];
  for (const [what, pos, width, value] of cases) {
    const base = join(dir, 'base.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
    await qemuIo(['-f', 'qcow2', '-c', 'write 0 512', 'base.qcow2'], dir);
    await qemuImg(['snapshot', '-c', 'test', 'base.qcow2'], dir);
    const fh = await open(base, 'r+');
    const h = new Uint8Array(72);
    await fh.read(h, 0, 72, 0);
    const b = new Uint8Array(width);
    if (width === 8) new DataView(b.buffer).setBigUint64(0, value);
    else new DataView(b.buffer).setUint32(0, Number(value));
    await fh.write(b, 0, width, Number(new DataView(h.buffer).getBigUint64(64)) + pos);
    await fh.close();
    const got: unknown[] = [];
    const bytes: Buffer[] = [];
    for (const tool of ['qemu-img', COMPAT]) {
      await copyFile(base, join(dir, 'a.qcow2'));
      const r = await run(tool, ['snapshot', '-d', 'test', 'a.qcow2'], { cwd: dir });
      const list = await run('qemu-img', ['snapshot', '-l', 'a.qcow2'], { cwd: dir });
      got.push({ code: r.code, stdout: r.stdout, stderr: r.stderr.replaceAll(tool, 'qemu-img'), listed: list.stdout.includes(' test ') });
      bytes.push(await readFile(join(dir, 'a.qcow2')));
    }
    assert.deepEqual(got[1], got[0], what);
    assert.ok(bytes[0]!.equals(bytes[1]!), `${what}: the images are the same byte for byte`);
  }
});
