/**
 * An NBD server for one export over TCP or a Unix socket, with qemu-nbd's connection policy:
 * at most `maxClients` at once (later clients wait, as they would in qemu-nbd's listen backlog),
 * and unless `persistent`, the server stops once its last client has gone.
 *
 * The server never closes the device: whoever opened it does, after `close()` has resolved (by
 * then every request has finished, so a final flush covers every write).
 */
import { createServer, type Server, type Socket } from 'node:net';
import { NbdConnection } from './connection.js';
import type { NbdExport } from './export.js';
import type { ParserLimits } from './parser.js';
import { hostAddon } from '../host/native.node.js';

/** Where an NBD server listens: a TCP `port` on `host` (default 127.0.0.1), or a Unix socket `path`. */
export type ListenAddress =
  | {
      /** The TCP port (0: any free port). */
      port: number;
      /** The address to bind; 127.0.0.1 (loopback only) when absent. */
      host?: string;
    }
  | {
      /** The Unix socket's file name. */
      path: string;
    };

export interface NbdServerOptions {
  exp: NbdExport;
  /** Clients served at once (qemu-nbd -e); more wait for a free slot. Default 1. */
  maxClients?: number;
  /** Keep serving after the last client disconnects (qemu-nbd -t). */
  persistent?: boolean;
  /** Requests processed at once per client. */
  maxInFlight?: number;
  limits?: ParserLimits;
  /** Internal errors of one connection (that connection is dropped; the server goes on). */
  onError?: (e: unknown) => void;
}

/** Clients waiting for a slot beyond this are turned away. */
const MAX_WAITING = 64;

export class NbdServer {
  private readonly server: Server;
  private readonly active = new Set<NbdConnection>();
  private readonly waiting: Socket[] = [];
  private servedAny = false;
  private closing: Promise<void> | undefined;
  /** Resolves once the server has stopped (after close(), or after the last client of a non-persistent server). */
  readonly stopped: Promise<void>;
  private resolveStopped!: () => void;

  constructor(private readonly options: NbdServerOptions) {
    this.server = createServer({ noDelay: true }, (socket) => this.accept(socket));
    this.stopped = new Promise((resolve) => (this.resolveStopped = resolve));
  }

  listen(address: ListenAddress): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      const ready = () => {
        this.server.off('error', reject);
        resolve();
      };
      if ('path' in address) this.server.listen(address.path, ready);
      else this.server.listen(address.port, address.host ?? '127.0.0.1', ready);
    });
  }

  /** The bound TCP port (useful with port 0), or undefined on a Unix socket. */
  get port(): number | undefined {
    const a = this.server.address();
    return a && typeof a === 'object' ? a.port : undefined;
  }

  get clients(): number {
    return this.active.size;
  }

  /** Stop accepting, let running requests finish, then end every connection. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const stopListening = new Promise<void>((resolve) => this.server.close(() => resolve()));
      for (const s of this.waiting.splice(0)) s.destroy();
      await Promise.all([...this.active].map((c) => c.shutdown()));
      await stopListening;
      this.resolveStopped();
    })();
    return this.closing;
  }

  private accept(socket: Socket): void {
    socket.on('error', () => socket.destroy());
    if (this.closing) return void socket.destroy();
    if (this.active.size < (this.options.maxClients ?? 1)) return this.serve(socket);
    if (this.waiting.length >= MAX_WAITING) return void socket.destroy();
    this.waiting.push(socket);
    socket.once('close', () => {
      const i = this.waiting.indexOf(socket);
      if (i >= 0) this.waiting.splice(i, 1);
    });
  }

  private serve(socket: Socket): void {
    const exp = { ...this.options.exp, multiConn: (this.options.maxClients ?? 1) > 1 };
    const conn = new NbdConnection(socket, {
      exp,
      maxInFlight: this.options.maxInFlight,
      limits: this.options.limits,
      onError: this.options.onError,
      // Write payloads are overwritten whole before use: no zero fill (a memset of every byte).
      allocPayload: (size) => Buffer.allocUnsafeSlow(size),
      readSocket: hostAddon()?.readNoWait,
      growSendBuffer: hostAddon()?.growSendBuffer,
    });
    this.active.add(conn);
    this.servedAny = true;
    void conn.closed.then(() => {
      this.active.delete(conn);
      const next = this.waiting.shift();
      if (next && !this.closing) return this.serve(next);
      if (this.active.size === 0 && !this.options.persistent && this.servedAny) void this.close();
    });
    conn.start();
  }
}
