/**
 * compat/qemu-img takes QEMU's `json:{...}` image names: a null-co source converts to a target
 * that maps as qemu-img's does, sparse by default and fully allocated with -S 0.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';
import { jsonFilenameOptions } from '#src/compat/json-filename.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('json: names flatten to dotted options, single quotes and nesting included', () => {
  assert.deepEqual(jsonFilenameOptions(`json:{ 'driver': 'qcow2', 'file': {"driver": 'file', 'filename': 'a\\'b'}, 'size': 1048576, 'read-zeroes': true }`), {
    driver: 'qcow2',
    'file.driver': 'file',
    'file.filename': "a'b",
    size: '1048576',
    'read-zeroes': 'on',
  });
  assert.throws(() => jsonFilenameOptions("json:{'driver': }"), { code: 'QCOW_INVALID_ARGUMENT' });
});

test('compat/qemu-img convert from null-co maps as qemu-img', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const dst = join(dir, 't.qcow2');
  const src = "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }";
  for (const sparse of ['512', '0']) {
    const maps = [];
    for (const prog of [COMPAT_QEMU_IMG, 'qemu-img']) {
      const r = await run(prog, ['convert', '-O', 'qcow2', '-S', sparse, src, dst]);
      assert.equal(r.code, 0, r.stderr);
      maps.push((await qemuImg(['map', dst])).stdout.replace(/0x[0-9a-f]+(\s+\S+)$/gm, 'OFFSET$1'));
    }
    assert.equal(maps[0], maps[1], `-S ${sparse}`);
  }
});
