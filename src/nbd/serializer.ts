/**
 * Encoders of everything the server sends, one function per message. Each returns the bytes to
 * write; payload data (reads) is returned as a separate buffer so it is never copied.
 */
import {
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAGIC,
  NBD_OPTS_MAGIC,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  MAX_STRING,
  OPTION_REPLY_HEADER_SIZE,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_HEADER_SIZE,
} from './constants.js';
import { Writer, utf8 } from './wire.js';

/** The server's opening: magic, newstyle magic, handshake flags. */
export function greeting(): Uint8Array {
  return new Writer(18).u64(NBD_MAGIC).u64(NBD_OPTS_MAGIC).u16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).bytes;
}

/** A reply to an option (any but NBD_OPT_EXPORT_NAME). */
export function optionReply(option: number, type: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  return new Writer(OPTION_REPLY_HEADER_SIZE + data.length).u64(NBD_REP_MAGIC).u32(option).u32(type).u32(data.length).raw(data).bytes;
}

/** An error reply carrying a message for people (options); messages are cut to the string limit. */
export function optionError(option: number, type: number, message: string): Uint8Array {
  return optionReply(option, type, truncatedUtf8(message));
}

/** NBD_REP_SERVER: one export of NBD_OPT_LIST, with its description after the name. */
export function serverReply(option: number, name: string, description = ''): Uint8Array {
  const n = utf8(name);
  const d = utf8(description);
  return optionReply(option, NBD_REP_SERVER, new Writer(4 + n.length + d.length).u32(n.length).raw(n).raw(d).bytes);
}

/** The answer to NBD_OPT_EXPORT_NAME: size, flags, then 124 zeros unless the client said NO_ZEROES. */
export function exportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Uint8Array {
  return new Writer(10 + (noZeroes ? 0 : 124)).u64(size).u16(transmissionFlags).bytes;
}

export function infoExport(option: number, size: number, transmissionFlags: number): Uint8Array {
  return optionReply(option, NBD_REP_INFO, new Writer(12).u16(NBD_INFO_EXPORT).u64(size).u16(transmissionFlags).bytes);
}

export function infoName(option: number, name: string): Uint8Array {
  const n = utf8(name);
  return optionReply(option, NBD_REP_INFO, new Writer(2 + n.length).u16(NBD_INFO_NAME).raw(n).bytes);
}

export function infoDescription(option: number, description: string): Uint8Array {
  const d = truncatedUtf8(description);
  return optionReply(option, NBD_REP_INFO, new Writer(2 + d.length).u16(NBD_INFO_DESCRIPTION).raw(d).bytes);
}

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

export function infoBlockSize(option: number, sizes: BlockSizes): Uint8Array {
  return optionReply(option, NBD_REP_INFO, new Writer(14).u16(NBD_INFO_BLOCK_SIZE).u32(sizes.minimum).u32(sizes.preferred).u32(sizes.maximum).bytes);
}

export function metaContextReply(option: number, id: number, name: string): Uint8Array {
  const n = utf8(name);
  return optionReply(option, NBD_REP_META_CONTEXT, new Writer(4 + n.length).u32(id).raw(n).bytes);
}

/** A simple reply header; a successful read's data follows it. */
export function simpleReply(cookie: Uint8Array, error: number): Uint8Array {
  return new Writer(SIMPLE_REPLY_SIZE).u32(NBD_SIMPLE_REPLY_MAGIC).u32(error).raw(cookie).bytes;
}

/** The same header written at the start of `into` (a read reply whose data follows in place). */
export function simpleReplyInto(into: Uint8Array, cookie: Uint8Array, error: number): void {
  new Writer(into).u32(NBD_SIMPLE_REPLY_MAGIC).u32(error).raw(cookie);
}

function chunkHeader(w: Writer, cookie: Uint8Array, flags: number, type: number, length: number): Writer {
  return w.u32(NBD_STRUCTURED_REPLY_MAGIC).u16(flags).u16(type).raw(cookie).u32(length);
}

const done = (last: boolean) => (last ? NBD_REPLY_FLAG_DONE : 0);

export function noneChunk(cookie: Uint8Array): Uint8Array {
  return chunkHeader(new Writer(STRUCTURED_HEADER_SIZE), cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0).bytes;
}

/** Header of an OFFSET_DATA chunk (with its offset field); the `dataLength` bytes follow it. */
export function dataChunkHeader(cookie: Uint8Array, offset: number, dataLength: number, last: boolean): Uint8Array {
  return chunkHeader(new Writer(STRUCTURED_HEADER_SIZE + 8), cookie, done(last), NBD_REPLY_TYPE_OFFSET_DATA, 8 + dataLength).u64(offset).bytes;
}

/** Bytes before the data in an OFFSET_DATA chunk. */
export const DATA_CHUNK_HEADER_SIZE = STRUCTURED_HEADER_SIZE + 8;

/** The OFFSET_DATA header written at the start of `into`, whose data follows it in place. */
export function dataChunkHeaderInto(into: Uint8Array, cookie: Uint8Array, offset: number, last: boolean): void {
  chunkHeader(new Writer(into), cookie, done(last), NBD_REPLY_TYPE_OFFSET_DATA, into.length - STRUCTURED_HEADER_SIZE).u64(offset);
}

export function holeChunk(cookie: Uint8Array, offset: number, length: number, last: boolean): Uint8Array {
  return chunkHeader(new Writer(STRUCTURED_HEADER_SIZE + 12), cookie, done(last), NBD_REPLY_TYPE_OFFSET_HOLE, 12).u64(offset).u32(length).bytes;
}

export interface StatusDescriptor {
  length: number;
  flags: number;
}

export function blockStatusChunk(cookie: Uint8Array, contextId: number, descriptors: StatusDescriptor[], last: boolean): Uint8Array {
  const payload = 4 + 8 * descriptors.length;
  const w = chunkHeader(new Writer(STRUCTURED_HEADER_SIZE + payload), cookie, done(last), NBD_REPLY_TYPE_BLOCK_STATUS, payload).u32(contextId);
  for (const d of descriptors) w.u32(d.length).u32(d.flags);
  return w.bytes;
}

/** NBD_REPLY_TYPE_ERROR, always the last chunk of its reply here. */
export function errorChunk(cookie: Uint8Array, error: number, message: string): Uint8Array {
  const m = truncatedUtf8(message);
  return chunkHeader(new Writer(STRUCTURED_HEADER_SIZE + 6 + m.length), cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6 + m.length).u32(error).u16(m.length).raw(m).bytes;
}

/** UTF-8 of `s`, cut on a character boundary to the protocol's string limit. */
function truncatedUtf8(s: string): Uint8Array {
  let bytes = utf8(s);
  while (bytes.length > MAX_STRING) {
    s = s.slice(0, Math.floor(s.length * 0.9));
    bytes = utf8(s);
  }
  return bytes;
}
