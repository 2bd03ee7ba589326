import { test } from 'node:test';
import assert from 'node:assert/strict';
import { asAsyncBuffer, asV86Buffer } from '#src/browser/adapters.js';
import { OverlayDevice } from '#src/overlay/overlay.js';
import { MemoryStore } from '#src/storage/memory.js';
import { rawFormat } from '#src/formats/index.js';
import { QcowError } from '#src/core/errors.js';
import { randomBytes } from '../support/qemu.js';

async function readOnlyDisk(size = 64 * 1024) {
  const content = randomBytes(size, 5);
  const dev = await rawFormat.open(new MemoryStore(content, { name: 'disk.raw', readOnly: true }), { readOnly: true });
  return { dev, content };
}

const get = (b: ReturnType<typeof asV86Buffer>, offset: number, length: number) => new Promise<Uint8Array>((resolve) => b.get(offset, length, resolve));
const set = (b: ReturnType<typeof asV86Buffer>, offset: number, data: Uint8Array) => new Promise<void>((resolve) => b.set(offset, data, resolve));

test('v86 buffer: byteLength, load() calls onload, get and set through an overlay', async () => {
  const { dev, content } = await readOnlyDisk();
  const ov = new OverlayDevice(dev);
  const buf = asV86Buffer(ov);
  assert.equal(buf.byteLength, content.length);
  let loaded = false;
  buf.onload = () => (loaded = true);
  buf.load();
  assert.ok(loaded);
  assert.deepEqual(await get(buf, 1024, 512), content.subarray(1024, 1536));
  const sector = new Uint8Array(512).fill(0x5a);
  await set(buf, 2048, sector);
  sector.fill(0); // the emulator may reuse its array once set() has returned
  assert.deepEqual(await get(buf, 2048, 512), new Uint8Array(512).fill(0x5a));
  await ov.close();
});

test('v86 buffer: a failed request goes to onError, not to the callback', async () => {
  const { dev } = await readOnlyDisk();
  const failure = new Promise<{ e: unknown; op: string }>((resolve) => {
    const buf = asV86Buffer(dev, { onError: (e, r) => resolve({ e, op: r.op }) });
    buf.set(0, new Uint8Array(512), () => assert.fail('a write to a read-only disk must not complete'));
  });
  const { e, op } = await failure;
  assert.equal(op, 'set');
  assert.ok(e instanceof QcowError && e.code === 'QCOW_READ_ONLY');
  await dev.close();
});

test('async buffer: slice(start, end) as Array.prototype.slice counts, as an ArrayBuffer', async () => {
  const { dev, content } = await readOnlyDisk();
  const ab = asAsyncBuffer(dev);
  assert.equal(ab.byteLength, content.length);
  assert.deepEqual(new Uint8Array(await ab.slice(100, 300)), content.subarray(100, 300));
  assert.deepEqual(new Uint8Array(await ab.slice(-10)), content.subarray(content.length - 10));
  assert.deepEqual(new Uint8Array(await ab.slice(content.length - 5, content.length + 100)), content.subarray(content.length - 5));
  assert.equal((await ab.slice(300, 100)).byteLength, 0);
  await dev.close();
});
