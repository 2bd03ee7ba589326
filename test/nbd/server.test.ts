/**
 * The server end to end over a Unix socket, with our own client (which can also misbehave):
 * negotiation, every command, the error replies, and robustness against bad clients.
 */
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { join } from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import type { BlockDevice } from '#src/core/block-device.js';
import { rawFormat } from '#src/formats/raw/raw.js';
import { MemoryStore } from '#src/storage/memory.js';
import { randomBytes, scratch } from '../support/qemu.js';
import { NbdClient } from '../support/nbd-client.js';
import * as C from '#src/nbd/constants.js';
import { encodeInfoRequest, encodeMetaContextRequest } from '#src/nbd/messages.js';
import { NbdServer, type NbdServerOptions } from '#src/nbd/server.js';
import { Reader, Writer, decodeUtf8, utf8 } from '#src/nbd/wire.js';

const SIZE = 1 << 20;

async function serve(t: TestContext, options: Partial<NbdServerOptions> & { readOnly?: boolean; content?: Uint8Array } = {}) {
  const dev = await rawFormat.open(new MemoryStore(options.content ?? randomBytes(SIZE)));
  const server = new NbdServer({ persistent: true, maxClients: 8, ...options, exp: { name: '', description: 'test disk', device: dev, readOnly: !!options.readOnly, ...options.exp } });
  const path = join(await scratch(t), 's.sock');
  await server.listen({ path });
  t.after(() => server.close());
  return { server, dev, address: { path } };
}

const bytesOf = async (dev: BlockDevice, off: number, len: number) => {
  const b = new Uint8Array(len);
  await dev.read(off, b);
  return b;
};

