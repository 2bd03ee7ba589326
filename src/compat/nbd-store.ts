/**
 * An NBD export as a ByteStore, for the names QEMU's programs accept for one: `nbd:unix:PATH`
 * (with an optional `:exportname=NAME`), `nbd+unix:///NAME?socket=PATH`, `nbd:HOST:PORT`,
 * `nbd://HOST[:PORT][/NAME]` and
 * `driver=nbd` options (`server.type=unix`, `server.path`, `export`). The image over it is raw,
 * as QEMU's nbd protocol driver gives the export's bytes.
 */
import { QcowError, type ByteStore, type ListenAddress, type NbdClient } from '../node.js';

export interface NbdTarget {
  address: ListenAddress;
  exportName: string;
}

/** The NBD export a filename names, or undefined when it names none. */
export function nbdTargetOf(name: string): NbdTarget | undefined {
  let m = /^nbd:unix:([^:]+)(?::exportname=(.*))?$/.exec(name);
  if (m) return { address: { path: m[1]! }, exportName: m[2] ?? '' };
  m = /^nbd:([^:/]+):(\d+)(?::exportname=(.*))?$/.exec(name);
  if (m) return { address: { host: m[1]!, port: Number(m[2]) }, exportName: m[3] ?? '' };
  // nbd://HOST[:PORT][/EXPORT] (and nbd+tcp://), port 10809 by default.
  if (/^nbd(\+tcp)?:\/\//.test(name)) {
    const url = new URL(name.replace(/^nbd(\+tcp)?:/, 'http:'));
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    return { address: { host, port: url.port ? Number(url.port) : 10809 }, exportName: decodeURIComponent(url.pathname.replace(/^\//, '')) };
  }
  if (/^nbd\+unix:\/\//.test(name)) {
    const url = new URL(name);
    const socket = url.searchParams.get('socket');
    if (socket) return { address: { path: socket }, exportName: decodeURIComponent(url.pathname.replace(/^\//, '')) };
  }
  return undefined;
}

/** The NBD export `driver=nbd` options name (server.type unix or inet), or undefined. */
export function nbdTargetOfOptions(o: Record<string, string>): NbdTarget | undefined {
  if (o.driver !== 'nbd' && o['file.driver'] !== 'nbd') return undefined;
  const key = (k: string) => o[`server.${k}`] ?? o[`file.server.${k}`];
  const exportName = o.export ?? o['file.export'] ?? '';
  const path = key('path');
  if ((key('type') ?? 'unix') === 'unix' && path !== undefined) return { address: { path }, exportName };
  const host = key('host');
  const port = key('port');
  if (host !== undefined && port !== undefined) return { address: { host, port: Number(port) }, exportName };
  return undefined;
}

export class NbdStore implements ByteStore {
  private constructor(
    readonly name: string,
    private readonly client: NbdClient,
    readonly readOnly: boolean,
  ) {}

  /**
   * Connect and enter transmission; the export's size is known from then on. With `metaContext`
   * (base:allocation, or what QEMU's x-dirty-bitmap names), {@link NbdStore.extents} reports it.
   */
  static async connect(name: string, target: NbdTarget, readOnly: boolean, metaContext?: string): Promise<NbdStore> {
    let client: NbdClient;
    try {
      // The client (and node:net under it, ~110 page faults) loads only here: the qemu-img persona
      // imports this module for nbdTargetOf, which every command runs on its file names.
      const { NbdClient } = await import('./nbd-client.js');
      client = await NbdClient.connect(target.address, { exportName: target.exportName, metaContext });
    } catch (e) {
      const where = 'path' in target.address ? target.address.path : `${target.address.host ?? ''}:${target.address.port}`;
      const errno = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'No such file or directory' : (e as Error).message;
      throw new QcowError('QCOW_IO', `Failed to connect to '${where}': ${errno}`, { cause: e });
    }
    return new NbdStore(name, client, readOnly);
  }

  /** The metadata context's extents from `offset` (at most `length` bytes), or undefined without one. */
  async extents(offset: number, length: number): Promise<{ length: number; flags: number }[] | undefined> {
    if (!this.client.hasMetaContext) return undefined;
    return this.client.blockStatus(offset, length);
  }

  async size(): Promise<number> {
    return this.client.size;
  }
  async read(offset: number, into: Uint8Array): Promise<number> {
    const n = Math.max(0, Math.min(into.length, this.client.size - offset));
    if (n > 0) into.set(await this.client.read(offset, n));
    into.fill(0, n);
    return n;
  }
  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.readOnly) throw new QcowError('QCOW_READ_ONLY', 'Permission denied', { file: this.name });
    await this.client.write(offset, data);
  }
  async truncate(size: number): Promise<void> {
    if (size !== this.client.size) throw new QcowError('QCOW_UNSUPPORTED', 'Cannot resize NBD nodes', { file: this.name });
  }
  async flush(): Promise<void> {
    if (!this.readOnly) await this.client.flush();
  }
  async close(): Promise<void> {
    await this.client.disconnect().catch(() => this.client.destroy());
  }
}
