/**
 * DeviceBase on its own, through the smallest format that extends it (bytes in a MemoryStore, a
 * call log): the checks every format gets for free, reads through to a shorter backing device,
 * the default zero writes, fua, errors that name the image, extent merging, and closing once.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockExtent, ImageDescription, WriteOptions } from '#src/core/block-device.js';
import { DeviceBase, mergeExtents } from '#src/core/device-base.js';
import { QcowError } from '#src/core/errors.js';
import { MemoryStore } from '#src/storage/memory.js';

/** Bytes written land in the store; what was never written reads from the backing device. */
class TinyDevice extends DeviceBase {
  readonly format = 'tiny';
  readonly clusterSize = 512;
  readonly calls: string[] = [];
  readonly written = new Set<number>();
  failWith: unknown;

  constructor(size: number, options: { readOnly?: boolean; backing?: TinyDevice; name?: string } = {}) {
    super(new MemoryStore(new Uint8Array(size), { name: options.name ?? 'tiny.img' }), size, options.readOnly ?? false);
    this.backing = options.backing ?? null;
  }

  protected async doRead(offset: number, into: Uint8Array): Promise<void> {
    this.calls.push(`read ${offset} ${into.length}`);
    if (this.failWith) throw this.failWith;
    for (let i = 0; i < into.length; i += 512) {
      const piece = into.subarray(i, Math.min(into.length, i + 512));
      if (this.written.has(Math.floor((offset + i) / 512))) await this.store.read(offset + i, piece);
      else await this.readBacking(offset + i, piece);
    }
  }

  protected async doWrite(offset: number, data: Uint8Array, options: WriteOptions): Promise<void> {
    this.calls.push(`write ${offset} ${data.length}${options.fua ? ' fua' : ''}`);
    await this.store.write(offset, data);
    for (let s = Math.floor(offset / 512); s * 512 < offset + data.length; s++) this.written.add(s);
  }

  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    // One extent per 512-byte sector, left for mergeExtents to join.
    const out: BlockExtent[] = [];
    for (let at = offset; at < offset + length; at += 512) {
      const data = this.written.has(at / 512);
      out.push({ offset: at, length: Math.min(512, offset + length - at), allocated: data, zero: false, data, hostOffset: data ? at : undefined });
    }
    return out;
  }

  async describe(): Promise<ImageDescription> {
    return { format: this.format, virtualSize: this.size, clusterSize: this.clusterSize };
  }

  async flush(): Promise<void> {
    this.calls.push('flush');
  }

  protected async doClose(): Promise<void> {
    this.calls.push('close');
  }
}

const code = (c: string) => (e: unknown) => e instanceof QcowError && e.code === c;

test('requests are checked before the format sees them: bad numbers, past the end, empty ones', async () => {
  const dev = new TinyDevice(4096);
  for (const offset of [-1, 0.5, Number.MAX_SAFE_INTEGER + 1, NaN]) {
    await assert.rejects(dev.read(offset, new Uint8Array(10)), code('QCOW_INVALID_ARGUMENT'), `offset ${offset}`);
  }
  for (const length of [-1, 1.5, Infinity]) {
    await assert.rejects(dev.blockStatus(0, length), code('QCOW_INVALID_ARGUMENT'), `length ${length}`);
    await assert.rejects(dev.writeZeroes(0, length), code('QCOW_INVALID_ARGUMENT'), `length ${length}`);
  }
  await assert.rejects(dev.read(4000, new Uint8Array(200)), code('QCOW_OUT_OF_RANGE'));
  await assert.rejects(dev.write(4096, new Uint8Array(1)), code('QCOW_OUT_OF_RANGE'));
  await assert.rejects(dev.blockStatus(0, 4097), code('QCOW_OUT_OF_RANGE'));
  await dev.read(4096, new Uint8Array(0));
  await dev.write(100, new Uint8Array(0));
  assert.deepEqual(await dev.blockStatus(10, 0), []);
  assert.deepEqual(dev.calls, [], 'nothing reached the format');
});

