/**
 * One client connection: greeting, option haggling, then requests until the client disconnects.
 *
 *   greeting ──flags──▶ options ──GO / EXPORT_NAME──▶ transmission ──DISC / EOF──▶ draining ──▶ closed
 *                          └── ABORT, bad input ─────────────────────────────────────────────────┘
 *
 * Requests run concurrently up to `maxInFlight`; past that the socket is paused, so a client that
 * floods us is held back by TCP rather than by our memory. A client that vanishes mid-request
 * leaves its requests running to completion (their replies go nowhere): the device only ever sees
 * whole requests, so the image stays consistent. `closed` resolves only after that, which lets the
 * server flush and close the device knowing nothing is still writing to it.
 *
 * Read replies of read-only exports whose data sits as plain bytes in the page cache are sent
 * with sendfile (see flush): the header, then the file's pages moved by the kernel, without the
 * two copies through a reply buffer. Such bytes bypass Node's write queue, so they go only while
 * that queue is empty; replies that come meanwhile wait in an outbox, in order.
 */
import type { Duplex } from 'node:stream';
import { NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_ESHUTDOWN, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES } from './constants.js';
import { executeRequest, readNow, type CommandContext } from './commands.js';
import { NbdProtocolError } from './errors.js';
import { isReadOnly, type NbdExport } from './export.js';
import type { ByteStore } from '../storage/types.js';
import type { ClientMessage, Request } from './messages.js';
import { handleOption, newNegotiationState, selectedContexts, type NegotiationState } from './negotiation.js';
import { RequestOrder } from './order.js';
import { ClientParser, type ParserLimits } from './parser.js';
import * as out from './serializer.js';
import { replyBuffers } from './reply-buffers.js';

export interface ConnectionOptions {
  exp: NbdExport;
  /** Requests of this client processed at once. */
  maxInFlight?: number;
  limits?: ParserLimits;
  /** Told about connections that end in a protocol violation or an internal error. */
  onError?: (e: unknown) => void;
  /** Buffers for write payloads (ClientParser); need not be zeroed. Default: new Uint8Array. */
  allocPayload?: (size: number) => Uint8Array;
  /**
   * One read from the socket's descriptor that never waits (HostAddon.readNoWait): bytes read, 0
   * at the end, -1 when none are there, -2 when the descriptor does not allow it. With it, the rest
   * of a write payload is read straight into the payload's buffer (see readDirect).
   */
  readSocket?: (fd: number, into: Uint8Array) => number;
  /**
   * Ask for a socket send buffer of at least `bytes` (HostAddon.growSendBuffer). Connections that
   * send file replies ask for SEND_BUFFER (see there).
   */
  growSendBuffer?: (fd: number, bytes: number) => number;
}

type State = 'greeting' | 'options' | 'transmission' | 'draining' | 'closed';

const DEFAULT_MAX_IN_FLIGHT = 16;
/** Stop taking requests while this many reply bytes wait in the socket for a slow reader. */
const MAX_QUEUED_REPLY_BYTES = 64 * 1024 * 1024;
/**
 * Bytes of a file reply copied through Node's stream when the socket is full (see flush): small,
 * as this part is copied; enough that the kernel has room for a large sendfile when it is sent.
 */
const PIECE_SIZE = 16 * 1024;

/**
 * Send buffer asked for on connections that answer reads with sendfile. A read reply larger than
 * the socket's buffer (208 KiB by default; clients read 256 KiB and more at a time) never goes in
 * one sendfile: the rest waits for the socket to take more, through a copied piece (see flush),
 * which was about one piece, two sendfile calls and four writes per 256 KiB read. The kernel
 * grants at most net.core.wmem_max; where that is the default, nothing changes.
 */
const SEND_BUFFER = 2 * 1024 * 1024;

/** A read reply queued for sendfile: `head`, then `length` bytes of `store` from `hostOffset`. */
interface FileReply {
  head: Uint8Array;
  store: ByteStore;
  hostOffset: number;
  length: number;
  /** Bytes of head and data sent so far. */
  done: number;
}

export class NbdConnection {
  private state: State = 'greeting';
  private readonly parser: ClientParser;
  private negotiation: NegotiationState = newNegotiationState(false);
  private ctx: CommandContext | undefined;
  private readonly order = new RequestOrder();
  private inFlight = 0;
  private shuttingDown = false;
  private socketClosed = false;
  private readonly maxInFlight: number;
  /** Resolves when the socket is gone and every request it started has finished. */
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;
  /** The socket's descriptor, for replies the kernel sends from a file (see sendFile). */
  private socketFd: number | undefined;
  /** Replies waiting for the socket behind a file reply (see flush). */
  private readonly outbox: (Uint8Array | FileReply)[] = [];
  /** pump() stopped taking requests because the outbox was full. */
  private outboxFull = false;
  /** end() waits for the outbox to empty. */
  private endWhenFlushed = false;
  /** Headers read directly too (readDirect): set by a payload read so, cleared by any other request. */
  private directHeaders = false;
  /** readDirect's reads of the descriptor (cleared when it cannot). */
  private readSocket: ((fd: number, into: Uint8Array) => number) | undefined;

