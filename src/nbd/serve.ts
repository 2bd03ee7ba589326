/**
 * The NBD server as a library call (`serveNbd`, from `qcow/node`): a BlockDevice exported on TCP
 * or a Unix socket with the options `qcow serve` has (the command is a thin shell around it that
 * adds signals, the pid file and stale sockets). What the handshake offers is set here: the
 * export's name and description, read-only, qemu-nbd's contexts (-A, -B) and its connection
 * policy (-e, -t).
 */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError } from '../core/errors.js';
import { bitmapExtents } from '../ops/changed-extents.js';
import { allocationDepthContext, baseAllocationContext, dirtyBitmapContext, type MetaContext } from './contexts.js';
import { NbdServer, type ListenAddress } from './server.js';

export type { ListenAddress };

/** Where and how {@link serveNbd} serves a device: `qcow serve`'s flags, by name. */
export interface ServeNbdOptions {
  /**
   * Where to listen: a TCP port and address, or a Unix socket path (the file must not exist).
   * Default TCP 127.0.0.1:10809, loopback only, as `qcow serve` (-p, -b, -k). Port 0 takes any
   * free port (see {@link NbdServerHandle.port}).
   */
  address?: ListenAddress;
  /** The export's name; '' (the default export) when absent (-x). */
  exportName?: string;
  /** A description clients may show (nbdinfo's "description") (-D). */
  description?: string;
  /** Refuse writes; implied when the device is read-only (-r). */
  readOnly?: boolean;
  /** Clients served at once; more wait for a slot. Default 1; above 1, multi-connection is offered (-e). */
  maxClients?: number;
  /** Keep serving after the last client leaves; otherwise the server stops then (-t). */
  persistent?: boolean;
  /** Offer the qemu:allocation-depth context (-A). */
  allocationDepth?: boolean;
  /** Offer persistent dirty bitmap NAME as qemu:dirty-bitmap:NAME (-B); it must exist and be usable now. */
  bitmap?: string;
  /** Errors that dropped one connection (the server goes on serving the others). */
  onError?: (e: unknown) => void;
}

/** A listening server, as {@link serveNbd} returns it. */
export interface NbdServerHandle {
  /** The bound TCP port (the one chosen when `port` was 0), or undefined on a Unix socket. */
  readonly port: number | undefined;
  /** Clients connected now. */
  readonly clients: number;
  /** Resolves once the server has stopped: after {@link close}, or after the last client of a non-persistent server. */
  readonly stopped: Promise<void>;
  /** Stop accepting, let running requests finish, then end every connection. */
  close(): Promise<void>;
}

/**
 * Serve `device` over NBD (fixed newstyle handshake, structured replies, block status), as
 * `qcow serve` and qemu-nbd do, and resolve once the server listens. The device stays the
 * caller's: close it after the server has stopped (then every request has finished, so its
 * final flush covers every write). Listening fails with QCOW_IO; a bitmap that is missing or
 * unusable, or a device without bitmaps, fails before anything listens.
 *
 * @example
 * ```ts
 * import { openImage, serveNbd } from 'qcow/node';
 *
 * const disk = await openImage('disk.qcow2', { readOnly: true });
 * const server = await serveNbd(disk, { address: { path: '/tmp/disk.sock' }, readOnly: true, persistent: true });
 * // nbdinfo 'nbd+unix:///?socket=/tmp/disk.sock' ...
 * process.once('SIGINT', () => void server.close());
 * await server.stopped;
 * await disk.close();
 * ```
 */
export async function serveNbd(device: BlockDevice, options: ServeNbdOptions = {}): Promise<NbdServerHandle> {
  const address = options.address ?? { port: 10809, host: '127.0.0.1' };
  const maxClients = options.maxClients ?? 1;
  if (!Number.isInteger(maxClients) || maxClients < 1) throw new QcowError('QCOW_INVALID_ARGUMENT', `maxClients must be a positive integer, not ${maxClients}`);
  const contexts: MetaContext[] = [baseAllocationContext];
  if (options.allocationDepth) contexts.push(allocationDepthContext);
  if (options.bitmap !== undefined) {
    const name = options.bitmap;
    // As qemu-nbd -B, the bitmap must be there and usable before anything is served.
    await bitmapExtents(device, name, { offset: 0, length: 0 });
    contexts.push(dirtyBitmapContext({ name, extents: (offset, length) => bitmapExtents(device, name, { offset, length }) }));
  }
  const server = new NbdServer({
    exp: { name: options.exportName ?? '', description: options.description ?? '', device, readOnly: !!options.readOnly, contexts },
    maxClients,
    persistent: !!options.persistent,
    onError: options.onError,
  });
  await server.listen(address).catch((e: NodeJS.ErrnoException) => {
    const where = 'path' in address ? address.path : `${address.host ?? '127.0.0.1'}:${address.port}`;
    throw new QcowError('QCOW_IO', `cannot listen on ${where}: ${e.code ?? e.message}`, { cause: e });
  });
  return server;
}
