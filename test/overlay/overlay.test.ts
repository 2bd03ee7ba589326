import { test } from 'node:test';
import assert from 'node:assert/strict';
import { OverlayDevice } from '#src/overlay/overlay.js';
import { MemoryStore } from '#src/storage/memory.js';
import { rawFormat } from '#src/formats/index.js';
import { QcowError } from '#src/core/errors.js';
import { randomBytes } from '../support/qemu.js';

const isCode = (code: string) => (e: unknown) => e instanceof QcowError && e.code === code;

/** A read-only raw device over random bytes; its size is not a multiple of the block size. */
async function readOnlyBase(size = 256 * 1024 + 1000) {
  const content = randomBytes(size, 3);
  const store = new MemoryStore(content, { name: 'base.raw', readOnly: true });
  const dev = await rawFormat.open(store, { readOnly: true });
  return { dev, store, content };
}

async function readAll(dev: { size: number; read(o: number, b: Uint8Array): Promise<void> }) {
  const buf = new Uint8Array(dev.size);
  await dev.read(0, buf);
  return buf;
}

test('reads show the base until written; writes never reach the base', async () => {
  const { dev, store, content } = await readOnlyBase();
  const ov = new OverlayDevice(dev);
  assert.deepEqual(await readAll(ov), content);
  await ov.write(5000, new Uint8Array(10).fill(0xaa)); // inside one block: copy-on-write of the rest
  const expected = content.slice();
  expected.fill(0xaa, 5000, 5010);
  assert.deepEqual(await readAll(ov), expected);
  assert.deepEqual(store.bytes(), content);
  assert.equal(ov.heldBytes, 4096);
  await ov.close();
});

test('random writes, zeroes and discards read back as a model disk says', async () => {
  const { dev, content } = await readOnlyBase();
  const ov = new OverlayDevice(dev, { blockSize: 4096 });
  const model = content.slice();
  let seed = 12345;
  const rnd = (n: number) => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed % n;
  };
  for (let step = 0; step < 300; step++) {
    const offset = rnd(ov.size);
    const length = Math.min(ov.size - offset, 1 + rnd(3 * 4096));
    const kind = rnd(10);
    if (kind < 6) {
      const data = randomBytes(length, step + 1);
      await ov.write(offset, data);
      model.set(data, offset);
    } else if (kind < 8) {
      await ov.writeZeroes(offset, length);
      model.fill(0, offset, offset + length);
    } else {
      // Discard may only change whole blocks, which then show the base again.
      await ov.discard(offset, length);
      const first = Math.ceil(offset / 4096) * 4096;
      const end = offset + length;
      for (let b = first; b < end; b += 4096) {
        const blockEnd = Math.min(b + 4096, ov.size);
        if (blockEnd <= end) model.set(content.subarray(b, blockEnd), b);
      }
    }
    const probeAt = rnd(ov.size);
    const probe = new Uint8Array(Math.min(ov.size - probeAt, 1 + rnd(10000)));
    await ov.read(probeAt, probe);
    assert.deepEqual(probe, model.subarray(probeAt, probeAt + probe.length), `step ${step}`);
  }
  assert.deepEqual(await readAll(ov), model);
  await ov.close();
});

test('block status: written blocks are data in the overlay, zeroed ones zero, the rest the base', async () => {
  const { dev } = await readOnlyBase();
  const ov = new OverlayDevice(dev, { blockSize: 4096 });
  await ov.write(8192, new Uint8Array(8192).fill(1));
  await ov.writeZeroes(65536, 4096);
  const map = (await ov.blockStatus(0, 69632)).map((e) => [e.offset, e.length, e.allocated, e.zero, e.data]);
  assert.deepEqual(map, [
    [0, 8192, false, false, false],
    [8192, 8192, true, false, true],
    [16384, 49152, false, false, false],
    [65536, 4096, true, true, false],
  ]);
  assert.equal(ov.backing, dev);
  assert.equal((await ov.describe()).backingFilename, 'base.raw');
  await ov.close();
});

test('zeroing and discarding whole blocks frees their space for later writes', async () => {
  const { dev } = await readOnlyBase();
  const ov = new OverlayDevice(dev, { blockSize: 4096, maxBytes: 4 * 4096 });
  await ov.write(0, new Uint8Array(4 * 4096).fill(2));
  await assert.rejects(ov.write(100_000, new Uint8Array(1)), isCode('QCOW_IO'));
  await ov.writeZeroes(0, 4096);
  await ov.discard(4096, 4096);
  assert.equal(ov.heldBytes, 2 * 4096);
  await ov.write(100_000, new Uint8Array(2).fill(3));
  await ov.write(200_000, new Uint8Array(2).fill(4));
  assert.equal(ov.heldBytes, 4 * 4096);
  await ov.close();
});

test('the overlay can be given any writable store, and refuses a read-only one', async () => {
  const { dev } = await readOnlyBase();
  const store = new MemoryStore(undefined, { name: 'scratch' });
  const ov = new OverlayDevice(dev, { store, blockSize: 512 });
  await ov.write(512, new Uint8Array(512).fill(9));
  assert.deepEqual(store.bytes(), new Uint8Array(512).fill(9));
  assert.throws(() => new OverlayDevice(dev, { store: new MemoryStore(undefined, { readOnly: true }) }), isCode('QCOW_READ_ONLY'));
  assert.throws(() => new OverlayDevice(dev, { blockSize: 1000 }), isCode('QCOW_INVALID_ARGUMENT'));
  await ov.close();
});

test('closing the overlay closes the base', async () => {
  const { dev } = await readOnlyBase();
  let closed = false;
  const close = dev.close.bind(dev);
  dev.close = async () => {
    closed = true;
    await close();
  };
  await new OverlayDevice(dev).close();
  assert.equal(closed, true);
});
