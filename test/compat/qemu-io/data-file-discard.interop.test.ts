/**
 * Discards and unmapping zero writes on a qcow2 image with an external data file, as QEMU passes
 * them on: the clusters are unmapped (a zero entry without a host cluster) and the data file's
 * range is discarded when pass-discard-request is on; a raw data file's unmapping zero write
 * always leaves zeros there. Same map, same data file bytes and the same blocks in use as qemu-io.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, runOk, scratch } from '../../support/qemu.js';
import { needsHoles } from '../../support/addon.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

async function after(dir: string, prog: string, raw: string, pass: string) {
  const img = join(dir, 'd.qcow2');
  const data = join(dir, 'd.data');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${data},data_file_raw=${raw}`, img, '4M']);
  await qemuIo(['-c', 'write -q -P 1 0 4M', img]);
  await runOk(prog, ['-c', 'discard -q 0 1M', '-c', 'write -q -z -u 1M 1M', '-c', 'write -q -z 2M 512k', '--image-opts', `driver=qcow2,file.filename=${img},pass-discard-request=${pass}`]);
  return { map: (await qemuImg(['map', '--output=json', img])).stdout, bytes: await readFile(data), blocks: (await stat(data)).blocks };
}

test('discards reach the external data file as in qemu-io (raw or not, pass-discard-request on or off)', { ...needs('qemu-img', 'qemu-io'), ...needsHoles() }, async (t) => {
  const dir = await scratch(t);
  for (const raw of ['off', 'on']) {
    for (const pass of ['on', 'off']) {
      const ours = await after(dir, COMPAT_QEMU_IO, raw, pass);
      const theirs = await after(dir, 'qemu-io', raw, pass);
      const what = `data_file_raw=${raw}, pass-discard-request=${pass}`;
      assert.equal(ours.map, theirs.map, what);
      assert.ok(ours.bytes.equals(theirs.bytes), `${what}: the data files differ`);
      assert.equal(ours.blocks, theirs.blocks, `${what}: blocks in use`);
    }
  }
});
