/**
 * The NBD server as the package's users reach it: everything of qcow here comes from the
 * `qcow/node` entry point (the package importing itself by name, through package.json
 * `exports`), as `qcow serve` uses it. Our test client (test-support) plays the NBD client.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { createImage, openImage, serveNbd } from 'qcow/node';
import { NbdClient } from '../support/nbd-client.js';
import { randomBytes, scratch } from '../support/qemu.js';

const MiB = 1 << 20;
const READ_ONLY_FLAG = 1 << 1; // NBD_FLAG_READ_ONLY

test('serveNbd exports a qcow2 image on a Unix socket: a client writes and reads, and the server stops when it leaves', async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'disk.qcow2');
  await createImage(file, { format: 'qcow2', size: 4 * MiB });
  const disk = await openImage(file);
  const socket = join(dir, 'disk.sock');
  const server = await serveNbd(disk, { address: { path: socket }, exportName: 'disk', description: 'a test disk' });
  assert.equal(server.port, undefined);

  const client = await NbdClient.connect({ path: socket }, { exportName: 'disk' });
  assert.equal(client.size, 4 * MiB);
  assert.equal(client.description, 'a test disk');
  assert.equal(client.transmissionFlags & READ_ONLY_FLAG, 0);
  const data = randomBytes(65536, 7);
  await client.write(MiB, data);
  await client.flush();
  assert.deepEqual(await client.read(MiB, data.length), data);
  assert.equal(server.clients, 1);
  await client.disconnect();
  // Not persistent: the last client leaving stops the server; the device is still ours to close.
  await server.stopped;
  await disk.close();

  const again = await openImage(file, { readOnly: true });
  const back = new Uint8Array(data.length);
  await again.read(MiB, back);
  assert.deepEqual(back, data);
  await again.close();
});

test('serveNbd on TCP port 0 reports the port it took; a read-only export refuses writes and serves until closed', async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'disk.raw');
  await createImage(file, { format: 'raw', size: MiB });
  const disk = await openImage(file, { readOnly: true });
  t.after(() => disk.close());
  const server = await serveNbd(disk, { address: { port: 0 }, readOnly: true, persistent: true, maxClients: 2 });
  assert.ok(server.port! > 0);
  for (let i = 0; i < 2; i++) {
    const client = await NbdClient.connect({ port: server.port! });
    assert.ok(client.transmissionFlags & READ_ONLY_FLAG);
    await assert.rejects(client.write(0, new Uint8Array(512)), { errno: 1 }); // EPERM
    assert.deepEqual(await client.read(0, 4096), new Uint8Array(4096));
    await client.disconnect();
  }
  // Persistent: still listening after its clients left, until closed.
  const late = await NbdClient.connect({ port: server.port! });
  await late.disconnect();
  await server.close();
  await server.stopped;
});

test('serveNbd refuses a bitmap the device does not have, and a busy socket, before serving anything', async (t) => {
  const dir = await scratch(t);
  const raw = join(dir, 'disk.raw');
  await createImage(raw, { format: 'raw', size: MiB });
  const rawDisk = await openImage(raw, { readOnly: true });
  t.after(() => rawDisk.close());
  await assert.rejects(serveNbd(rawDisk, { address: { path: join(dir, 'a.sock') }, bitmap: 'chk' }), { code: 'QCOW_UNSUPPORTED' });

  const q = join(dir, 'disk.qcow2');
  await createImage(q, { format: 'qcow2', size: MiB });
  const qDisk = await openImage(q, { readOnly: true });
  t.after(() => qDisk.close());
  await assert.rejects(serveNbd(qDisk, { address: { path: join(dir, 'b.sock') }, bitmap: 'chk' }), { code: 'QCOW_INVALID_ARGUMENT', message: /Dirty bitmap 'chk' not found/ });

  const first = await serveNbd(qDisk, { address: { path: join(dir, 'c.sock') }, persistent: true });
  t.after(() => first.close());
  await assert.rejects(serveNbd(qDisk, { address: { path: join(dir, 'c.sock') } }), { code: 'QCOW_IO', message: /cannot listen on .*c\.sock: EADDRINUSE/ });
});
