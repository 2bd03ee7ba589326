/**
 * Transmission-phase commands: check a request, run it on the device (in the order RequestOrder
 * allows), and return the reply as buffers to write back to back. Every failure becomes an error
 * reply; nothing a client sends can make this throw.
 */
import { QcowError } from '../core/errors.js';
import type { ByteStore } from '../storage/types.js';
import { allocationExtents } from './allocation.js';
import type { MetaContext } from './contexts.js';
import {
  MAX_PAYLOAD,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EPERM,
  NBD_STATE_ZERO,
} from './constants.js';
import { isReadOnly, type NbdExport } from './export.js';
import type { Request } from './messages.js';
import type { RequestOrder } from './order.js';
import * as out from './serializer.js';
import { SIMPLE_REPLY_SIZE } from './constants.js';
import { replyBuffers } from './reply-buffers.js';

/** What a command needs to know about its connection. */
export interface CommandContext {
  exp: NbdExport;
  structuredReplies: boolean;
  /** The metadata contexts the client selected, with their ids (none: block status is refused). */
  contexts: readonly { id: number; context: MetaContext }[];
  order: RequestOrder;
  /**
   * Send a read reply's header, then `length` bytes of `store` from `hostOffset` moved by the
   * kernel (ByteStore.sendCached), now: true when the reply is on its way, false when it could
   * not (nothing sent). Only on read-only exports, whose file bytes cannot change under a reply
   * the kernel still holds by reference, and on sockets with a descriptor of their own.
   */
  sendFile?: (head: Uint8Array, store: ByteStore, hostOffset: number, length: number) => boolean;
}

/** Most extents in one block status reply (the spec asks for at most 2^20). */
const MAX_EXTENTS = 1 << 16;
/** CACHE reads through the range in pieces of this size. */
const CACHE_CHUNK = 1 << 20;

/** A failure to report to the client: an NBD errno and a message for people. */
class CommandError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

const allowedFlags: Record<number, number> = {
  [NBD_CMD_READ]: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
  [NBD_CMD_WRITE]: NBD_CMD_FLAG_FUA,
  [NBD_CMD_FLUSH]: NBD_CMD_FLAG_FUA,
  [NBD_CMD_TRIM]: NBD_CMD_FLAG_FUA,
  [NBD_CMD_CACHE]: NBD_CMD_FLAG_FUA,
  [NBD_CMD_WRITE_ZEROES]: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
  [NBD_CMD_BLOCK_STATUS]: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
};

const isWrite = (type: number) => type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES || type === NBD_CMD_TRIM;

/** Run one request (anything but DISC) and return its reply. */
export async function executeRequest(ctx: CommandContext, req: Request): Promise<Uint8Array[]> {
  try {
    check(ctx, req);
    // Reads, the common request, without run()'s frame.
    if (req.type === NBD_CMD_READ) return await ctx.order.run('read', req.offset, req.length, () => (ctx.structuredReplies ? structuredRead(ctx, req) : simpleRead(ctx, req)));
    return await run(ctx, req);
  } catch (e) {
    const err = e instanceof CommandError ? e : toCommandError(e, req);
    if (ctx.structuredReplies) return [out.errorChunk(req.cookie, err.errno, err.message)];
    return [out.simpleReply(req.cookie, err.errno)];
  }
}

/**
 * A read answered now, synchronously, when the device knows without I/O that the range is one
 * run of plain data in a file (BlockDevice.plainRunNow) whose pages the page cache holds: the
 * reply executeRequest would give (one data chunk, or a simple reply), without its promises,
 * block status and mapping calls. Those were most of a read's JavaScript, and until V8 had
 * optimised them (the first thousand or so requests a server answers) the main thread was slower
 * than the client. On read-only exports the kernel sends the data (CommandContext.sendFile; the
 * reply is then empty); elsewhere it is read into a reply buffer with a read that never waits for
 * the disk, and only when no earlier request the read must wait for is running (RequestOrder):
 * done at once, it is finished before any later request is looked at. Undefined: nothing was
 * sent or read; take the usual way (which also answers invalid requests).
 */
export function readNow(ctx: CommandContext, req: Request): Uint8Array[] | undefined {
  if (req.length === 0) return undefined;
  const run = ctx.exp.device.plainRunNow?.(req.offset, req.length);
  if (!run) return undefined;
  const send = ctx.sendFile;
  const store = run.store;
  if (send ? !store.sendCached : !store.readCachedNow || ctx.order.wouldWait('read', req.offset, req.length)) return undefined;
  try {
    check(ctx, req);
  } catch {
    return undefined;
  }
  if (send) {
    const head = ctx.structuredReplies ? out.dataChunkHeader(req.cookie, req.offset, req.length, true) : out.simpleReply(req.cookie, 0);
    return send(head, store, run.hostOffset, req.length) ? [] : undefined;
  }
  const headSize = ctx.structuredReplies ? out.DATA_CHUNK_HEADER_SIZE : SIMPLE_REPLY_SIZE;
  const buf = replyBuffers.take(headSize + req.length);
  if (!store.readCachedNow!(run.hostOffset, buf.subarray(headSize))) {
    replyBuffers.give(buf);
    return undefined;
  }
  if (ctx.structuredReplies) out.dataChunkHeaderInto(buf, req.cookie, req.offset, true);
  else out.simpleReplyInto(buf, req.cookie, 0);
  return [buf];
}