describe('negotiation', () => {
  test('NBD_OPT_GO returns size, flags, name, description and block sizes', async (t) => {
    const { address } = await serve(t);
    const c = await NbdClient.connect(address, { structuredReplies: true });
    assert.equal(c.size, SIZE);
    assert.equal(c.description, 'test disk');
    assert.deepEqual(c.blockSizes, { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 });
    const f = c.transmissionFlags;
    for (const flag of [C.NBD_FLAG_HAS_FLAGS, C.NBD_FLAG_SEND_FLUSH, C.NBD_FLAG_SEND_FUA, C.NBD_FLAG_SEND_TRIM, C.NBD_FLAG_SEND_WRITE_ZEROES, C.NBD_FLAG_SEND_FAST_ZERO, C.NBD_FLAG_SEND_CACHE, C.NBD_FLAG_SEND_DF]) {
      assert.ok(f & flag, `flag 0x${flag.toString(16)}`);
    }
    assert.equal(f & C.NBD_FLAG_READ_ONLY, 0);
    assert.ok(f & C.NBD_FLAG_CAN_MULTI_CONN, 'several clients allowed at once');
    await c.disconnect();
  });

  test('without structured replies DF is not offered; read-only exports say so', async (t) => {
    const { address } = await serve(t, { readOnly: true });
    const c = await NbdClient.connect(address);
    assert.equal(c.transmissionFlags & C.NBD_FLAG_SEND_DF, 0);
    assert.ok(c.transmissionFlags & C.NBD_FLAG_READ_ONLY);
    assert.equal(c.transmissionFlags & (C.NBD_FLAG_SEND_TRIM | C.NBD_FLAG_SEND_WRITE_ZEROES), 0);
    await c.disconnect();
  });

  test('with one client at a time, multi-conn is not offered (nbdcopy would wait for a second slot)', async (t) => {
    const { address } = await serve(t, { maxClients: 1 });
    const c = await NbdClient.connect(address);
    assert.equal(c.transmissionFlags & C.NBD_FLAG_CAN_MULTI_CONN, 0);
    await c.disconnect();
  });

  test('LIST names the export; unknown names and options get error replies; the session goes on', async (t) => {
    const { address } = await serve(t, { exp: { name: 'disk0' } as never });
    const c = await NbdClient.connect(address, { handshakeOnly: true });
    const list = await c.option(C.NBD_OPT_LIST);
    assert.equal(list[0]!.type, C.NBD_REP_SERVER);
    assert.equal(decodeUtf8(list[0]!.data.subarray(4, 9)), 'disk0');
    assert.equal(list.at(-1)!.type, C.NBD_REP_ACK);
    assert.equal((await c.option(C.NBD_OPT_LIST, Uint8Array.of(1))).at(-1)!.type, C.NBD_REP_ERR_INVALID);
    assert.equal((await c.option(C.NBD_OPT_INFO, encodeInfoRequest({ name: 'nope', infos: [] }))).at(-1)!.type, C.NBD_REP_ERR_UNKNOWN);
    assert.equal((await c.option(C.NBD_OPT_GO, Uint8Array.of(0, 0, 0, 50))).at(-1)!.type, C.NBD_REP_ERR_INVALID);
    assert.equal((await c.option(0x1234)).at(-1)!.type, C.NBD_REP_ERR_UNSUP);
    assert.equal((await c.option(C.NBD_OPT_STARTTLS)).at(-1)!.type, C.NBD_REP_ERR_POLICY);
    // Meta contexts need structured replies first.
    const early = await c.option(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest({ name: 'disk0', queries: ['base:allocation'] }));
    assert.equal(early.at(-1)!.type, C.NBD_REP_ERR_INVALID);
    const info = await c.option(C.NBD_OPT_INFO, encodeInfoRequest({ name: 'disk0', infos: [] }));
    assert.equal(info.at(-1)!.type, C.NBD_REP_ACK);
    await c.go('disk0');
    assert.equal(c.size, SIZE);
    await c.disconnect();
  });

  test('meta contexts: LIST offers base:allocation, SET selects it, other namespaces are ignored', async (t) => {
    const { address } = await serve(t);
    const c = await NbdClient.connect(address, { handshakeOnly: true });
    assert.equal((await c.option(C.NBD_OPT_STRUCTURED_REPLY)).at(-1)!.type, C.NBD_REP_ACK);
    assert.equal((await c.option(C.NBD_OPT_STRUCTURED_REPLY)).at(-1)!.type, C.NBD_REP_ERR_INVALID);
    for (const queries of [[], ['base:']]) {
      const listed = await c.option(C.NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest({ name: '', queries }));
      assert.deepEqual(
        listed.map((r) => r.type),
        [C.NBD_REP_META_CONTEXT, C.NBD_REP_ACK],
      );
      assert.equal(decodeUtf8(listed[0]!.data.subarray(4)), 'base:allocation');
    }
    const none = await c.option(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest({ name: '', queries: ['qemu:dirty-bitmap:x', 'base:other'] }));
    assert.deepEqual(
      none.map((r) => r.type),
      [C.NBD_REP_ACK],
    );
    const set = await c.option(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest({ name: '', queries: ['base:allocation'] }));
    assert.deepEqual(
      set.map((r) => r.type),
      [C.NBD_REP_META_CONTEXT, C.NBD_REP_ACK],
    );
    await c.disconnect().catch(() => undefined);
  });

  test('NBD_OPT_EXPORT_NAME enters transmission (with NO_ZEROES); a wrong name drops the connection', async (t) => {
    const { address } = await serve(t);
    const c = await NbdClient.connect(address, { handshakeOnly: true });
    c.socket.write(new Writer(16).u64(C.NBD_OPTS_MAGIC).u32(C.NBD_OPT_EXPORT_NAME).u32(0).bytes);
    const reply = await new Promise<Buffer>((resolve) => c.socket.once('data', resolve));
    const r = new Reader(reply);
    assert.equal(Number(r.u64()), SIZE);
    assert.equal(reply.length, 10, 'no 124 zero bytes after NO_ZEROES');
    c.destroy();

    const bad = await NbdClient.connect(address, { handshakeOnly: true });
    const closed = new Promise((resolve) => bad.socket.once('close', resolve));
    bad.socket.write(new Writer(19).u64(C.NBD_OPTS_MAGIC).u32(C.NBD_OPT_EXPORT_NAME).u32(3).raw(utf8('xyz')).bytes);
    await closed;
  });

  test('NBD_OPT_ABORT is acknowledged, then the server closes', async (t) => {
    const { address } = await serve(t);
    const c = await NbdClient.connect(address, { handshakeOnly: true });
    const closed = new Promise((resolve) => c.socket.once('close', resolve));
    assert.equal((await c.option(C.NBD_OPT_ABORT)).at(-1)!.type, C.NBD_REP_ACK);
    await closed;
  });
});

