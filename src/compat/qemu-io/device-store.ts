/**
 * A BlockDevice's guest bytes as a ByteStore, so an image can be opened inside another image
 * (qemu's nested formats: `driver=qcow2,file.driver=qcow2,file.file.filename=...`). Writes past
 * the end grow the inner device where its format can.
 */
import { QcowError, type BlockDevice, type ByteStore, type StoreOpener } from '../../node.js';
import { openerWithStore } from '../opener-with.js';

export class DeviceStore implements ByteStore {
  constructor(private readonly dev: BlockDevice) {}
  get name(): string {
    return this.dev.filename;
  }
  get readOnly(): boolean {
    return this.dev.readOnly;
  }
  async size(): Promise<number> {
    return this.dev.size;
  }
  async read(offset: number, into: Uint8Array): Promise<number> {
    const n = Math.max(0, Math.min(into.length, this.dev.size - offset));
    if (n > 0) await this.dev.read(offset, into.subarray(0, n));
    into.fill(0, n);
    return n;
  }
  async write(offset: number, data: Uint8Array): Promise<void> {
    if (offset + data.length > this.dev.size) await this.truncate(offset + data.length);
    await this.dev.write(offset, data);
  }
  async truncate(size: number): Promise<void> {
    if (size === this.dev.size) return;
    if (!this.dev.resize) throw new QcowError('QCOW_UNSUPPORTED', `${this.dev.format} images cannot change size`, { file: this.name });
    await this.dev.resize(size, { shrink: true });
  }
  flush(): Promise<void> {
    return this.dev.flush();
  }
  close(): Promise<void> {
    return this.dev.close();
  }
}

/** `base`, except that `name` opens as the given device (once). */
export function openerWith(base: StoreOpener, name: string, dev: BlockDevice): StoreOpener {
  return openerWithStore(base, name, new DeviceStore(dev));
}
