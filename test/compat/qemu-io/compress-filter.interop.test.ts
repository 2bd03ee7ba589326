/**
 * compat/qemu-io's `compress` filter driver (--image-opts or a json: name): every write becomes
 * compressed whole clusters, a partial cluster widened with what the image holds, as qemu-io
 * does. The two programs' images then read the same and count the same compressed clusters.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

test('compat/qemu-io compress filter writes compressed clusters as qemu-io', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const imgs = [join(dir, 'ours.qcow2'), join(dir, 'theirs.qcow2')];
  const counts = [];
  for (const [i, prog] of [COMPAT_QEMU_IO, 'qemu-io'].entries()) {
    const img = imgs[i]!;
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', img, '2M']);
    const a = await run(prog, ['-c', 'write -P 0xbb 0 229376', '--image-opts', `driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename=${img}`]);
    assert.equal(a.code, 0, a.stderr);
    const json = `json:{'driver': 'compress', 'file': {'driver': 'qcow2', 'file': {'driver': 'file', 'filename': '${img}'}}}`;
    const b = await run(prog, ['-c', 'write -P 0xcc 278528 229376', json]);
    assert.equal(b.code, 0, b.stderr);
    const check = JSON.parse((await qemuImg(['check', '--output=json', img])).stdout) as { 'compressed-clusters'?: number };
    counts.push(check['compressed-clusters']);
  }
  assert.deepEqual(counts, [8, 8]);
  assert.equal((await run('qemu-img', ['compare', ...imgs])).code, 0);
});
