/**
 * QEMU's `null-co` driver: a disk of a given size (`size`, default 1 GiB) that keeps nothing.
 * Writes succeed and are dropped; reads return zeros with `read-zeroes=on` and otherwise leave the
 * caller's buffer as it was (QEMU does not touch it). Block status calls the disk unallocated, and
 * zero where reads give zeros. Test programs (the iotests) use it as a source that costs nothing.
 */
import { DeviceBase, MemoryStore, QcowError, type BlockDevice, type BlockExtent, type ImageDescription } from '../node.js';

export const NULL_CO = 'null-co';
const DEFAULT_SIZE = 1 << 30;

class NullCoDevice extends DeviceBase {
  readonly format = NULL_CO;
  readonly clusterSize = 512;

  constructor(name: string, size: number, readOnly: boolean, private readonly readZeroes: boolean) {
    super(new MemoryStore(new Uint8Array(0), { name, readOnly }), size, readOnly);
  }
  protected async doRead(_offset: number, into: Uint8Array): Promise<void> {
    if (this.readZeroes) into.fill(0);
  }
  protected async doWrite(): Promise<void> {}
  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    return [{ offset, length, allocated: this.readZeroes, zero: this.readZeroes, data: false }];
  }
  async describe(): Promise<ImageDescription> {
    return { format: NULL_CO, virtualSize: this.size };
  }
  async flush(): Promise<void> {}
  protected async doClose(): Promise<void> {}
}

/** A null-co device from its options (`size`, `read-zeroes`), named `name` in messages. */
export function openNullCo(name: string, options: Record<string, string>, readOnly: boolean): BlockDevice {
  const size = options.size === undefined ? DEFAULT_SIZE : Number(options.size);
  if (!Number.isSafeInteger(size) || size < 0) throw new QcowError('QCOW_INVALID_ARGUMENT', `Parameter 'size' expects a size`);
  const rz = options['read-zeroes'];
  if (rz !== undefined && !['on', 'off', 'true', 'false'].includes(rz)) throw new QcowError('QCOW_INVALID_ARGUMENT', "Parameter 'read-zeroes' expects 'on' or 'off'");
  return new NullCoDevice(name, size, readOnly, rz === 'on' || rz === 'true');
}
