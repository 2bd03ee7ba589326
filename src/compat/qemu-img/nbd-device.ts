/**
 * An NBD export opened by qemu-img (`driver=nbd` options, `nbd://`, `nbd+unix://`, `nbd:unix:`
 * names): a raw image over the connection whose allocation is the server's block status, read as
 * QEMU's nbd driver reads it. The context is base:allocation, or the one `x-dirty-bitmap` names
 * (a dirty bitmap, qemu:allocation-depth), whose flags QEMU reads with base:allocation's meaning:
 * bit 0 a hole (no data), bit 1 zeros. A range with neither data nor zeros is not allocated.
 */
import { DeviceBase, type BlockDevice, type BlockExtent, type ImageDescription, type NodeOpenOptions, type WriteOptions } from '../../node.js';
import { NbdStore, nbdTargetOf, nbdTargetOfOptions, type NbdTarget } from '../nbd-store.js';

const NBD_STATE_HOLE = 1;
const NBD_STATE_ZERO = 2;
/** The most one block status request asks about (the length field is 32 bits). */
const MAX_STATUS_REQUEST = 2 ** 31;

/** The export's bytes as they are (QEMU's nbd driver is a protocol: qemu-img shows it as raw). */
class NbdDevice extends DeviceBase {
  readonly format = 'raw';
  readonly clusterSize = 512;

  constructor(private readonly nbd: NbdStore, size: number, readOnly: boolean) {
    super(nbd, size, readOnly);
  }

  protected async doRead(offset: number, into: Uint8Array): Promise<void> {
    await this.nbd.read(offset, into);
  }

  protected async doWrite(offset: number, data: Uint8Array, _options: WriteOptions): Promise<void> {
    await this.nbd.write(offset, data);
  }

  async describe(): Promise<ImageDescription> {
    // QEMU's nbd driver has no driver information (so no dirty flag in info).
    return { format: 'raw', virtualSize: this.size, driverInfo: false };
  }

  async flush(): Promise<void> {
    await this.nbd.flush();
  }

  protected async doClose(): Promise<void> {
    await this.nbd.close();
  }

  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    const out: BlockExtent[] = [];
    const end = offset + length;
    for (let at = offset; at < end; ) {
      const extents = await this.nbd.extents(at, Math.min(end - at, MAX_STATUS_REQUEST));
      // Without a context every byte is data, as QEMU's driver says when the server gives none.
      if (extents === undefined || extents.length === 0) {
        out.push({ offset: at, length: end - at, allocated: true, zero: false, data: true, hostOffset: at });
        break;
      }
      for (const e of extents) {
        const n = Math.min(e.length, end - at);
        if (n <= 0) break;
        const data = (e.flags & NBD_STATE_HOLE) === 0;
        const zero = (e.flags & NBD_STATE_ZERO) !== 0;
        const allocated = data || zero;
        out.push({ offset: at, length: n, allocated, zero, data, ...(allocated ? { hostOffset: at } : { zeroUnknown: true }) });
        at += n;
      }
    }
    return out;
  }
}

/** The name QEMU's nbd driver gives an export, however it was named (what info and map show). */
function qemuNbdName(target: NbdTarget): string {
  const name = target.exportName;
  if ('path' in target.address) return name ? `nbd+unix:///${name}?socket=${target.address.path}` : `nbd+unix://?socket=${target.address.path}`;
  const where = `nbd://${target.address.host ?? 'localhost'}:${target.address.port}`;
  return name ? `${where}/${name}` : where;
}

/** Open the export `options` (or the NBD name `name`) gives, read-only unless asked otherwise. */
export async function openNbdImage(name: string, options: Record<string, string>, open: NodeOpenOptions): Promise<BlockDevice> {
  const target = nbdTargetOfOptions(options) ?? nbdTargetOf(name);
  if (!target) throw new Error(`not an NBD export: ${name}`);
  const readOnly = open.readOnly ?? false;
  const store = await NbdStore.connect(qemuNbdName(target), target, readOnly, options['x-dirty-bitmap'] ?? 'base:allocation');
  return new NbdDevice(store, await store.size(), readOnly);
}