/** The checks the spec asks of every request, before the device sees it. */
function check(ctx: CommandContext, req: Request): void {
  const allowed = allowedFlags[req.type];
  if (allowed === undefined) throw new CommandError(NBD_EINVAL, `unknown command ${req.type}`);
  if (req.flags & ~allowed) throw new CommandError(NBD_EINVAL, `flags 0x${req.flags.toString(16)} are not valid for command ${req.type}`);
  if (req.flags & NBD_CMD_FLAG_DF && !ctx.structuredReplies) throw new CommandError(NBD_EINVAL, 'DF needs structured replies');
  if (isWrite(req.type) && isReadOnly(ctx.exp)) throw new CommandError(NBD_EPERM, 'export is read-only');
  if (req.type === NBD_CMD_FLUSH) return;
  const size = ctx.exp.device.size;
  if (req.offset + req.length > size) {
    const errno = req.type === NBD_CMD_WRITE || req.type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
    throw new CommandError(errno, `request [${req.offset}, +${req.length}) is beyond the end of the export (${size} bytes)`);
  }
  if (req.type === NBD_CMD_WRITE && req.payload === undefined) throw new CommandError(NBD_EINVAL, `write of ${req.length} bytes is larger than the ${MAX_PAYLOAD}-byte limit`);
  if (req.type === NBD_CMD_READ && req.length > MAX_PAYLOAD) throw new CommandError(NBD_EINVAL, `read of ${req.length} bytes is larger than the ${MAX_PAYLOAD}-byte limit`);
  if (req.type === NBD_CMD_BLOCK_STATUS) {
    if (ctx.contexts.length === 0) throw new CommandError(NBD_EINVAL, 'no metadata context was selected');
    if (req.length === 0) throw new CommandError(NBD_EINVAL, 'block status of an empty range');
  }
}

