/** In-memory images for the operation tests: raw and qcow2 over MemoryStore, with backing files. */
import type { BlockDevice, BlockExtent, ImageDescription } from '#src/core/block-device.js';
import { DeviceBase } from '#src/core/device-base.js';
import { MemoryStore } from '#src/storage/memory.js';
import { rawFormat } from '#src/formats/raw/raw.js';
import { qcow2Format } from '#src/formats/qcow2/format.js';

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

/**
 * A minimal overlay format for testing commit and rebase logic: 4 KiB clusters kept in a Map,
 * zero clusters, a backing device, and the two optional hooks (setBacking, makeEmpty) with the
 * meaning BlockDevice gives them.
 */
export class MemOverlay extends DeviceBase {
  readonly format = 'memoverlay';
  readonly clusterSize = 4096;
  readonly clusters = new Map<number, Uint8Array | 'zero'>();
  backingName: string | null;
  backingFormat: string | null;

  constructor(size: number, backing: BlockDevice | null, name = 'overlay') {
    super(new MemoryStore(undefined, { name }), size, false);
    this.backing = backing;
    this.backingName = backing?.filename ?? null;
    this.backingFormat = backing?.format ?? null;
  }

  protected async doRead(offset: number, into: Uint8Array): Promise<void> {
    for (let done = 0; done < into.length; ) {
      const c = Math.floor((offset + done) / 4096);
      const inC = (offset + done) % 4096;
      const n = Math.min(4096 - inC, into.length - done);
      const part = into.subarray(done, done + n);
      const own = this.clusters.get(c);
      if (own === 'zero') part.fill(0);
      else if (own) part.set(own.subarray(inC, inC + n));
      else await this.readBacking(offset + done, part);
      done += n;
    }
  }

  protected async doWrite(offset: number, data: Uint8Array): Promise<void> {
    for (let done = 0; done < data.length; ) {
      const c = Math.floor((offset + done) / 4096);
      const inC = (offset + done) % 4096;
      const n = Math.min(4096 - inC, data.length - done);
      let own = this.clusters.get(c);
      if (!(own instanceof Uint8Array)) {
        const fresh = new Uint8Array(4096);
        if (own !== 'zero') await this.readBacking(c * 4096, fresh.subarray(0, Math.min(4096, this.size - c * 4096)));
        own = fresh;
        this.clusters.set(c, own);
      }
      own.set(data.subarray(done, done + n), inC);
      done += n;
    }
  }

  protected override async doWriteZeroes(offset: number, length: number): Promise<void> {
    for (let off = offset; off < offset + length; ) {
      const c = Math.floor(off / 4096);
      const n = Math.min(4096 - (off % 4096), offset + length - off);
      if (n === 4096) this.clusters.set(c, 'zero');
      else await this.doWrite(off, new Uint8Array(n));
      off += n;
    }
  }

  protected async doBlockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    const out: BlockExtent[] = [];
    for (let off = offset; off < offset + length; ) {
      const c = Math.floor(off / 4096);
      const n = Math.min(4096 - (off % 4096), offset + length - off);
      const own = this.clusters.get(c);
      out.push({ offset: off, length: n, allocated: own !== undefined, zero: own === 'zero', data: own instanceof Uint8Array });
      off += n;
    }
    return out;
  }

  async describe(): Promise<ImageDescription> {
    return { format: this.format, virtualSize: this.size, backingFilename: this.backingName ?? undefined, backingFormat: this.backingFormat ?? undefined };
  }

  async flush(): Promise<void> {}
  protected async doClose(): Promise<void> {}

  async setBacking(name: string | null, format: string | null): Promise<void> {
    this.backingName = name;
    this.backingFormat = format;
  }

  async makeEmpty(): Promise<void> {
    this.clusters.clear();
  }

  /** Bytes this layer holds itself (data or zero clusters). */
  ownBytes(): number {
    return this.clusters.size * 4096;
  }
}
