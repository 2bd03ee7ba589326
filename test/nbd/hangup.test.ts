/**
 * A peer that goes away while the addon writes to it (sendfile to an NBD client's socket, splice
 * into a pipe) is named as Node names it, EPIPE or ECONNRESET, not EIO: the NBD connection then
 * closes quietly as it does when Node's own socket writes fail, and a pipe's writer can word the
 * reader's going. Before, the addon's errors had no name for these and `qcow serve` printed
 * "connection dropped: EIO, Broken pipe" when a client hung up with reads in flight.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, constants, openSync, writeFileSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { rawFormat } from '#src/formats/raw/raw.js';
import { hostAddon } from '#src/host/native.node.js';
import { NbdServer } from '#src/nbd/server.js';
import { FileStore } from '#src/storage/file.node.js';
import { NbdClient } from '../support/nbd-client.js';
import { randomBytes, scratch } from '../support/qemu.js';

const addon = hostAddon();
const gone = ['EPIPE', 'ECONNRESET'];

test('addon: splice into a pipe whose reader has gone rejects with EPIPE', { skip: !addon?.spliceToPipe && 'no spliceToPipe' }, async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'data');
  writeFileSync(file, randomBytes(65536, 3));
  const fifo = join(dir, 'fifo');
  execFileSync('mkfifo', [fifo]);
  const reader = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK);
  const writer = openSync(fifo, constants.O_WRONLY);
  const fd = openSync(file, 'r');
  t.after(() => (closeSync(writer), closeSync(fd)));
  closeSync(reader);
  await assert.rejects(addon!.spliceToPipe!(fd, 0, writer, 65536), (e: NodeJS.ErrnoException) => {
    assert.equal(e.code, 'EPIPE', String(e));
    assert.equal(e.syscall, 'splice');
    return true;
  });
});

test('addon: sendfile to a socket whose peer has gone throws EPIPE or ECONNRESET', { skip: !addon?.sendFileCached && 'no sendFileCached' }, async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'data');
  writeFileSync(file, randomBytes(65536, 4));
  const fd = openSync(file, 'r');
  t.after(() => closeSync(fd));
  const path = join(dir, 's.sock');
  let peer!: Socket;
  const accepted = new Promise<void>((resolve) => {
    const server = createServer((s) => ((peer = s), resolve()));
    server.listen(path);
    t.after(() => server.close());
  });
  const c = connect(path);
  c.on('error', () => undefined);
  await new Promise((resolve) => c.once('connect', resolve));
  await accepted;
  // Node must not see the peer's close and close the descriptor under us: it reads nothing.
  c.pause();
  (c as unknown as { _handle: { readStop(): void } })._handle.readStop();
  const socketFd = (c as unknown as { _handle: { fd: number } })._handle.fd;
  // The file is in the page cache (written a moment ago): the call sends.
  if (addon!.sendFileCached!(socketFd, Uint8Array.of(1), fd, 0, 4096) < 0) return t.skip('sendfile is not possible here');
  peer.destroy();
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.throws(
    () => {
      // The first write after the peer closed may still be taken (the peer answers it with a reset).
      for (let i = 0; i < 4; i++) addon!.sendFileCached!(socketFd, Uint8Array.of(1), fd, 0, 4096);
    },
    (e: NodeJS.ErrnoException) => gone.includes(e.code!) && e.code !== 'EIO',
  );
  c.destroy();
});

test('NBD: a client that hangs up with reads in flight is no error of the server', { skip: !addon?.sendFileCached && 'no sendFileCached' }, async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'disk.raw');
  writeFileSync(file, randomBytes(16 << 20, 5));
  const store = await FileStore.open(file, { readOnly: true, cachedReadsInline: true });
  let sends = 0;
  const send = store.sendCached;
  if (send) store.sendCached = (...args) => (sends++, send(...args));
  const dev = await rawFormat.open(store, { readOnly: true });
  const errors: unknown[] = [];
  const server = new NbdServer({
    persistent: true,
    maxClients: 4,
    exp: { name: '', description: '', device: dev, readOnly: true },
    onError: (e) => errors.push(e),
  });
  const path = join(dir, 's.sock');
  await server.listen({ path });
  t.after(() => server.close());
  for (let round = 0; round < 12; round++) {
    const c = await NbdClient.connect({ path });
    await c.read(0, 4096);
    // Many large reads the client never takes: the socket fills, replies wait, and the client goes.
    for (let i = 0; i < 24; i++) c.read((i << 20) % (15 << 20), 1 << 20).catch(() => undefined);
    c.socket.pause();
    await new Promise((resolve) => setTimeout(resolve, 5 + round * 5));
    c.destroy();
    await new Promise((resolve) => setTimeout(resolve, 30));
  }
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.ok(sends > 0, 'the replies went out with sendfile');
  assert.deepEqual(errors.map(String), []);
});
