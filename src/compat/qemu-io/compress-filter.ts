/**
 * QEMU's `compress` filter driver: a node over an image whose writes all become compressed
 * writes. Its request alignment is the image's cluster size, so a write that covers part of a
 * cluster is widened to whole clusters with what the image holds there (read, modified, written
 * back compressed), as QEMU's block layer does for it. Reads and block status are the image's.
 */
import { DeviceBase, QcowError, type BlockDevice, type BlockExtent, type ImageDescription } from '../../node.js';
import { DeviceStore } from './device-store.js';

export const COMPRESS = 'compress';

class CompressFilter extends DeviceBase {
  readonly format = COMPRESS;
  readonly clusterSize: number;

  constructor(private readonly inner: BlockDevice) {
    super(new DeviceStore(inner), inner.size, inner.readOnly);
    this.clusterSize = inner.clusterSize;
  }
  override get unusable(): Error | undefined {
    return this.inner.unusable;
  }
  protected async doRead(offset: number, into: Uint8Array): Promise<void> {
    await this.inner.read(offset, into);
  }
  protected async doWrite(offset: number, data: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    const start = Math.floor(offset / cs) * cs;
    const end = Math.min(this.size, Math.ceil((offset + data.length) / cs) * cs);
    let buf = data;
    if (start !== offset || end !== offset + data.length) {
      buf = new Uint8Array(end - start);
      await this.inner.read(start, buf);
      buf.set(data, offset - start);
    }
    await this.inner.writeCompressed!(start, buf);
  }
  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    return this.inner.blockStatus(offset, length);
  }
  async describe(): Promise<ImageDescription> {
    return { ...(await this.inner.describe()), format: COMPRESS };
  }
  async flush(): Promise<void> {
    await this.inner.flush();
  }
  protected async doClose(): Promise<void> {
    await this.inner.close();
  }
}

/** The filter over `inner` (closed with it); QEMU refuses images that cannot compress. */
export async function compressFilter(inner: BlockDevice): Promise<BlockDevice> {
  if (!inner.writeCompressed) {
    await inner.close();
    throw new QcowError('QCOW_UNSUPPORTED', 'Compression is not supported for underlying format: ' + inner.format);
  }
  return new CompressFilter(inner);
}
