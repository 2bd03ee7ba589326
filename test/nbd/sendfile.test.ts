/**
 * Read replies the kernel sends from the image file (connection.ts sendFile / flush): a
 * read-only export of a local file answers plain-data reads with sendfile, and when the client
 * stops reading, the socket fills part way through a reply, the rest goes out in pieces, and later
 * replies wait in the outbox. Every reply must still arrive whole, in one piece, with the file's
 * bytes; a DISC must not cut off replies still queued.
 */
import assert from 'node:assert/strict';
import { open, writeFile } from 'node:fs/promises';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { rawFormat } from '#src/formats/raw/raw.js';
import { hostAddon } from '#src/host/native.node.js';
import { NbdServer } from '#src/nbd/server.js';
import { FileStore } from '#src/storage/file.node.js';
import { NbdClient } from '../support/nbd-client.js';
import { randomBytes, scratch } from '../support/qemu.js';

const SIZE = 8 << 20;
const canSend = !!hostAddon()?.sendFileCached;

async function serveFile(t: TestContext, content: Uint8Array) {
  const dir = await scratch(t);
  const file = join(dir, 'disk.raw');
  await writeFile(file, content);
  const store = await FileStore.open(file, { readOnly: true, cachedReadsInline: true });
  // Count the sendfile calls, and the pieces copied when the socket was full.
  let sends = 0;
  let pieces = 0;
  const send = store.sendCached;
  if (send) store.sendCached = (...args) => (sends++, send(...args));
  const readNow = store.readNow.bind(store);
  store.readNow = (offset, into) => (pieces++, readNow(offset, into));
  const dev = await rawFormat.open(store, { readOnly: true });
  const server = new NbdServer({ persistent: true, maxClients: 4, exp: { name: '', description: '', device: dev, readOnly: true } });
  const path = join(dir, 's.sock');
  await server.listen({ path });
  t.after(() => server.close());
  return { address: { path }, sends: () => sends, pieces: () => pieces };
}

/** Reads of every size class, large ones first so the socket fills while small ones queue behind. */
function plan(seed: number): { offset: number; length: number }[] {
  const out: { offset: number; length: number }[] = [];
  let x = seed;
  const next = () => ((x = (x * 1103515245 + 12345) >>> 0), x);
  for (let i = 0; i < 48; i++) {
    const length = i % 3 === 0 ? (1 << 20) + (next() % 4096) : i % 3 === 1 ? 256 * 1024 : 1 + (next() % 9000);
    out.push({ offset: next() % (SIZE - length), length });
  }
  return out;
}

for (const structuredReplies of [false, true]) {
  test(`${structuredReplies ? 'structured' : 'simple'} replies: pipelined reads from a client that stops reading arrive whole`, async (t) => {
    const content = randomBytes(SIZE, 7);
    const { address, sends, pieces } = await serveFile(t, content);
    const c = await NbdClient.connect(address, { structuredReplies });
    // Load the file into the page cache (sendfile is only used for cached ranges), then stall the
    // client so the server's socket fills up mid-reply.
    for (let o = 0; o < SIZE; o += 1 << 20) await c.read(o, 1 << 20);
    c.socket.pause();
    const reads = plan(structuredReplies ? 3 : 5).map((r) => c.read(r.offset, r.length).then((data) => ({ ...r, data })));
    await new Promise((resolve) => setTimeout(resolve, 200));
    c.socket.resume();
    for (const r of await Promise.all(reads)) assert.ok(Buffer.from(r.data).equals(content.subarray(r.offset, r.offset + r.length)), `read at ${r.offset}, ${r.length} bytes`);
    if (canSend) {
      assert.ok(sends() > 0, 'replies went through sendfile');
      assert.ok(pieces() > 0, 'the socket filled part way through a reply');
    }
    await c.disconnect();
  });
}

test('DISC after pipelined reads: every queued reply is sent before the server closes', async (t) => {
  const content = randomBytes(SIZE, 11);
  const { address } = await serveFile(t, content);
  const c = await NbdClient.connect(address, { structuredReplies: true });
  for (let o = 0; o < SIZE; o += 1 << 20) await c.read(o, 1 << 20);
  c.socket.pause();
  const reads = plan(9).map((r) => c.read(r.offset, r.length).then((data) => ({ ...r, data })));
  const closed = c.disconnect();
  await new Promise((resolve) => setTimeout(resolve, 100));
  c.socket.resume();
  for (const r of await Promise.all(reads)) assert.ok(Buffer.from(r.data).equals(content.subarray(r.offset, r.offset + r.length)));
  await closed;
});

test('growSendBuffer grows a socket send buffer, never shrinks it, and answers -1 for a file', { skip: !hostAddon()?.growSendBuffer && 'addon without growSendBuffer' }, async (t) => {
  const grow = hostAddon()!.growSendBuffer!;
  const dir = await scratch(t);
  const path = join(dir, 'g.sock');
  const server = createServer((s) => s.end());
  await new Promise<void>((resolve) => server.listen(path, resolve));
  t.after(() => server.close());
  const c = connect(path);
  await new Promise((resolve) => c.once('connect', resolve));
  const fd = (c as unknown as { _handle: { fd: number } })._handle.fd;
  const before = grow(fd, 0);
  assert.ok(before > 0);
  const after = grow(fd, 1 << 20);
  assert.ok(after >= before);
  assert.equal(grow(fd, 4096), after);
  c.destroy();
  const file = join(dir, 'f');
  await writeFile(file, 'x');
  const fh = await open(file);
  assert.equal(grow(fh.fd, 1 << 20), -1);
  await fh.close();
});
