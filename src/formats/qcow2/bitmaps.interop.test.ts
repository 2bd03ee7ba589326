/**
 * Persistent dirty bitmaps that qcow cannot yet keep up to date: qcow must never leave an enabled
 * bitmap calling clusters it wrote clean. It marks enabled bitmaps in use before writing, which
 * QEMU treats as it treats a bitmap left by a crash: listed as in-use, refused for export, and
 * removable. Disabled bitmaps record no writes and stay usable.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { needs, qcowOk, qemuImg, run, scratch } from '../../test-support/qemu.js';

interface InfoBitmap {
  name: string;
  flags: string[];
}

async function bitmaps(file: string): Promise<InfoBitmap[]> {
  const info = JSON.parse((await qemuImg(['info', '--output=json', '-f', 'qcow2', file])).stdout);
  return info['format-specific'].data.bitmaps as InfoBitmap[];
}

test('a qcow write marks enabled bitmaps in use (QEMU then refuses them), keeps disabled ones, and the image checks clean', needs('qemu-img', 'qemu-io', 'qemu-nbd'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'bm.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '64M']);
  await qemuImg(['bitmap', '--add', file, 'enabled']);
  await qemuImg(['bitmap', '--add', '--disable', file, 'disabled']);

  // Reading leaves every bitmap as it was.
  await qcowOk(['io', '-r', '-c', 'read 0 64k', file]);
  assert.deepEqual((await bitmaps(file)).map((b) => [b.name, b.flags]), [
    ['enabled', ['auto']],
    ['disabled', []],
  ]);

  await qcowOk(['io', '-c', 'write -P 0x5a 2M 64k', file]);
  const after = await bitmaps(file);
  assert.deepEqual(after.map((b) => [b.name, b.flags]), [
    ['enabled', ['in-use', 'auto']],
    ['disabled', []],
  ]);

  const check = await run('qemu-img', ['check', '-f', 'qcow2', file]);
  assert.equal(check.code, 0, check.stdout + check.stderr);

  // The stale bitmap cannot be exported as if it were right; the disabled one can.
  const refused = await run('qemu-nbd', ['-r', '-B', 'enabled', '-f', 'qcow2', '-k', join(dir, 'nbd.sock'), file], { timeoutMs: 30_000 });
  assert.notEqual(refused.code, 0);
  assert.match(refused.stderr, /inconsistent/);

  // And QEMU can still remove it, leaving a clean image.
  await qemuImg(['bitmap', '--remove', file, 'enabled']);
  assert.deepEqual((await bitmaps(file)).map((b) => b.name), ['disabled']);
  const check2 = await run('qemu-img', ['check', '-f', 'qcow2', file]);
  assert.equal(check2.code, 0, check2.stdout + check2.stderr);
});
