/** Shared by the qcow1 unit tests: images in memory with any geometry, and a store that records its operations. */
import type { BlockDevice } from '#src/core/block-device.js';
import { MemoryStore } from '#src/storage/memory.js';
import type { ByteStore } from '#src/storage/types.js';
import { rawFormat } from '#src/formats/raw/raw.js';
import { writeEmptyImage } from '#src/formats/qcow1/create.js';
import { Qcow1Device } from '#src/formats/qcow1/device.js';

export interface MemImage {
  store: MemoryStore;
  dev: Qcow1Device;
  reopen(options?: { readOnly?: boolean; password?: string }): Promise<Qcow1Device>;
}

export interface MemImageOptions {
  size: number;
  clusterBits?: number;
  l2Bits?: number;
  /** Raw content of a backing image (named "base.raw" in the header). */
  backing?: Uint8Array;
  password?: string;
  cacheBytes?: number;
  wrap?: (store: MemoryStore) => ByteStore;
}

export async function memImage(o: MemImageOptions): Promise<MemImage> {
  const store = new MemoryStore(undefined, { name: 'mem.qcow' });
  await writeEmptyImage(store, {
    size: o.size,
    clusterBits: o.clusterBits ?? 12,
    l2Bits: o.l2Bits ?? 9,
    backingName: o.backing ? new TextEncoder().encode('base.raw') : undefined,
    encrypted: o.password !== undefined,
  });
  const open = async (extra: { readOnly?: boolean; password?: string } = {}) =>
    Qcow1Device.open(o.wrap ? o.wrap(store) : store, {
      password: extra.password ?? o.password,
      readOnly: extra.readOnly,
      cacheBytes: o.cacheBytes,
      openBacking: async (): Promise<BlockDevice> => rawFormat.open(new MemoryStore(o.backing, { readOnly: true }), { readOnly: true }),
    });
  return { store, dev: await open(), reopen: open };
}

export async function readAll(dev: BlockDevice): Promise<Uint8Array> {
  const out = new Uint8Array(dev.size);
  await dev.read(0, out);
  return out;
}

export type Op = { kind: 'write'; offset: number; length: number } | { kind: 'flush' };

/** A store that logs writes and flushes, for checking the order metadata reaches the disk in. */
export class RecordingStore implements ByteStore {
  readonly log: Op[] = [];
  constructor(private readonly inner: ByteStore) {}
  get name() {
    return this.inner.name;
  }
  get readOnly() {
    return this.inner.readOnly;
  }
  size() {
    return this.inner.size();
  }
  read(offset: number, into: Uint8Array) {
    return this.inner.read(offset, into);
  }
  async write(offset: number, data: Uint8Array) {
    this.log.push({ kind: 'write', offset, length: data.length });
    await this.inner.write(offset, data);
  }
  truncate(size: number) {
    return this.inner.truncate(size);
  }
  async flush() {
    this.log.push({ kind: 'flush' });
    await this.inner.flush();
  }
  close() {
    return this.inner.close();
  }
}
