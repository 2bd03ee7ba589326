/** In-memory images for the operation tests: raw and qcow2 over MemoryStore, with backing files. */
import type { BlockDevice } from '../core/block-device.js';
import { MemoryStore } from '../storage/memory.js';
import { rawFormat } from '../formats/raw/raw.js';
import { qcow2Format } from '../formats/qcow2/format.js';

export async function memRaw(bytes: Uint8Array | number, name = 'mem.raw'): Promise<BlockDevice> {
  const init = typeof bytes === 'number' ? new Uint8Array(bytes) : bytes;
  return rawFormat.open(new MemoryStore(init, { name }));
}

export async function memQcow2(
  size: number,
  options: { backing?: BlockDevice; backingName?: string; opts?: Record<string, string>; name?: string } = {},
): Promise<BlockDevice> {
  const store = new MemoryStore(undefined, { name: options.name ?? 'mem.qcow2' });
  const backingFile = options.backing ? (options.backingName ?? options.backing.filename) : undefined;
  await qcow2Format.create(store, {
    size,
    backingFile,
    backingFormat: options.backing?.format,
    options: options.opts ?? {},
  });
  return qcow2Format.open(store, options.backing ? { openBacking: async () => options.backing! } : {});
}

/** Fill [offset, +length) with `byte`. */
export async function fill(dev: BlockDevice, offset: number, length: number, byte: number): Promise<void> {
  await dev.write(offset, new Uint8Array(length).fill(byte));
}

export async function readAll(dev: BlockDevice): Promise<Uint8Array> {
  const out = new Uint8Array(dev.size);
  await dev.read(0, out);
  return out;
}

/** Bytes this layer stores data for (blockStatus data extents). */
export async function dataBytes(dev: BlockDevice): Promise<number> {
  let n = 0;
  for (const e of await dev.blockStatus(0, dev.size)) if (e.allocated && e.data) n += e.length;
  return n;
}
