/**
 * amendImage and amendOptions over the formats' capabilities: qcow2 amends (checked here without
 * qemu on an image in memory; formats/qcow2/amend.test.ts compares with qemu-img), raw and qcow v1
 * refuse in qemu-img's words.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore, builtinFormats, type BlockDevice } from '#src/index.js';
import { amendImage, amendOptions } from '#src/ops/amend.js';

async function image(format: string): Promise<{ store: MemoryStore; open: () => Promise<BlockDevice> }> {
  const fmt = builtinFormats().get(format);
  const store = new MemoryStore(undefined, { name: `x.${format}` });
  await fmt.create(store, { size: 1 << 20 });
  return { store, open: () => fmt.open(store, {}) };
}

test('qcow2 images amend through the device: lazy_refcounts=on is in the header afterwards', async () => {
  const { open } = await image('qcow2');
  const dev = await open();
  await amendImage(dev, { lazy_refcounts: 'on' });
  await dev.close();
  const again = await open();
  assert.equal((await again.describe()).formatSpecific?.data['lazy-refcounts'], true);
  await again.close();
});

test('qcow2 refuses an unknown option before writing anything', async () => {
  const { store, open } = await image('qcow2');
  const before = store.bytes().slice();
  const dev = await open();
  await assert.rejects(amendImage(dev, { foo: 'bar' }), { code: 'QCOW_INVALID_ARGUMENT', message: /Invalid parameter 'foo'/ });
  await dev.close();
  assert.deepEqual(store.bytes(), before);
});

test('raw and qcow v1 devices refuse amend with qemu-img\'s words', async () => {
  for (const format of ['raw', 'qcow']) {
    const { open } = await image(format);
    const dev = await open();
    await assert.rejects(amendImage(dev, { size: '2M' }), { code: 'QCOW_UNSUPPORTED', message: `Format driver '${format}' does not support option amendment` });
    assert.equal(dev.size, 1 << 20);
    await dev.close();
  }
});

test('amendOptions lists qcow2\'s options and refuses formats without amend', () => {
  const formats = builtinFormats();
  assert.deepEqual(Object.keys(amendOptions(formats.get('qcow2'))).sort(), ['backing_file', 'backing_fmt', 'compat', 'lazy_refcounts', 'refcount_bits', 'size']);
  for (const name of ['raw', 'qcow']) assert.throws(() => amendOptions(formats.get(name)), { code: 'QCOW_UNSUPPORTED', message: `Format driver '${name}' does not support option amendment` });
});
