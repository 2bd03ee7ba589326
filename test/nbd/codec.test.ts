/** The NBD wire codecs on their own: framing of client messages, every server message's bytes, malformed input. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import * as C from '#src/nbd/constants.js';
import { NbdProtocolError } from '#src/nbd/errors.js';
import { decodeInfoRequest, decodeMetaContextRequest, encodeInfoRequest, encodeMetaContextRequest, type ClientOption, type Request } from '#src/nbd/messages.js';
import { ClientParser } from '#src/nbd/parser.js';
import * as out from '#src/nbd/serializer.js';
import { ByteQueue, Reader, Writer, utf8 } from '#src/nbd/wire.js';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const option = (opt: number, data: Uint8Array = new Uint8Array(0)) => new Writer(16 + data.length).u64(C.NBD_OPTS_MAGIC).u32(opt).u32(data.length).raw(data).bytes;
const request = (type: number, flags: number, cookie: bigint, offset: number | bigint, length: number) =>
  new Writer(28).u32(C.NBD_REQUEST_MAGIC).u16(flags).u16(type).u64(cookie).u64(offset).u32(length).bytes;
const cookie = (n: number) => new Writer(8).u64(n).bytes;

function parserIn(phase: 'flags' | 'option' | 'request', limits?: { maxOptionLength: number; maxPayload: number }) {
  const p = new ClientParser(limits);
  p.phase = phase;
  return p;
}

describe('ByteQueue', () => {
  test('takes messages that span chunks and keeps the rest', () => {
    const q = new ByteQueue();
    q.push(Uint8Array.of(1, 2));
    q.push(Uint8Array.of(3, 4, 5));
    assert.deepEqual([...q.take(3)], [1, 2, 3]);
    assert.equal(q.length, 2);
    assert.equal(q.skip(10), 2);
    assert.equal(q.length, 0);
  });
});

describe('client message parser', () => {
  test('client flags are four bytes', () => {
    const p = parserIn('flags');
    p.push(Uint8Array.of(0, 0, 0));
    assert.equal(p.next(), undefined);
    p.push(Uint8Array.of(3));
    assert.deepEqual(p.next(), { kind: 'flags', flags: 3 });
  });

  test('an option arriving one byte at a time is returned once, whole', () => {
    const p = parserIn('option');
    const bytes = option(C.NBD_OPT_EXPORT_NAME, utf8('disk'));
    for (let i = 0; i < bytes.length - 1; i++) {
      p.push(bytes.subarray(i, i + 1));
      assert.equal(p.next(), undefined);
    }
    p.push(bytes.subarray(bytes.length - 1));
    const msg = p.next() as ClientOption;
    assert.equal(msg.option, C.NBD_OPT_EXPORT_NAME);
    assert.equal(Buffer.from(msg.data!).toString(), 'disk');
    assert.equal(p.next(), undefined);
  });

  test('several requests in one chunk come out in order; a write carries its payload', () => {
    const p = parserIn('request');
    const payload = Uint8Array.of(9, 8, 7);
    const joined = Buffer.concat([request(C.NBD_CMD_WRITE, C.NBD_CMD_FLAG_FUA, 7n, 4096, 3), payload, request(C.NBD_CMD_READ, 0, 8n, 0, 512)]);
    p.push(joined);
    const w = p.next() as Request;
    assert.equal(w.type, C.NBD_CMD_WRITE);
    assert.equal(w.flags, C.NBD_CMD_FLAG_FUA);
    assert.equal(hex(w.cookie), '0000000000000007');
    assert.equal(w.offset, 4096);
    assert.deepEqual([...w.payload!], [9, 8, 7]);
    const r = p.next() as Request;
    assert.equal(r.type, C.NBD_CMD_READ);
    assert.equal(r.length, 512);
    assert.equal(r.payload, undefined);
  });

  test('a write waits for its whole payload', () => {
    const p = parserIn('request');
    p.push(request(C.NBD_CMD_WRITE, 0, 1n, 0, 4));
    p.push(Uint8Array.of(1, 2));
    assert.equal(p.next(), undefined);
    p.push(Uint8Array.of(3, 4));
    assert.deepEqual([...(p.next() as Request).payload!], [1, 2, 3, 4]);
  });

  test('a payload still arriving goes into one buffer from allocPayload, which the caller may fill from the stream', () => {
    const sizes: number[] = [];
    const p = new ClientParser(undefined, (n) => (sizes.push(n), new Uint8Array(n).fill(0xee)));
    p.phase = 'request';
    assert.equal(p.headerNeed, C.REQUEST_HEADER_SIZE);
    p.push(request(C.NBD_CMD_WRITE, 0, 1n, 0, 8).subarray(0, 10));
    assert.equal(p.headerNeed, C.REQUEST_HEADER_SIZE - 10);
    assert.equal(p.payloadRoom, undefined);
    p.push(Buffer.concat([request(C.NBD_CMD_WRITE, 0, 1n, 0, 8).subarray(10), Uint8Array.of(1, 2)]));
    assert.equal(p.next(), undefined);
    assert.deepEqual(sizes, [8]);
    assert.equal(p.headerNeed, 0);
    p.push(Uint8Array.of(3)); // copied into the payload, not queued
    const room = p.payloadRoom!;
    assert.equal(room.length, 5);
    room.set([4, 5]);
    p.payloadFilled(2);
    assert.equal(p.next(), undefined);
    // Bytes past the payload stay queued; while any wait, nothing may be read around them.
    p.push(Buffer.concat([Uint8Array.of(6, 7, 8), request(C.NBD_CMD_FLUSH, 0, 2n, 0, 0)]));
    assert.equal(p.payloadRoom, undefined);
    assert.deepEqual([...(p.next() as Request).payload!], [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.equal((p.next() as Request).type, C.NBD_CMD_FLUSH);
    assert.equal(p.headerNeed, C.REQUEST_HEADER_SIZE);
  });

  test('a write over the payload limit is returned without payload and its bytes are skipped', () => {
    const p = parserIn('request', { maxOptionLength: 16, maxPayload: 8 });
    p.push(request(C.NBD_CMD_WRITE, 0, 1n, 0, 20));
    p.push(new Uint8Array(5));
    const big = p.next() as Request;
    assert.equal(big.length, 20);
    assert.equal(big.payload, undefined);
    p.push(new Uint8Array(15)); // the rest of the oversized payload
    p.push(request(C.NBD_CMD_FLUSH, 0, 2n, 0, 0));
    const next = p.next() as Request;
    assert.equal(next.type, C.NBD_CMD_FLUSH);
    assert.equal(hex(next.cookie), '0000000000000002');
  });

  test('an option over the length limit is returned without data and skipped', () => {
    const p = parserIn('option', { maxOptionLength: 4, maxPayload: 8 });
    p.push(option(C.NBD_OPT_LIST, new Uint8Array(10)));
    p.push(option(C.NBD_OPT_ABORT));
    const big = p.next() as ClientOption;
    assert.equal(big.length, 10);
    assert.equal(big.data, undefined);
    assert.equal((p.next() as ClientOption).option, C.NBD_OPT_ABORT);
  });

  test('offsets past 2^53 are not rounded into range', () => {
    const p = parserIn('request');
    p.push(request(C.NBD_CMD_READ, 0, 1n, 2n ** 63n, 512));
    assert.equal((p.next() as Request).offset, Number.POSITIVE_INFINITY);
  });

  test('a bad magic number is a protocol error, in either phase', () => {
    const p = parserIn('request');
    p.push(new Uint8Array(28).fill(0x41));
    assert.throws(() => p.next(), (e: unknown) => e instanceof NbdProtocolError && e.code === 'NBD_BAD_MAGIC');
    const o = parserIn('option');
    o.push(new Uint8Array(16));
    assert.throws(() => o.next(), NbdProtocolError);
  });
});

describe('option payloads', () => {
  test('NBD_OPT_GO data round-trips', () => {
    const data = encodeInfoRequest({ name: 'disk', infos: [C.NBD_INFO_NAME, C.NBD_INFO_BLOCK_SIZE] });
    assert.equal(hex(data), '000000046469736b000200010003');
    assert.deepEqual(decodeInfoRequest(data), { ok: true, value: { name: 'disk', infos: [1, 3] } });
  });

  test('malformed NBD_OPT_GO data is refused with a reason', () => {
    assert.equal(decodeInfoRequest(Uint8Array.of(0, 0)).ok, false); // no name length
    assert.equal(decodeInfoRequest(Uint8Array.of(0, 0, 0, 9, 1)).ok, false); // name past the end
    assert.equal(decodeInfoRequest(Uint8Array.of(0, 0, 0, 0, 0, 2, 0, 1)).ok, false); // 2 infos promised, 1 sent
    assert.equal(decodeInfoRequest(Uint8Array.of(0, 0, 0, 1, 0xff, 0, 0)).ok, false); // name not UTF-8
  });

  test('meta context queries round-trip and malformed ones are refused', () => {
    const data = encodeMetaContextRequest({ name: '', queries: ['base:allocation', 'qemu:dirty-bitmap:x'] });
    assert.deepEqual(decodeMetaContextRequest(data), { ok: true, value: { name: '', queries: ['base:allocation', 'qemu:dirty-bitmap:x'] } });
    assert.equal(decodeMetaContextRequest(data.subarray(0, data.length - 1)).ok, false);
    assert.equal(decodeMetaContextRequest(Uint8Array.of(0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff)).ok, false); // absurd count
    assert.equal(decodeMetaContextRequest(Buffer.concat([data, Uint8Array.of(0)])).ok, false); // trailing byte
  });
});

describe('server messages', () => {
  const ck = cookie(0x1122);

  test('greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES', () => {
    assert.equal(hex(out.greeting()), '4e42444d41474943' + '49484156454f5054' + '0003');
  });

  test('option reply header and error with message', () => {
    assert.equal(hex(out.optionReply(C.NBD_OPT_GO, C.NBD_REP_ACK)), '0003e889045565a9' + '00000007' + '00000001' + '00000000');
    const err = out.optionError(C.NBD_OPT_INFO, C.NBD_REP_ERR_UNKNOWN, 'no');
    assert.equal(hex(err), '0003e889045565a9' + '00000006' + '80000006' + '00000002' + '6e6f');
  });

  test('EXPORT_NAME reply: size, flags, then 124 zeros unless NO_ZEROES', () => {
    assert.equal(out.exportNameReply(1, 1, false).length, 134);
    assert.equal(hex(out.exportNameReply(4096, 0x0d, true)), '0000000000001000' + '000d');
  });

  test('NBD_REP_INFO payloads', () => {
    const payload = (b: Uint8Array) => hex(b.subarray(20));
    assert.equal(payload(out.infoExport(7, 1 << 20, 0x1)), '0000' + '0000000000100000' + '0001');
    assert.equal(payload(out.infoName(7, 'a')), '0001' + '61');
    assert.equal(payload(out.infoDescription(7, 'b')), '0002' + '62');
    assert.equal(payload(out.infoBlockSize(7, { minimum: 1, preferred: 4096, maximum: 1 << 25 })), '0003' + '00000001' + '00001000' + '02000000');
    assert.equal(payload(out.serverReply(3, 'x', 'd')), '00000001' + '78' + '64');
    assert.equal(payload(out.metaContextReply(10, 1, 'base:allocation')), '00000001' + hex(utf8('base:allocation')));
  });

  test('simple reply', () => {
    assert.equal(hex(out.simpleReply(ck, 22)), '67446698' + '00000016' + '0000000000001122');
  });

  test('structured chunks: none, data, hole, block status, error', () => {
    assert.equal(hex(out.noneChunk(ck)), '668e33ef' + '0001' + '0000' + '0000000000001122' + '00000000');
    assert.equal(hex(out.dataChunkHeader(ck, 512, 3, false)), '668e33ef' + '0000' + '0001' + '0000000000001122' + '0000000b' + '0000000000000200');
    assert.equal(hex(out.holeChunk(ck, 0, 4096, true)), '668e33ef' + '0001' + '0002' + '0000000000001122' + '0000000c' + '0000000000000000' + '00001000');
    const bs = out.blockStatusChunk(ck, 1, [{ length: 4096, flags: 3 }, { length: 512, flags: 0 }], true);
    assert.equal(hex(bs), '668e33ef' + '0001' + '0005' + '0000000000001122' + '00000014' + '00000001' + '00001000' + '00000003' + '00000200' + '00000000');
    const err = new Reader(out.errorChunk(ck, C.NBD_EPERM, 'ro'));
    err.pos = 4;
    assert.equal(err.u16(), C.NBD_REPLY_FLAG_DONE);
    assert.equal(err.u16(), C.NBD_REPLY_TYPE_ERROR);
    err.pos = 16;
    assert.equal(err.u32(), 8);
    assert.equal(err.u32(), C.NBD_EPERM);
    assert.equal(err.u16(), 2);
  });

  test('messages longer than the 4096-byte string limit are cut', () => {
    const err = out.errorChunk(ck, C.NBD_EIO, 'é'.repeat(5000));
    assert.ok(err.length - 26 <= C.MAX_STRING);
  });
});
