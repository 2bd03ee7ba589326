/**
 * What clients send, as plain data, and the codecs of the option payloads that have structure
 * (NBD_OPT_INFO/GO and the meta-context options). Decoders return a reason string instead of
 * throwing: a malformed option is answered with NBD_REP_ERR_INVALID, not a dropped connection.
 */
import { MAX_STRING } from './constants.js';
import { Reader, Writer, decodeUtf8, utf8 } from './wire.js';

/** One option of the handshake phase. `data` is absent when it was too long and was skipped. */
export interface ClientOption {
  kind: 'option';
  option: number;
  /** Length as the client declared it. */
  length: number;
  data?: Uint8Array;
}

/** The client's flags, the first thing it sends. */
export interface ClientFlags {
  kind: 'flags';
  flags: number;
}

/** One request of the transmission phase. */
export interface Request {
  kind: 'request';
  flags: number;
  type: number;
  /** Opaque to the server; echoed in replies. Kept as 8 raw bytes. */
  cookie: Uint8Array;
  /** Offsets are 64-bit on the wire; beyond 2^53 they cannot be exact and count as out of range. */
  offset: number;
  length: number;
  /** NBD_CMD_WRITE's data. Absent for other commands, and for writes larger than the payload limit (the bytes were skipped). */
  payload?: Uint8Array;
}

export type ClientMessage = ClientFlags | ClientOption | Request;

/** NBD_OPT_INFO / NBD_OPT_GO payload. */
export interface InfoRequest {
  name: string;
  infos: number[];
}

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload. */
export interface MetaContextRequest {
  name: string;
  queries: string[];
}

export type Decoded<T> = { ok: true; value: T } | { ok: false; reason: string };

function readString(r: Reader, what: string): Decoded<string> {
  if (r.left < 4) return { ok: false, reason: `${what} length is missing` };
  const n = r.u32();
  if (n > r.left) return { ok: false, reason: `${what} runs past the end of the option` };
  if (n > MAX_STRING) return { ok: false, reason: `${what} is longer than ${MAX_STRING} bytes` };
  const s = decodeUtf8(r.raw(n));
  if (s === undefined) return { ok: false, reason: `${what} is not valid UTF-8` };
  return { ok: true, value: s };
}

export function decodeInfoRequest(data: Uint8Array): Decoded<InfoRequest> {
  const r = new Reader(data);
  const name = readString(r, 'export name');
  if (!name.ok) return name;
  if (r.left < 2) return { ok: false, reason: 'number of information requests is missing' };
  const count = r.u16();
  if (r.left !== count * 2) return { ok: false, reason: `option length does not match ${count} information requests` };
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(r.u16());
  return { ok: true, value: { name: name.value, infos } };
}

export function encodeInfoRequest(req: InfoRequest): Uint8Array {
  const name = utf8(req.name);
  const w = new Writer(4 + name.length + 2 + 2 * req.infos.length).u32(name.length).raw(name).u16(req.infos.length);
  for (const i of req.infos) w.u16(i);
  return w.bytes;
}

export function decodeMetaContextRequest(data: Uint8Array): Decoded<MetaContextRequest> {
  const r = new Reader(data);
  const name = readString(r, 'export name');
  if (!name.ok) return name;
  if (r.left < 4) return { ok: false, reason: 'number of queries is missing' };
  const count = r.u32();
  // Each query costs at least its 4-byte length, so a count beyond that cannot be honest.
  if (count > r.left / 4) return { ok: false, reason: `${count} queries cannot fit in the option` };
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    const q = readString(r, 'query');
    if (!q.ok) return q;
    queries.push(q.value);
  }
  if (r.left !== 0) return { ok: false, reason: 'trailing bytes after the queries' };
  return { ok: true, value: { name: name.value, queries } };
}

export function encodeMetaContextRequest(req: MetaContextRequest): Uint8Array {
  const name = utf8(req.name);
  const qs = req.queries.map(utf8);
  const w = new Writer(8 + name.length + qs.reduce((n, q) => n + 4 + q.length, 0)).u32(name.length).raw(name).u32(qs.length);
  for (const q of qs) w.u32(q.length).raw(q);
  return w.bytes;
}
