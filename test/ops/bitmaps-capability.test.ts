/**
 * The operations over persistent dirty bitmaps reach them through the device's capability
 * (`persistentBitmaps`, `editBitmaps`): a qcow2 image in memory answers without qemu; raw and
 * qcow v1 have no bitmaps and each operation refuses in its own words.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore, backup, bitmapExtents, builtinFormats, changedExtents, type BlockDevice } from '#src/index.js';
import { checkBitmapCopy, copyBitmaps } from '#src/ops/copy-bitmaps.js';

const MiB = 1 << 20;

async function image(format: string, size = 4 * MiB): Promise<BlockDevice> {
  const fmt = builtinFormats().get(format);
  const store = new MemoryStore(undefined, { name: `x.${format}` });
  await fmt.create(store, { size });
  return fmt.open(store, {});
}

test('a qcow2 device records writes in a bitmap added through editBitmaps, and changedExtents lists them', async () => {
  const dev = await image('qcow2');
  assert.ok(dev.persistentBitmaps && dev.editBitmaps);
  await dev.editBitmaps((b) => b.add('chk', { granularity: 65536 }));
  await dev.write(MiB, new Uint8Array(4096).fill(1));
  assert.deepEqual(await changedExtents(dev, 'chk'), [{ offset: MiB, length: 65536 }]);
  assert.deepEqual(
    (await dev.persistentBitmaps()).list().map((b) => [b.name, b.granularity, b.auto]),
    [['chk', 65536, true]],
  );
  await dev.close();
});

test('copyBitmaps carries a bitmap between qcow2 devices through the capability', async () => {
  const src = await image('qcow2');
  await src.editBitmaps!((b) => b.add('chk', { granularity: 65536 }));
  await src.write(2 * MiB, new Uint8Array(512).fill(2));
  const dst = await image('qcow2');
  await checkBitmapCopy([src]);
  await copyBitmaps(src, dst);
  assert.deepEqual(await changedExtents(dst, 'chk'), [{ offset: 2 * MiB, length: 65536 }]);
  await src.close();
  await dst.close();
});

test('raw and qcow v1 devices have no bitmaps: each operation refuses as before', async () => {
  const qcow2 = await image('qcow2');
  for (const format of ['raw', 'qcow']) {
    const dev = await image(format);
    assert.equal(dev.persistentBitmaps, undefined);
    assert.equal(dev.editBitmaps, undefined);
    await assert.rejects(bitmapExtents(dev, 'chk'), { code: 'QCOW_UNSUPPORTED', message: `a ${format} image holds no persistent dirty bitmaps` });
    await assert.rejects(checkBitmapCopy([dev]), { code: 'QCOW_UNSUPPORTED', message: 'Source lacks bitmap support' });
    await assert.rejects(copyBitmaps(qcow2, dev), { code: 'QCOW_UNSUPPORTED', message: `Format driver '${format}' does not support bitmaps` });
    const createTarget = () => Promise.reject(new Error('no target may be created'));
    await assert.rejects(backup(dev, { bitmap: 'chk', createTarget }), { code: 'QCOW_UNSUPPORTED', message: /persistent dirty bitmaps/ });
    await dev.close();
  }
  await qcow2.close();
});