async function run(ctx: CommandContext, req: Request): Promise<Uint8Array[]> {
  const dev = ctx.exp.device;
  const fua = (req.flags & NBD_CMD_FLAG_FUA) !== 0;
  const ok = () => [out.simpleReply(req.cookie, 0)];
  switch (req.type) {
    case NBD_CMD_READ:
      return ctx.order.run('read', req.offset, req.length, () => (ctx.structuredReplies ? structuredRead(ctx, req) : simpleRead(ctx, req)));
    case NBD_CMD_WRITE:
      await ctx.order.run('write', req.offset, req.length, () => dev.write(req.offset, req.payload!, { fua }));
      return ok();
    case NBD_CMD_WRITE_ZEROES: {
      const options = { fua, mayUnmap: (req.flags & NBD_CMD_FLAG_NO_HOLE) === 0, fastOnly: (req.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0 };
      await ctx.order.run('write', req.offset, req.length, () => dev.writeZeroes(req.offset, req.length, options));
      return ok();
    }
    case NBD_CMD_TRIM:
      await ctx.order.run('write', req.offset, req.length, async () => {
        await dev.discard(req.offset, req.length);
        if (fua) await dev.flush();
      });
      return ok();
    case NBD_CMD_FLUSH:
      await ctx.order.run('flush', 0, 0, () => dev.flush());
      return ok();
    case NBD_CMD_CACHE:
      await ctx.order.run('read', req.offset, req.length, () => readThrough(ctx, req.offset, req.length));
      return ok();
    case NBD_CMD_BLOCK_STATUS:
      return ctx.order.run('read', req.offset, req.length, () => blockStatus(ctx, req));
    default:
      throw new CommandError(NBD_EINVAL, `unknown command ${req.type}`);
  }
}

/**
 * Read replies are one buffer each, header and data together (one socket write), taken from
 * replyBuffers; the connection gives them back once the socket is done with them.
 */
async function simpleRead(ctx: CommandContext, req: Request): Promise<Uint8Array[]> {
  if (ctx.sendFile && req.length > 0 && (await sentFromFile(ctx, out.simpleReply(req.cookie, 0), req.offset, req.length))) return [];
  const buf = replyBuffers.take(SIMPLE_REPLY_SIZE + req.length);
  try {
    await ctx.exp.device.read(req.offset, buf.subarray(SIMPLE_REPLY_SIZE));
  } catch (e) {
    replyBuffers.give(buf);
    throw e;
  }
  out.simpleReplyInto(buf, req.cookie, 0);
  return [buf];
}

/**
 * Ranges that read as zeros travel as hole chunks and the rest as data chunks, so a sparse
 * image costs no bandwidth for its holes. With DF the client wants one chunk: plain data.
 */
async function structuredRead(ctx: CommandContext, req: Request): Promise<Uint8Array[]> {
  const dev = ctx.exp.device;
  if (req.length === 0) return [out.noneChunk(req.cookie)];
  const extents = req.flags & NBD_CMD_FLAG_DF ? [{ offset: req.offset, length: req.length, flags: 0 }] : await allocationExtents(dev, req.offset, req.length);
  if (ctx.sendFile && extents.length === 1 && !(extents[0]!.flags & NBD_STATE_ZERO)) {
    if (await sentFromFile(ctx, out.dataChunkHeader(req.cookie, req.offset, req.length, true), req.offset, req.length)) return [];
  }
  // Data extents are read at once, each into its own reply buffer.
  const parts = extents.map((e, i) => {
    const last = i === extents.length - 1;
    if (e.flags & NBD_STATE_ZERO) return out.holeChunk(req.cookie, e.offset, e.length, last);
    const buf = replyBuffers.take(out.DATA_CHUNK_HEADER_SIZE + e.length);
    out.dataChunkHeaderInto(buf, req.cookie, e.offset, last);
    return buf;
  });
  const reads = await Promise.allSettled(
    extents.map((e, i) => (e.flags & NBD_STATE_ZERO ? undefined : dev.read(e.offset, parts[i]!.subarray(out.DATA_CHUNK_HEADER_SIZE)))),
  );
  const failed = reads.find((r) => r.status === 'rejected');
  if (failed) {
    for (const p of parts) replyBuffers.give(p);
    throw (failed as PromiseRejectedResult).reason;
  }
  return parts;
}

/**
 * A read reply of one run of data that sits as plain bytes of a local file goes out with its
 * header written and the bytes moved from the page cache to the socket by the kernel (sendfile):
 * no copy into a reply buffer and out of it again, which were most of a read's system time. True
 * when it went (the reply is then empty); false: read it the usual way.
 */
async function sentFromFile(ctx: CommandContext, head: Uint8Array, offset: number, length: number): Promise<boolean> {
  const dev = ctx.exp.device;
  if (!dev.plainExtents) return false;
  const runs = await dev.plainExtents(offset, length);
  const run = runs.length === 1 ? runs[0]! : undefined;
  if (!run?.store?.sendCached) return false;
  return ctx.sendFile!(head, run.store, run.hostOffset!, length);
}

async function blockStatus(ctx: CommandContext, req: Request): Promise<Uint8Array[]> {
  const one = (req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
  // One chunk per selected context, the last one ending the reply.
  const chunks: Uint8Array[] = [];
  for (const [i, { id, context }] of ctx.contexts.entries()) {
    const extents = await context.extents(ctx.exp.device, req.offset, req.length, one ? 1 : MAX_EXTENTS);
    chunks.push(out.blockStatusChunk(req.cookie, id, extents, i === ctx.contexts.length - 1));
  }
  return chunks;
}

/** CACHE: read the range so the format's metadata caches (and the OS page cache) hold it. */
async function readThrough(ctx: CommandContext, offset: number, length: number): Promise<void> {
  const buf = new Uint8Array(Math.min(length, CACHE_CHUNK));
  for (let done = 0; done < length; done += buf.length) {
    await ctx.exp.device.read(offset + done, buf.subarray(0, Math.min(buf.length, length - done)));
  }
}

/** The NBD errno for a failure of the device. */
function toCommandError(e: unknown, req: Request): CommandError {
  const message = e instanceof Error ? e.message : String(e);
  if (e instanceof QcowError) {
    switch (e.code) {
      case 'QCOW_READ_ONLY':
        return new CommandError(NBD_EPERM, message);
      case 'QCOW_OUT_OF_RANGE':
        return new CommandError(req.type === NBD_CMD_WRITE || req.type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL, message);
      case 'QCOW_INVALID_ARGUMENT':
        return new CommandError(NBD_EINVAL, message);
      case 'QCOW_UNSUPPORTED':
        // The spec reserves ENOTSUP for a fast zero that cannot be fast.
        return new CommandError(req.flags & NBD_CMD_FLAG_FAST_ZERO ? NBD_ENOTSUP : NBD_EINVAL, message);
    }
  }
  for (let c: unknown = e; c; c = (c as { cause?: unknown }).cause) {
    const code = (c as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG') return new CommandError(NBD_ENOSPC, message);
    if (code === 'EROFS' || code === 'EACCES' || code === 'EPERM') return new CommandError(NBD_EPERM, message);
    if (c === (c as { cause?: unknown }).cause) break;
  }
  return new CommandError(NBD_EIO, message);
}
