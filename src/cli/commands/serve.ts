/**
 * `qcow serve`: export an image over NBD, as qemu-nbd does, through the library's `serveNbd`
 * (nbd/serve.ts); this command adds the flags, signals, the pid file and stale sockets. Quiet on
 * success; errors are one line. --pid-file is written once the socket is listening, so scripts know when to connect.
 * SIGINT/SIGTERM stop accepting, finish running requests, flush and close the image, exit 0.
 */
import { lstatSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { QcowError, serveNbd, type ListenAddress, type NbdServerHandle, type StoreOpener } from '../../node.js';
import { openForCli } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  port?: string;
  bind?: string;
  socket?: string;
  readOnly?: boolean;
  /** Reads copy what the backing chain supplies into the image (a remote base fetched once). */
  copyOnRead?: boolean;
  exportName?: string;
  description?: string;
  persistent?: boolean;
  shared?: string;
  pidFile?: string;
  allocationDepth?: boolean;
  bitmap?: string;
}

export async function run(file: string, flags: Flags): Promise<number> {
  const address = listenAddress(flags);
  const maxClients = flags.shared === undefined ? 1 : positiveInt(flags.shared, '-e/--shared');
  // fixedSize: the export's size does not change, so others may not resize the image (qemu-nbd's locks).
  // cachedReadsInline: clients read in pieces of 256 KiB and more, mostly from the page cache, and
  // handing each to libuv's pool cost more than the copy (see FileStore).
  const { defaultOpener } = await import('../open-images.js');
  const opener: StoreOpener = { ...defaultOpener, open: (name, o) => defaultOpener.open(name, { ...o, cachedReadsInline: true }) };
  const dev = await openForCli(file, flags, { readOnly: !!flags.readOnly, fixedSize: true, opener, copyOnRead: !!flags.copyOnRead });
  let server: NbdServerHandle | undefined;
  try {
    if ('path' in address) await removeStaleSocket(address.path);
    server = await serveNbd(dev, {
      address,
      exportName: flags.exportName,
      description: flags.description,
      readOnly: !!flags.readOnly,
      maxClients,
      persistent: !!flags.persistent,
      allocationDepth: !!flags.allocationDepth,
      bitmap: flags.bitmap,
      onError: (e) => process.stderr.write(`qcow: ${file}: connection dropped: ${e instanceof Error ? e.message : String(e)}\n`),
    });
    if (flags.pidFile) {
      // Written aside and renamed into place: a script that waits for the file to appear must
      // never read it empty (writeFile creates it before the pid is in it).
      const aside = `${flags.pidFile}.${process.pid}.tmp`;
      writeFileSync(aside, `${process.pid}\n`);
      renameSync(aside, flags.pidFile);
    }

    const stop = () => void server!.close();
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    await server.stopped;
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    if (!dev.readOnly) await dev.flush();
  } finally {
    await dev.close();
    if ('path' in address && server) rmSync(address.path, { force: true });
    if (flags.pidFile && server) rmSync(flags.pidFile, { force: true });
  }
  return 0;
}

function listenAddress(flags: Flags): ListenAddress {
  if (flags.socket !== undefined) {
    if (flags.port !== undefined || flags.bind !== undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', '-k cannot be combined with -p or -b');
    return { path: flags.socket };
  }
  const port = flags.port === undefined ? 10809 : Number(flags.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new QcowError('QCOW_INVALID_ARGUMENT', `invalid port '${flags.port}'`);
  return { port, host: flags.bind ?? '127.0.0.1' };
}

function positiveInt(text: string, what: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) throw new QcowError('QCOW_INVALID_ARGUMENT', `${what} must be a positive integer, not '${text}'`);
  return n;
}

/** As qemu-nbd, reuse a socket path left by an earlier server; refuse to delete anything else. */
async function removeStaleSocket(path: string): Promise<void> {
  const st = lstatSync(path, { throwIfNoEntry: false });
  if (!st) return;
  if (!st.isSocket()) throw new QcowError('QCOW_INVALID_ARGUMENT', `${path} exists and is not a socket`);
  rmSync(path);
}