describe('commands', () => {
  for (const structuredReplies of [false, true]) {
    test(`read, write (FUA), zeroes, trim, cache, flush — ${structuredReplies ? 'structured' : 'simple'} replies`, async (t) => {
      const { address, dev } = await serve(t);
      const c = await NbdClient.connect(address, { structuredReplies });
      assert.deepEqual(await c.read(1000, 3000), await bytesOf(dev, 1000, 3000));
      const data = randomBytes(70000, 7);
      await c.write(12345, data, C.NBD_CMD_FLAG_FUA);
      assert.deepEqual(await bytesOf(dev, 12345, 70000), data);
      assert.deepEqual(await c.read(12345, 70000), data);
      await c.writeZeroes(4096, 8192, C.NBD_CMD_FLAG_NO_HOLE);
      await c.writeZeroes(65536, 512);
      assert.deepEqual(await bytesOf(dev, 4096, 8192), new Uint8Array(8192));
      await c.trim(0, 4096);
      await c.cache(0, SIZE);
      await c.flush();
      assert.equal((await c.read(0, 0)).length, 0);
      await c.disconnect();
    });
  }

  test('structured reads send zero ranges as hole chunks; DF asks for a single data chunk', async (t) => {
    // A chain with an unallocated top: reads through it are holes where the backing is absent.
    const content = new Uint8Array(SIZE);
    content.set(randomBytes(4096, 3), 8192);
    const { address } = await serve(t, { content });
    const c = await NbdClient.connect(address, { structuredReplies: true });
    const r = await c.request(C.NBD_CMD_READ, 0, 0, 65536);
    assert.equal(r.error, 0);
    assert.deepEqual(r.data!.subarray(8192, 12288), content.subarray(8192, 12288));
    const df = await c.request(C.NBD_CMD_READ, C.NBD_CMD_FLAG_DF, 0, 65536);
    assert.deepEqual(df.chunkTypes, [C.NBD_REPLY_TYPE_OFFSET_DATA]);
    assert.deepEqual(df.data, r.data);
    await c.disconnect();
  });

  test('block status reports base:allocation; REQ_ONE gives one extent within the request', async (t) => {
    const { address } = await serve(t);
    const c = await NbdClient.connect(address, { baseAllocation: true });
    const all = await c.blockStatus(0, SIZE);
    assert.deepEqual(all, [{ length: SIZE, flags: 0 }]); // raw: all data
    const one = await c.blockStatus(512, 1024, C.NBD_CMD_FLAG_REQ_ONE);
    assert.deepEqual(one, [{ length: 1024, flags: 0 }]);
    await c.disconnect();
  });

  test('errors: past the end, read-only, unknown command or flag, block status without a context', async (t) => {
    const { address } = await serve(t, { readOnly: true });
    const c = await NbdClient.connect(address, { structuredReplies: true });
    const err = async (type: number, flags: number, off: number, len: number, payload?: Uint8Array) => (await c.request(type, flags, off, len, payload)).error;
    assert.equal(await err(C.NBD_CMD_READ, 0, SIZE - 512, 1024), C.NBD_EINVAL);
    assert.equal(await err(C.NBD_CMD_READ, 0, 2 ** 62, 512), C.NBD_EINVAL);
    assert.equal(await err(C.NBD_CMD_WRITE, 0, 0, 4, new Uint8Array(4)), C.NBD_EPERM);
    assert.equal(await err(C.NBD_CMD_WRITE_ZEROES, 0, 0, 4096), C.NBD_EPERM);
    assert.equal(await err(C.NBD_CMD_TRIM, 0, 0, 4096), C.NBD_EPERM);
    assert.equal(await err(99, 0, 0, 0), C.NBD_EINVAL);
    assert.equal(await err(C.NBD_CMD_READ, C.NBD_CMD_FLAG_NO_HOLE, 0, 512), C.NBD_EINVAL);
    assert.equal(await err(C.NBD_CMD_BLOCK_STATUS, 0, 0, 512), C.NBD_EINVAL);
    assert.equal(await err(C.NBD_CMD_READ, 0, 0, 64 * 1024 * 1024), C.NBD_EINVAL);
    // Still healthy afterwards.
    assert.equal((await c.read(0, 512)).length, 512);
    await c.disconnect();
  });

  test('writes past the end get ENOSPC; fast zeroing a raw image gets ENOTSUP and changes nothing', async (t) => {
    const { address, dev } = await serve(t);
    const c = await NbdClient.connect(address);
    assert.equal((await c.request(C.NBD_CMD_WRITE, 0, SIZE - 2, 4, new Uint8Array(4))).error, C.NBD_ENOSPC);
    assert.equal((await c.request(C.NBD_CMD_WRITE_ZEROES, 0, SIZE, 512)).error, C.NBD_ENOSPC);
    const before = await bytesOf(dev, 0, 4096);
    assert.equal((await c.request(C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_FLAG_FAST_ZERO, 0, 4096)).error, C.NBD_ENOTSUP);
    assert.deepEqual(await bytesOf(dev, 0, 4096), before);
    await c.disconnect();
  });

  test('an oversized write is refused and its payload skipped; the connection goes on', async (t) => {
    const { address } = await serve(t, { limits: { maxOptionLength: 65536, maxPayload: 4096 } });
    const c = await NbdClient.connect(address);
    assert.equal((await c.request(C.NBD_CMD_WRITE, 0, 0, 8192, new Uint8Array(8192))).error, C.NBD_EINVAL);
    await c.write(0, new Uint8Array(4096).fill(5));
    assert.deepEqual(await c.read(0, 4096), new Uint8Array(4096).fill(5));
    await c.disconnect();
  });
});

