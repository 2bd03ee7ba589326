/**
 * A small NBD client: fixed newstyle handshake with NBD_OPT_GO, optional structured replies and
 * base:allocation, and the transmission commands with any number of requests in flight. It tests
 * and benchmarks the server from the inside (and sends it things real clients never do), so it
 * exposes the raw option and request exchanges; compat/qemu-io reads NBD exports through it.
 */
import { connect, type Socket } from 'node:net';
import {
  BASE_ALLOCATION,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAGIC,
  NBD_OPTS_MAGIC,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REP_ACK,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REP_META_CONTEXT,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  isReplyError,
} from './constants.js';
import { NbdProtocolError } from './errors.js';
import { encodeInfoRequest, encodeMetaContextRequest } from './messages.js';
import type { ListenAddress } from './server.js';
import { ByteQueue, Reader, Writer, decodeUtf8 } from './wire.js';

/** Bytes from a socket, awaited by length. */
class SocketReader {
  private readonly queue = new ByteQueue();
  private wanted: { n: number; resolve: (b: Uint8Array) => void; reject: (e: Error) => void } | undefined;
  private ended: Error | undefined;

  constructor(socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.queue.push(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength));
      this.serve();
    });
    socket.on('close', () => {
      this.ended = new Error('connection closed by the server');
      this.wanted?.reject(this.ended);
      this.wanted = undefined;
    });
    socket.on('error', () => undefined);
  }

  read(n: number): Promise<Uint8Array> {
    return new Promise((resolve, reject) => {
      this.wanted = { n, resolve, reject };
      this.serve();
    });
  }

  private serve(): void {
    const w = this.wanted;
    if (!w) return;
    if (this.queue.length >= w.n) {
      this.wanted = undefined;
      w.resolve(this.queue.take(w.n));
    } else if (this.ended) {
      this.wanted = undefined;
      w.reject(this.ended);
    }
  }
}

/** @internal One reply to an option of the handshake (tests drive options by hand). */
export interface OptionReply {
  option: number;
  type: number;
  data: Uint8Array;
}

/** How {@link NbdClient.connect} negotiates. */
export interface ConnectOptions {
  /** The export to open (NBD_OPT_GO); default the server's default export, "". */
  exportName?: string;
  /** Ask for structured replies (reads may then come back as data and hole chunks). */
  structuredReplies?: boolean;
  /** Ask for the base:allocation context, which {@link NbdClient.blockStatus} reports (implies structured replies). */
  baseAllocation?: boolean;
  /**
   * Ask for this metadata context instead of base:allocation (QEMU's client option x-dirty-bitmap:
   * `qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`); {@link NbdClient.blockStatus} then reports it.
   */
  metaContext?: string;
  /** @internal Stop after the greeting and flags: the caller drives the options itself. */
  handshakeOnly?: boolean;
}

/** @internal A finished request: its error (0 = success) and what came back. */
export interface Reply {
  error: number;
  /** Reads: the bytes, holes filled with zeros. */
  data?: Uint8Array;
  /** Block status: the descriptors of the (first) context. */
  extents?: { length: number; flags: number }[];
  /** Structured replies: the chunk types in arrival order. */
  chunkTypes: number[];
  /** An error chunk's message. */
  message?: string;
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  reply: Reply;
  resolve: (r: Reply) => void;
  reject: (e: Error) => void;
}

/**
 * A client of one NBD export over TCP or a Unix socket (fixed newstyle handshake, NBD_OPT_GO), with
 * any number of requests in flight. Requests that the server fails reject with an Error whose
 * `errno` is the NBD error; a broken connection rejects every request still waiting.
 *
 * @example
 * ```ts
 * const nbd = await NbdClient.connect({ path: '/run/disk.sock' });
 * const first = await nbd.read(0, 65536);
 * await nbd.disconnect();
 * ```
 */
export class NbdClient {
  /** The export's size in bytes, from NBD_INFO_EXPORT. */
  size = 0;
  /** The export's transmission flags (NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, ...). */
  transmissionFlags = 0;
  /** The export's description, when the server gave one. */
  description: string | undefined;
  /** The export's name as the server reported it, when it did. */
  name: string | undefined;
  /** The server's block size constraints in bytes, when it gave them. */
  blockSizes:
    | {
        /** Smallest request alignment the server accepts. */
        minimum: number;
        /** Alignment and size the server prefers. */
        preferred: number;
        /** Largest read or write payload the server accepts. */
        maximum: number;
      }
    | undefined;
  /** Whether the server agreed to structured replies. */
  structuredReplies = false;
  private contextId: number | undefined;
  /** Whether the server agreed to the metadata context asked for: {@link NbdClient.blockStatus} works. */
  get hasMetaContext(): boolean {
    return this.contextId !== undefined;
  }
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private replyLoop: Promise<void> | undefined;
  /** Why the connection can no longer carry requests. */
  private broken: Error | undefined;

  private constructor(
    /** The connection; {@link NbdClient.destroy} closes it at once. */
    readonly socket: Socket,
    private readonly reader: SocketReader,
  ) {}

