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
 */
import type { Duplex } from 'node:stream';
import { NBD_CMD_DISC, NBD_ESHUTDOWN, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES } from './constants.js';
import { executeRequest, type CommandContext } from './commands.js';
import { NbdProtocolError } from './errors.js';
import type { NbdExport } from './export.js';
import type { ClientMessage, Request } from './messages.js';
import { BASE_ALLOCATION_ID, DIRTY_BITMAP_ID, baseAllocationSelected, dirtyBitmapSelected, handleOption, newNegotiationState, type NegotiationState } from './negotiation.js';
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
}

type State = 'greeting' | 'options' | 'transmission' | 'draining' | 'closed';

const DEFAULT_MAX_IN_FLIGHT = 16;
/** Stop taking requests while this many reply bytes wait in the socket for a slow reader. */
const MAX_QUEUED_REPLY_BYTES = 64 * 1024 * 1024;

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

  constructor(
    private readonly socket: Duplex,
    private readonly options: ConnectionOptions,
  ) {
    this.parser = new ClientParser(options.limits);
    this.maxInFlight = Math.max(1, options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT);
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
  }

  /** Send the greeting and start reading. */
  start(): void {
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
        const msg = this.parser.next();
        if (!msg) break;
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
      baseAllocationId: baseAllocationSelected(this.negotiation, exp) ? BASE_ALLOCATION_ID : undefined,
      dirtyBitmapId: dirtyBitmapSelected(this.negotiation, exp) ? DIRTY_BITMAP_ID : undefined,
      order: this.order,
    };
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
    this.inFlight++;
    void executeRequest(ctx, req)
      .then(async (reply) => {
        this.send(reply);
        await this.drained();
      })
      .catch((e) => this.options.onError?.(e))
      .finally(() => {
        this.inFlight--;
        this.pump();
      });
  }

  /**
   * Write a reply's buffers back to back (one reply's chunks are never split by another's), corked
   * so several chunks leave in one writev. Reply buffers go back to their pool once written.
   */
  private send(parts: Uint8Array[]): void {
    if (this.socketClosed || this.socket.destroyed || this.socket.writableEnded) {
      for (const p of parts) replyBuffers.give(p);
      return;
    }
    const corked = parts.length > 1;
    if (corked) this.socket.cork();
    for (const p of parts) {
      if (replyBuffers.owns(p)) this.socket.write(p, () => replyBuffers.give(p));
      else this.socket.write(p);
    }
    if (corked) this.socket.uncork();
  }

  /** Wait while too many reply bytes are queued for a client that is not reading them. */
  private async drained(): Promise<void> {
    const s = this.socket as Duplex & { writableLength: number };
    if (this.socketClosed || s.writableLength < MAX_QUEUED_REPLY_BYTES) return;
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
    this.state = 'draining';
    this.socket.end();
    // Keep reading (and ignoring) so the peer's end of the stream is seen and the socket closes.
    this.socket.resume();
    // A peer that never closes its side must not keep us waiting forever.
    setTimeout(() => this.socket.destroy(), 5000).unref();
  }
}