  constructor(
    private readonly socket: Duplex,
    private readonly options: ConnectionOptions,
  ) {
    this.parser = new ClientParser(options.limits, options.allocPayload);
    this.maxInFlight = Math.max(1, options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT);
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
  }

  /** Send the greeting and start reading. */
  start(): void {
    // A net.Socket over TCP or a Unix socket owns its descriptor; anything else (a TLS socket,
    // whose descriptor carries records, or a plain stream) is only ever written through Node.
    const handle = (this.socket as { _handle?: { fd?: unknown } })._handle;
    if (typeof handle?.fd === 'number' && handle.fd >= 0 && !(this.socket as { encrypted?: boolean }).encrypted) this.socketFd = handle.fd;
    if (this.socketFd !== undefined) this.readSocket = this.options.readSocket;
    this.socket.on('data', (chunk: Buffer) => {
      this.parser.push(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength));
      this.pump();
    });
    this.socket.on('error', () => this.socket.destroy());
    this.socket.on('end', () => this.socket.end());
    this.socket.on('close', () => {
      this.socketClosed = true;
      this.state = 'closed';
      void this.order.idle().then(() => this.resolveClosed());
    });
    this.send([out.greeting()]);
  }

  /**
   * More of the stream read from the descriptor directly, as much as is there now (true when some
   * came): the rest of a write payload straight into the payload's buffer, and while writes come
   * one after another, the next request's header, so that a payload's first bytes are not read
   * with it into Node's 64 KiB buffers either (qemu-nbd's pattern: header, then payload). Node's
   * stream would read them into buffers of its own that the parser then copies from. Only with
   * nothing left in the stream's buffer: the next bytes on the descriptor are then the next bytes
   * of the stream (Node reads it only from the event loop, never while this runs). Whatever stops
   * it (no bytes yet, the end, an error) is left for Node's own next read to see.
   */
  private readDirect(): boolean {
    if (this.state !== 'transmission' || (this.socket as Duplex & { readableLength: number }).readableLength !== 0) return false;
    let into = this.parser.payloadRoom;
    const header = !into;
    if (!into) {
      const need = this.directHeaders ? this.parser.headerNeed : 0;
      if (need === 0) return false;
      into = new Uint8Array(need);
    }
    let n: number;
    try {
      n = this.readSocket!(this.socketFd!, into);
    } catch {
      return false;
    }
    if (n === -2) this.readSocket = undefined;
    if (n <= 0) return false;
    if (header) this.parser.push(into.subarray(0, n));
    else {
      this.parser.payloadFilled(n);
      this.directHeaders = true;
    }
    return true;
  }

  /**
   * The server is stopping: negotiating clients are dropped; in transmission, requests already
   * running finish and are answered, anything else gets ESHUTDOWN, then the connection ends.
   */
  shutdown(): Promise<void> {
    this.shuttingDown = true;
    if (this.state === 'transmission') {
      this.state = 'draining';
      this.socket.pause();
      this.pump();
      void this.order.idle().then(() => this.end());
    } else if (this.state !== 'draining') {
      this.socket.destroy();
    }
    return this.closed;
  }

  /** Parse and handle whatever whole messages have arrived, as far as the in-flight bound allows. */
  private pump(): void {
    try {
      while (!this.socketClosed) {
        if (this.state === 'transmission' && this.inFlight >= this.maxInFlight) {
          this.socket.pause();
          return;
        }
        // Replies queued count as requests still running: a client that does not read them
        // holds back its own requests.
        if (this.state === 'transmission' && this.inFlight + this.outbox.length >= this.maxInFlight) {
          this.outboxFull = true;
          this.socket.pause();
          return;
        }
        const msg = this.parser.next();
        if (!msg) {
          if (this.readSocket && this.readDirect()) continue;
          break;
        }
        if (msg.kind === 'request' && msg.type !== NBD_CMD_WRITE) this.directHeaders = false;
        this.handle(msg);
      }
      if (this.state === 'transmission' && !this.shuttingDown) this.socket.resume();
    } catch (e) {
      if (!(e instanceof NbdProtocolError)) this.options.onError?.(e);
      this.socket.destroy();
    }
  }

  private handle(msg: ClientMessage): void {
    switch (this.state) {
      case 'greeting': {
        if (msg.kind !== 'flags') return;
        // Clients must not set flags we did not offer; the spec says to drop them.
        if (msg.flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) throw new NbdProtocolError('NBD_BAD_FLAGS', `unknown client flags 0x${msg.flags.toString(16)}`);
        this.negotiation = newNegotiationState((msg.flags & NBD_FLAG_C_NO_ZEROES) !== 0);
        this.state = 'options';
        this.parser.phase = 'option';
        return;
      }
      case 'options': {
        if (msg.kind !== 'option') return;
        const outcome = handleOption(this.negotiation, msg, this.options.exp, this.shuttingDown);
        this.send(outcome.replies);
        if (outcome.next === 'close') return this.end();
        if (outcome.next === 'transmission') this.enterTransmission();
        return;
      }
      case 'transmission':
      case 'draining':
        if (msg.kind === 'request') this.request(msg);
        return;
      default:
        return;
    }
  }

  private enterTransmission(): void {
    const exp = this.options.exp;
    this.ctx = {
      exp,
      structuredReplies: this.negotiation.structuredReplies,
      contexts: selectedContexts(this.negotiation, exp),
      order: this.order,
      sendFile: this.socketFd !== undefined && isReadOnly(exp) ? (head, store, hostOffset, length) => this.sendFile(head, store, hostOffset, length) : undefined,
    };
    if (this.socketFd !== undefined) this.options.growSendBuffer?.(this.socketFd, SEND_BUFFER);
    this.state = 'transmission';
    this.parser.phase = 'request';
  }

  private request(req: Request): void {
    const ctx = this.ctx!;
    if (req.type === NBD_CMD_DISC) {
      // No reply; finish what is running, then close. Nothing may follow DISC.
      this.state = 'draining';
      this.socket.pause();
      void this.order.idle().then(() => this.end());
      return;
    }
    if (this.state === 'draining') {
      if (this.shuttingDown) this.send(ctx.structuredReplies ? [out.errorChunk(req.cookie, NBD_ESHUTDOWN, 'server is shutting down')] : [out.simpleReply(req.cookie, NBD_ESHUTDOWN)]);
      return;
    }
    // Reads of plain data from the page cache: answered at once (see readNow). Not while a slow
    // reader leaves too much queued: the usual way holds the request in flight until it drains.
    if (req.type === NBD_CMD_READ && !this.mustDrain()) {
      const reply = readNow(ctx, req);
      if (reply) {
        if (reply.length) this.send(reply);
        return;
      }
    }
    this.inFlight++;
    // Two callbacks rather than a chain of then/catch/finally: each link is a promise per request.
    void executeRequest(ctx, req).then(
      (reply) => this.replied(reply),
      (e) => this.finished(e),
    );
  }

  /** A request's reply is ready: send it, wait while a slow reader leaves too much queued, then finish. */
  private replied(reply: Uint8Array[]): void {
    try {
      this.send(reply);
    } catch (e) {
      return this.finished(e);
    }
    if (this.mustDrain()) void this.drained().then(() => this.finished());
    else this.finished();
  }

  /** One request fewer in flight; take more. */
  private finished(e?: unknown): void {
    if (e !== undefined) this.options.onError?.(e);
    this.inFlight--;
    this.pump();
  }

  /**
   * Write a reply's buffers back to back (one reply's chunks are never split by another's), corked
   * so several chunks leave in one writev. Reply buffers go back to their pool once written.
   * Behind replies still waiting in the outbox, they wait their turn there.
   */
  private send(parts: Uint8Array[]): void {
    if (this.socketClosed || this.socket.destroyed || this.socket.writableEnded) {
      for (const p of parts) replyBuffers.give(p);
      return;
    }
    if (this.outbox.length) {
      for (const p of parts) this.outbox.push(p);
      return;
    }
    const corked = parts.length > 1;
    if (corked) this.socket.cork();
    for (const p of parts) this.write(p);
    if (corked) this.socket.uncork();
  }

  /** One buffer into the socket's queue; once written, it goes back to its pool and the outbox moves on. */
  private write(p: Uint8Array): void {
    this.socket.write(p, () => {
      replyBuffers.give(p);
      if (this.outbox.length) this.flush();
    });
  }

  /**
   * A read reply whose data the kernel sends from the image file (CommandContext.sendFile): queued
   * in the outbox when the page cache holds the range, else refused (the command reads it).
   */
  private sendFile(head: Uint8Array, store: ByteStore, hostOffset: number, length: number): boolean {
    const s = this.socket as Duplex & { writableLength: number };
    if (this.socketClosed || s.destroyed || s.writableEnded) return false;
    const reply: FileReply = { head, store, hostOffset, length, done: 0 };
    if (!this.outbox.length && s.writableLength === 0) {
      // The common case, nothing waiting: send now (sendCached checks the page cache itself).
      try {
        const sent = store.sendCached!(this.socketFd!, head, hostOffset, length);
        if (sent < 0) return false;
        reply.done = sent;
      } catch (e) {
        this.lost(e);
        return true;
      }
      if (reply.done === head.length + length) return true;
    } else if (!store.isCached!(hostOffset, length)) return false;
    this.outbox.push(reply);
    this.flush();
    return true;
  }

  /** The peer went away (EPIPE), or the file failed part way through a reply already on the wire: the stream cannot go on. */
  private lost(e: unknown): void {
    this.socket.destroy();
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'EPIPE' && code !== 'ECONNRESET') this.options.onError?.(e);
  }

  /**
   * Move the outbox into the socket, in order, while the socket's own queue is empty: buffers
   * through Node's stream; file replies with the header written and the data sent by the kernel
   * straight to the descriptor (sendfile), which is only safe when nothing waits in Node's queue.
   * When the socket is full part way through a file reply, a piece of it (copied) goes through
   * Node's stream instead: Node then waits until the socket has room, and its write callback
   * brings us back here for the rest. Nothing else enters the stream before a reply is whole.
   */
  private flush(): void {
    const s = this.socket as Duplex & { writableLength: number };
    while (this.outbox.length && s.writableLength === 0) {
      if (this.socketClosed || s.destroyed || s.writableEnded) {
        for (const item of this.outbox.splice(0)) if (item instanceof Uint8Array) replyBuffers.give(item);
        break;
      }
      const item = this.outbox[0]!;
      if (item instanceof Uint8Array) {
        this.outbox.shift();
        this.write(item);
      } else if (this.sendFromFile(item)) this.outbox.shift();
    }
    if (this.endWhenFlushed && !this.outbox.length) {
      this.endWhenFlushed = false;
      this.end();
    }
    if (this.outboxFull && this.outbox.length < this.maxInFlight) {
      this.outboxFull = false;
      this.pump();
    }
  }

  /** Send what the socket takes of a file reply; true when the whole reply is sent or queued. */
  private sendFromFile(r: FileReply): boolean {
    const total = r.head.length + r.length;
    const headLeft = Math.max(0, r.head.length - r.done);
    const dataDone = r.done - (r.head.length - headLeft);
    try {
      const sent = r.store.sendCached?.(this.socketFd!, r.head.subarray(r.head.length - headLeft), r.hostOffset + dataDone, r.length - dataDone) ?? -1;
      // -1: the pages left the cache since the reply was queued (or the kernel cannot): pieces.
      if (sent > 0) r.done += sent;
      if (r.done === total) return true;
      const size = Math.min(total - r.done, PIECE_SIZE);
      const piece = replyBuffers.take(PIECE_SIZE).subarray(0, size);
      const fromHead = Math.max(0, r.head.length - r.done);
      piece.set(r.head.subarray(r.head.length - fromHead));
      const at = r.done - (r.head.length - fromHead);
      r.store.readNow!(r.hostOffset + at, piece.subarray(fromHead));
      r.done += size;
      const whole = new Uint8Array(piece.buffer);
      this.socket.write(piece, () => {
        replyBuffers.give(whole);
        if (this.outbox.length) this.flush();
      });
      return r.done === total;
    } catch (e) {
      this.lost(e);
      return true;
    }
  }

  /** Too many reply bytes wait in the socket for a client that is not reading them: wait (drained) before taking more. */
  private mustDrain(): boolean {
    return !this.socketClosed && (this.socket as Duplex & { writableLength: number }).writableLength >= MAX_QUEUED_REPLY_BYTES;
  }

  /** Resolves once the socket has drained (or closed); see mustDrain. */
  private async drained(): Promise<void> {
    const s = this.socket;
    await new Promise<void>((resolve) => {
      const done = () => {
        s.off('drain', done);
        s.off('close', done);
        resolve();
      };
      s.on('drain', done);
      s.on('close', done);
    });
  }

  private end(): void {
    if (this.socketClosed) return;
    // Replies still in the outbox go first; flush() comes back here once it is empty.
    if (this.outbox.length) {
      this.endWhenFlushed = true;
      return;
    }
    this.state = 'draining';
    this.socket.end();
    // Keep reading (and ignoring) so the peer's end of the stream is seen and the socket closes.
    this.socket.resume();
    // A peer that never closes its side must not keep us waiting forever.
    setTimeout(() => this.socket.destroy(), 5000).unref();
  }
}