  /** Connect, negotiate as `options` say and enter transmission on the export. */
  static async connect(address: ListenAddress, options: ConnectOptions = {}): Promise<NbdClient> {
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = 'path' in address ? connect(address.path) : connect(address.port, address.host ?? '127.0.0.1');
      s.once('connect', () => resolve(s));
      s.once('error', reject);
    });
    const client = new NbdClient(socket, new SocketReader(socket));
    const hello = new Reader(await client.reader.read(18));
    if (hello.u64() !== NBD_MAGIC || hello.u64() !== NBD_OPTS_MAGIC) throw new NbdProtocolError('NBD_BAD_REPLY', 'not an NBD newstyle server');
    hello.u16();
    socket.write(new Writer(4).u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).bytes);
    if (options.handshakeOnly) return client;
    const name = options.exportName ?? '';
    if (options.structuredReplies || options.baseAllocation || options.metaContext !== undefined) {
      const r = await client.option(NBD_OPT_STRUCTURED_REPLY);
      client.structuredReplies = r.at(-1)!.type === NBD_REP_ACK;
    }
    if ((options.baseAllocation || options.metaContext !== undefined) && client.structuredReplies) {
      const query = options.metaContext ?? BASE_ALLOCATION;
      for (const r of await client.option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest({ name, queries: [query] }))) {
        if (r.type === NBD_REP_META_CONTEXT) client.contextId = new Reader(r.data).u32();
      }
    }
    await client.go(name);
    return client;
  }

  /** @internal Send one option and collect its replies, up to the final one (ACK or an error). */
  async option(option: number, data: Uint8Array = new Uint8Array(0)): Promise<OptionReply[]> {
    this.socket.write(new Writer(16 + data.length).u64(NBD_OPTS_MAGIC).u32(option).u32(data.length).raw(data).bytes);
    const replies: OptionReply[] = [];
    for (;;) {
      const h = new Reader(await this.reader.read(20));
      if (h.u64() !== NBD_REP_MAGIC) throw new NbdProtocolError('NBD_BAD_REPLY', 'bad option reply magic');
      const reply: OptionReply = { option: h.u32(), type: h.u32(), data: new Uint8Array(0) };
      const length = h.u32();
      if (length) reply.data = await this.reader.read(length);
      replies.push(reply);
      if (reply.type === NBD_REP_ACK || isReplyError(reply.type)) return replies;
    }
  }

  /** @internal NBD_OPT_GO; on success the connection is in transmission. */
  async go(name: string): Promise<void> {
    const replies = await this.option(NBD_OPT_GO, encodeInfoRequest({ name, infos: [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE] }));
    const last = replies.at(-1)!;
    if (last.type !== NBD_REP_ACK) throw new Error(`NBD_OPT_GO failed (reply 0x${last.type.toString(16)}): ${decodeUtf8(last.data) ?? ''}`);
    for (const r of replies) {
      if (r.type !== NBD_REP_INFO) continue;
      const info = new Reader(r.data);
      const type = info.u16();
      if (type === NBD_INFO_EXPORT) {
        this.size = Number(info.u64());
        this.transmissionFlags = info.u16();
      } else if (type === NBD_INFO_NAME) this.name = decodeUtf8(info.raw(info.left));
      else if (type === NBD_INFO_DESCRIPTION) this.description = decodeUtf8(info.raw(info.left));
      else if (type === NBD_INFO_BLOCK_SIZE) this.blockSizes = { minimum: info.u32(), preferred: info.u32(), maximum: info.u32() };
    }
  }

  /** @internal Send one request; resolves with its reply (never rejects on an NBD error, only on a broken connection). */
  request(type: number, flags: number, offset: number, length: number, payload?: Uint8Array): Promise<Reply> {
    if (this.broken) return Promise.reject(this.broken);
    const cookie = this.nextCookie++;
    const header = new Writer(28).u32(NBD_REQUEST_MAGIC).u16(flags).u16(type).u64(cookie).u64(offset).u32(length).bytes;
    this.socket.write(header);
    if (payload) this.socket.write(payload);
    if (type === NBD_CMD_DISC) return Promise.resolve({ error: 0, chunkTypes: [] });
    this.replyLoop ??= this.readReplies();
    return new Promise((resolve, reject) => {
      const reply: Reply = { error: 0, chunkTypes: [] };
      if (type === NBD_CMD_READ) reply.data = new Uint8Array(length);
      this.pending.set(cookie, { type, offset, length, reply, resolve, reject });
    });
  }

  /** Read `length` bytes at `offset` (holes of structured replies come back as zeros). */
  async read(offset: number, length: number, flags = 0): Promise<Uint8Array> {
    return this.check(await this.request(NBD_CMD_READ, flags, offset, length)).data!;
  }
  /** Write `data` at `offset`; `flags` may ask for NBD_CMD_FLAG_FUA. */
  async write(offset: number, data: Uint8Array, flags = 0): Promise<void> {
    this.check(await this.request(NBD_CMD_WRITE, flags, offset, data.length, data));
  }
  /** NBD_CMD_FLUSH: what was written before is on stable storage when this resolves. */
  async flush(): Promise<void> {
    this.check(await this.request(NBD_CMD_FLUSH, 0, 0, 0));
  }
  /** NBD_CMD_TRIM: the server may discard the range. */
  async trim(offset: number, length: number): Promise<void> {
    this.check(await this.request(NBD_CMD_TRIM, 0, offset, length));
  }
  /** NBD_CMD_WRITE_ZEROES; `flags` may carry NBD_CMD_FLAG_NO_HOLE (allocate, do not punch) or NBD_CMD_FLAG_FAST_ZERO. */
  async writeZeroes(offset: number, length: number, flags = 0): Promise<void> {
    this.check(await this.request(NBD_CMD_WRITE_ZEROES, flags, offset, length));
  }
  /** NBD_CMD_CACHE: a hint that the range will be read soon. */
  async cache(offset: number, length: number): Promise<void> {
    this.check(await this.request(NBD_CMD_CACHE, 0, offset, length));
  }
  /**
   * NBD_CMD_BLOCK_STATUS of the base:allocation context (connect with `baseAllocation`): extents
   * in order from `offset`, each with NBD_STATE_HOLE and NBD_STATE_ZERO flags.
   */
  async blockStatus(
    offset: number,
    length: number,
    flags = 0,
  ): Promise<
    {
      /** Bytes this extent covers. */
      length: number;
      /** NBD_STATE_* bits of the extent. */
      flags: number;
    }[]
  > {
    return this.check(await this.request(NBD_CMD_BLOCK_STATUS, flags, offset, length)).extents!;
  }

  /** NBD_CMD_DISC, then wait for the server to close. */
  async disconnect(): Promise<void> {
    await this.request(NBD_CMD_DISC, 0, 0, 0);
    await new Promise<void>((resolve) => (this.socket.destroyed ? resolve() : this.socket.once('close', () => resolve())));
  }

  private check(r: Reply): Reply {
    if (r.error) throw Object.assign(new Error(`NBD error ${r.error}${r.message ? `: ${r.message}` : ''}`), { errno: r.error });
    return r;
  }

  private async readReplies(): Promise<void> {
    try {
      for (;;) {
        const magic = new Reader(await this.reader.read(4)).u32();
        if (magic === NBD_SIMPLE_REPLY_MAGIC) await this.simpleReply();
        else if (magic === NBD_STRUCTURED_REPLY_MAGIC) await this.structuredChunk();
        else throw new NbdProtocolError('NBD_BAD_REPLY', `bad reply magic 0x${magic.toString(16)}`);
      }
    } catch (e) {
      this.broken = e as Error;
      for (const p of this.pending.values()) p.reject(e as Error);
      this.pending.clear();
    }
  }

  private take(cookie: bigint): Pending {
    const p = this.pending.get(cookie);
    if (!p) throw new NbdProtocolError('NBD_BAD_REPLY', `reply for unknown cookie ${cookie}`);
    return p;
  }

  private async simpleReply(): Promise<void> {
    const h = new Reader(await this.reader.read(12));
    const error = h.u32();
    const cookie = h.u64();
    const p = this.take(cookie);
    p.reply.error = error;
    if (p.type === NBD_CMD_READ && error === 0 && p.length) p.reply.data = await this.reader.read(p.length);
    this.pending.delete(cookie);
    p.resolve(p.reply);
  }

  private async structuredChunk(): Promise<void> {
    const h = new Reader(await this.reader.read(16));
    const flags = h.u16();
    const type = h.u16();
    const cookie = h.u64();
    const length = h.u32();
    const payload = new Reader(length ? await this.reader.read(length) : new Uint8Array(0));
    const p = this.take(cookie);
    p.reply.chunkTypes.push(type);
    if (type === NBD_REPLY_TYPE_OFFSET_DATA) {
      const off = Number(payload.u64()) - p.offset;
      p.reply.data!.set(payload.raw(payload.left), off);
    } else if (type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      const off = Number(payload.u64()) - p.offset;
      p.reply.data!.fill(0, off, off + payload.u32());
    } else if (type === NBD_REPLY_TYPE_BLOCK_STATUS) {
      const id = payload.u32();
      if (p.reply.extents === undefined || id === this.contextId) {
        p.reply.extents = [];
        while (payload.left >= 8) p.reply.extents.push({ length: payload.u32(), flags: payload.u32() });
      }
    } else if (type & 0x8000) {
      p.reply.error = payload.u32();
      p.reply.message = decodeUtf8(payload.raw(payload.u16()));
    }
    if (flags & NBD_REPLY_FLAG_DONE) {
      this.pending.delete(cookie);
      p.resolve(p.reply);
    }
  }

  /** Close the connection at once, without NBD_CMD_DISC (requests in flight reject). */
  destroy(): void {
    this.socket.destroy();
  }
}