describe('concurrency and robustness', () => {
  test('many requests in flight: each reply matches its request; overlapping writes land in order', async (t) => {
    const { address, dev } = await serve(t, { maxInFlight: 4 });
    const c = await NbdClient.connect(address, { structuredReplies: true });
    const writes = Array.from({ length: 20 }, (_, i) => c.write(0, new Uint8Array(65536).fill(i + 1)));
    const reads = Array.from({ length: 20 }, (_, i) => c.read(131072 + i * 4096, 4096));
    await Promise.all(writes);
    const got = await Promise.all(reads);
    for (let i = 0; i < 20; i++) assert.deepEqual(got[i], await bytesOf(dev, 131072 + i * 4096, 4096));
    assert.deepEqual(await bytesOf(dev, 0, 65536), new Uint8Array(65536).fill(20));
    await c.disconnect();
  });

  test('large writes sent in pieces, with reads between them, land whole (payloads read straight from the socket)', async (t) => {
    const { address, dev } = await serve(t, { maxInFlight: 4 });
    const c = await NbdClient.connect(address, { structuredReplies: true });
    const data = randomBytes(SIZE, 11);
    const pending: Promise<unknown>[] = [];
    for (let i = 0; i < 8; i++) {
      const size = 98304 + i * 4099;
      const off = (i * 131072) % (SIZE - size);
      pending.push(c.write(off, data.subarray(off, off + size)));
      if (i % 3 === 1) pending.push(c.read(0, 4096));
      await new Promise((resolve) => setImmediate(resolve));
    }
    await Promise.all(pending);
    for (let i = 0; i < 8; i++) {
      const size = 98304 + i * 4099;
      const off = (i * 131072) % (SIZE - size);
      assert.deepEqual(await bytesOf(dev, off, size), data.subarray(off, off + size));
    }
    await c.write(0, data);
    assert.deepEqual(await c.read(0, SIZE), data);
    await c.disconnect();
  });

  test('garbage from one client drops only that client', async (t) => {
    const { address } = await serve(t);
    const good = await NbdClient.connect(address);
    const bad = connect(address.path);
    const badClosed = new Promise((resolve) => bad.once('close', resolve));
    bad.on('error', () => undefined);
    bad.on('data', () => bad.write(new Uint8Array(64).fill(0x5a))); // flags with unknown bits, then junk
    await badClosed;
    const junkAfterGo = await NbdClient.connect(address);
    const closed = new Promise((resolve) => junkAfterGo.socket.once('close', resolve));
    junkAfterGo.socket.write(new Uint8Array(28).fill(0xee));
    await closed;
    assert.equal((await good.read(0, 512)).length, 512);
    await good.disconnect();
  });

  test('a client that vanishes mid-write leaves the image untouched and the server serving', async (t) => {
    const { address, dev } = await serve(t);
    const before = await bytesOf(dev, 0, 65536);
    const c = await NbdClient.connect(address);
    c.socket.write(new Writer(28).u32(C.NBD_REQUEST_MAGIC).u16(0).u16(C.NBD_CMD_WRITE).u64(1).u64(0).u32(65536).bytes);
    c.socket.write(new Uint8Array(1000).fill(0xff)); // then gone
    c.destroy();
    const other = await NbdClient.connect(address);
    assert.deepEqual(await other.read(0, 65536), before);
    await other.disconnect();
  });

  test('a client that vanishes with requests in flight does not disturb the next one', async (t) => {
    const { address, dev } = await serve(t);
    const c = await NbdClient.connect(address);
    const pending = Array.from({ length: 8 }, (_, i) => c.write(i * 65536, new Uint8Array(65536).fill(0x77)).catch(() => undefined));
    c.destroy();
    await Promise.all(pending);
    const other = await NbdClient.connect(address);
    const seen = await other.read(0, 8 * 65536);
    assert.deepEqual(seen, await bytesOf(dev, 0, 8 * 65536));
    await other.disconnect();
  });

  test('close() lets running requests finish and answers them, then ends the connections', async (t) => {
    const { address, server, dev } = await serve(t);
    // Hold the device's write until the server has been told to close.
    let entered!: () => void;
    const writeEntered = new Promise<void>((r) => (entered = r));
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const realWrite = dev.write.bind(dev);
    dev.write = async (off, data, options) => {
      entered();
      await gate;
      return realWrite(off, data, options);
    };
    const c = await NbdClient.connect(address);
    const data = randomBytes(65536, 11);
    const write = c.write(0, data);
    await writeEntered;
    let closed = false;
    const closing = server.close().then(() => (closed = true));
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(closed, false, 'close waits for the running write');
    release();
    await write; // answered, not cut off
    await closing;
    assert.deepEqual(await bytesOf(dev, 0, 65536), data);
    await assert.rejects(c.read(0, 512));
  });

  test('with maxClients 1 a second client waits until the first leaves', async (t) => {
    const { address } = await serve(t, { maxClients: 1 });
    const first = await NbdClient.connect(address);
    let secondReady = false;
    const second = NbdClient.connect(address).then((c) => {
      secondReady = true;
      return c;
    });
    assert.equal((await first.read(0, 512)).length, 512);
    assert.equal(secondReady, false);
    await first.disconnect();
    const c2 = await second;
    assert.equal((await c2.read(0, 512)).length, 512);
    await c2.disconnect();
  });

  test('a non-persistent server stops after its last client', async (t) => {
    const { address, server } = await serve(t, { persistent: false });
    const c = await NbdClient.connect(address);
    await c.disconnect();
    await server.stopped;
    assert.equal(server.clients, 0);
  });
});