test('a read-only device refuses writes, zero writes and discards, and still reads', async () => {
  const dev = new TinyDevice(4096, { readOnly: true });
  await assert.rejects(dev.write(0, new Uint8Array(1)), code('QCOW_READ_ONLY'));
  await assert.rejects(dev.writeZeroes(0, 512), code('QCOW_READ_ONLY'));
  await assert.rejects(dev.discard(0, 512), code('QCOW_READ_ONLY'));
  await dev.read(0, new Uint8Array(512));
  assert.deepEqual(dev.calls, ['read 0 512']);
});

test('reads fall through to a shorter backing device, zeros past its end', async () => {
  const base = new TinyDevice(1024, { name: 'base.img' });
  await base.write(0, new Uint8Array(1024).fill(7));
  const top = new TinyDevice(4096, { backing: base });
  await top.write(512, new Uint8Array(512).fill(9));
  const buf = new Uint8Array(2048).fill(0xee);
  await top.read(0, buf);
  assert.deepEqual(buf.subarray(0, 512), new Uint8Array(512).fill(7), 'from the backing device');
  assert.deepEqual(buf.subarray(512, 1024), new Uint8Array(512).fill(9), 'written in the top');
  assert.deepEqual(buf.subarray(1024), new Uint8Array(1024), 'past the backing end: zeros');
});

test('the default zero write writes zeros in bounded pieces; fua flushes after the write', async () => {
  const dev = new TinyDevice(3 * 2 ** 20);
  await dev.write(0, new Uint8Array(3 * 2 ** 20).fill(1));
  dev.calls.length = 0;
  await dev.writeZeroes(100, 2 ** 20 + 1000, { fua: true });
  assert.deepEqual(dev.calls, [`write 100 ${2 ** 20} fua`, 'write 1048676 1000 fua', 'flush']);
  const back = new Uint8Array(2 ** 20 + 1000);
  await dev.read(100, back);
  assert.ok(back.every((b) => b === 0));
  await assert.rejects(dev.writeZeroes(0, 512, { fastOnly: true }), code('QCOW_UNSUPPORTED'));
  dev.calls.length = 0;
  await dev.discard(0, 512);
  assert.deepEqual(dev.calls, [], 'discard is a hint: by default nothing happens');
});

test("the format's errors name the image; a backing file's errors keep their own name", async () => {
  const base = new TinyDevice(1024, { name: 'base.img' });
  base.failWith = new QcowError('QCOW_IO', 'disk on fire');
  const top = new TinyDevice(1024, { backing: base, name: 'top.img' });
  await assert.rejects(top.read(0, new Uint8Array(10)), (e: unknown) => e instanceof QcowError && e.file === 'base.img');
  top.failWith = new QcowError('QCOW_CORRUPT', 'bad table');
  await assert.rejects(top.read(0, new Uint8Array(10)), (e: unknown) => e instanceof QcowError && e.file === 'top.img');
});

test('block status is merged into maximal runs, host offsets continuing', async () => {
  const dev = new TinyDevice(4096);
  await dev.write(1024, new Uint8Array(1536).fill(1));
  assert.deepEqual(await dev.blockStatus(0, 4096), [
    { offset: 0, length: 1024, allocated: false, zero: false, data: false, hostOffset: undefined },
    { offset: 1024, length: 1536, allocated: true, zero: false, data: true, hostOffset: 1024 },
    { offset: 2560, length: 1536, allocated: false, zero: false, data: false, hostOffset: undefined },
  ]);
  // Runs whose host offsets jump, or from another file, stay apart.
  const apart = mergeExtents([
    { offset: 0, length: 512, allocated: true, zero: false, data: true, hostOffset: 0 },
    { offset: 512, length: 512, allocated: true, zero: false, data: true, hostOffset: 4096 },
    { offset: 1024, length: 512, allocated: true, zero: false, data: true, hostOffset: 4608, hostFile: 'data.img' },
    { offset: 1536, length: 0, allocated: true, zero: false, data: true },
  ]);
  assert.equal(apart.length, 3);
});

test('close closes the format, then its backing chain, once; await using does the same', async () => {
  const base = new TinyDevice(512, { name: 'base.img' });
  const top = new TinyDevice(512, { backing: base });
  await top.close();
  await top.close();
  assert.deepEqual(top.calls, ['close']);
  assert.deepEqual(base.calls, ['close']);
  const other = new TinyDevice(512);
  {
    await using _dev = other;
  }
  assert.deepEqual(other.calls, ['close']);
});
