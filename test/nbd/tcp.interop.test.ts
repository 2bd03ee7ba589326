/**
 * NBD over TCP (`nbd://HOST:PORT/EXPORT`): a qemu-nbd export on 127.0.0.1 opened by our CLI
 * (info, map, io, convert, compare), by compat/qemu-img and compat/qemu-io beside the real
 * programs, and by the library's NbdClient; and `qcow serve` on TCP opened by QEMU's programs
 * and our CLI. Read, write and map each way.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI, needs, qemuImg, qemuIo, run, runOk, scratch } from '../support/qemu.js';
import { NbdClient } from '#src/node.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../compat/qemu-img', import.meta.url));
const COMPAT_QEMU_IO = fileURLToPath(new URL('../../compat/qemu-io', import.meta.url));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A TCP port nobody listens on just now. */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** A 4 MiB qcow2 image with 0x77 in its first 64 KiB. */
async function image(dir: string): Promise<string> {
  const file = join(dir, 'n.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '4M']);
  await qemuIo(['-c', 'write -q -P 0x77 0 64k', file]);
  return file;
}

/** qemu-nbd serving `file` (qcow2) read-write on 127.0.0.1 until the test ends; its nbd:// URL. */
async function qemuNbd(t: TestContext, dir: string, file: string): Promise<string> {
  const port = await freePort();
  const pidFile = join(dir, 'qemu-nbd.pid');
  await runOk('qemu-nbd', ['--fork', '--persistent', '--pid-file', pidFile, '-b', '127.0.0.1', '-p', String(port), '-x', 'exp', '-f', 'qcow2', file]);
  const pid = Number((await readFile(pidFile, 'utf8')).trim());
  t.after(() => {
    try {
      process.kill(pid);
    } catch {
      // already gone
    }
  });
  return `nbd://127.0.0.1:${port}/exp`;
}

/** `qcow serve` of `file` on 127.0.0.1 (persistent) until the test ends; its nbd:// URL. */
async function qcowServe(t: TestContext, dir: string, file: string): Promise<string> {
  const port = await freePort();
  const pidFile = join(dir, 'qcow-serve.pid');
  const child = spawn(process.execPath, [CLI, 'serve', '-b', '127.0.0.1', '-p', String(port), '-x', 'exp', '-t', '--pid-file', pidFile, file], { stdio: 'ignore' });
  t.after(() => void child.kill('SIGTERM'));
  for (let i = 0; i < 400 && !(await stat(pidFile).catch(() => undefined)); i++) await sleep(25);
  return `nbd://127.0.0.1:${port}/exp`;
}

const qcow = (args: string[]) => runOk(process.execPath, [CLI, ...args]);
const noTimes = (s: string) => s.replace(/\d+ ops;.*\n/g, '');

test('a qemu-nbd TCP export: our CLI reads, writes, maps, converts and compares it', needs('qemu-img', 'qemu-io', 'qemu-nbd'), async (t) => {
  const dir = await scratch(t);
  const url = await qemuNbd(t, dir, await image(dir));
  assert.match((await qcow(['info', url])).stdout, /^image: nbd:\/\/127\.0\.0\.1:\d+\/exp\nfile format: raw\nvirtual size: 4 MiB \(4194304 bytes\)\ndisk size: unavailable\n/);
  const io = await qcow(['io', '-c', 'read -P 0x77 0 64k', '-c', 'write -P 0x13 64k 4k', '-c', 'read -P 0x13 64k 4k', url]);
  assert.doesNotMatch(io.stdout, /fail/i);
  assert.equal((await qcow(['map', '--output=json', url])).stdout, (await qemuImg(['map', '--output=json', url])).stdout);
  const copy = join(dir, 'c.qcow2');
  await qcow(['convert', '-O', 'qcow2', url, copy]);
  assert.equal((await qemuImg(['compare', '-f', 'qcow2', copy, url])).stdout, 'Images are identical.\n');
  assert.equal((await qcow(['compare', copy, url])).code, 0);
});

test('a qemu-nbd TCP export: compat/qemu-img and compat/qemu-io say what QEMU\'s say', needs('qemu-img', 'qemu-io', 'qemu-nbd'), async (t) => {
  const dir = await scratch(t);
  const url = await qemuNbd(t, dir, await image(dir));
  const port = /:(\d+)\//.exec(url)![1]!;
  const same = async (prog: string, ours: string, args: string[]) => {
    const a = await run(ours, args);
    const b = await run(prog, args);
    assert.deepEqual({ code: a.code, out: noTimes(a.stdout), err: a.stderr }, { code: b.code, out: noTimes(b.stdout), err: b.stderr }, `${prog} ${args.join(' ')}`);
  };
  await same('qemu-img', COMPAT_QEMU_IMG, ['info', url]);
  await same('qemu-img', COMPAT_QEMU_IMG, ['info', '--output=json', url]);
  await same('qemu-io', COMPAT_QEMU_IO, ['-f', 'raw', '-c', 'read -P 0x77 0 64k', '-c', 'write -P 0x12 64k 4k', '-c', 'read -P 0x12 64k 4k', url]);
  await same('qemu-img', COMPAT_QEMU_IMG, ['map', '--output=json', url]);
  await same('qemu-img', COMPAT_QEMU_IMG, ['map', '--output=json', '--image-opts', `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=exp`]);
  await same('qemu-img', COMPAT_QEMU_IMG, ['map', `nbd:127.0.0.1:${port}:exportname=exp`]);
});

test('the library\'s NbdClient over TCP: read, write and block status of a qemu-nbd export', needs('qemu-img', 'qemu-io', 'qemu-nbd'), async (t) => {
  const dir = await scratch(t);
  const url = await qemuNbd(t, dir, await image(dir));
  const port = Number(/:(\d+)\//.exec(url)![1]);
  const client = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'exp', baseAllocation: true });
  try {
    assert.equal(client.size, 4 << 20);
    assert.ok((await client.read(0, 65536)).every((b) => b === 0x77));
    await client.write(65536, new Uint8Array(4096).fill(0x21));
    assert.ok((await client.read(65536, 4096)).every((b) => b === 0x21));
    const [first] = await client.blockStatus(0, 4 << 20);
    assert.equal(first!.flags & 1, 0, 'the written start is data');
    await client.flush();
  } finally {
    await client.disconnect();
  }
  assert.doesNotMatch((await qemuIo(['-f', 'raw', '-c', 'read -P 0x21 64k 4k', url])).stdout, /fail/i);
});

test('qcow serve on TCP: qemu-io, qemu-img and our CLI read, write and map it', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const file = await image(dir);
  const url = await qcowServe(t, dir, file);
  assert.doesNotMatch((await qemuIo(['-f', 'raw', '-c', 'read -P 0x77 0 64k', '-c', 'write -P 0x31 1M 64k', url])).stdout, /fail/i);
  assert.doesNotMatch((await qcow(['io', '-c', 'read -P 0x31 1M 64k', '-c', 'write -P 0x32 2M 4k', url])).stdout, /fail/i);
  const theirs = (await qemuImg(['map', '--output=json', url])).stdout;
  assert.equal((await qcow(['map', '--output=json', url])).stdout, theirs);
  assert.equal((await run(COMPAT_QEMU_IMG, ['map', '--output=json', url])).stdout, theirs);
  assert.match(theirs, /"start": 2097152, "length": 65536, .*"data": true/);
});
