/**
 * compat/qemu-io reads an NBD export (qemu-nbd's) by the names qemu-io accepts for one
 * (`nbd:unix:PATH`, `nbd+unix:///NAME?socket=PATH`, `driver=nbd` options), with qemu-io's output.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { maskQemuIoTiming, needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** qemu-nbd serving `args`, on a Unix socket, until the test ends. */
async function serve(t: TestContext, dir: string, args: string[]): Promise<string> {
  const sock = join(dir, `nbd-${Math.random().toString(36).slice(2)}.sock`);
  const pidFile = `${sock}.pid`;
  const child = spawn('qemu-nbd', ['-k', sock, '--pid-file', pidFile, ...args], { stdio: 'ignore' });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  t.after(async () => {
    child.kill('SIGTERM');
    await exited;
  });
  for (let i = 0; i < 400 && !(await stat(pidFile).catch(() => undefined)); i++) await sleep(25);
  return sock;
}

test('compat/qemu-io reads NBD exports as qemu-io does, by every name for one', needs('qemu-img', 'qemu-io', 'qemu-nbd'), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 't.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
  await qemuIo(['-c', 'write -P 0xa 0x1000 0x1000', img]);
  await qemuImg(['snapshot', '-c', 'sn1', img]);
  await qemuIo(['-c', 'write -P 0xc 0x1000 0x1000', img]);
  // The snapshot, exported under a name (the -l export is read-only), to client after client.
  const sock = await serve(t, dir, ['-t', '-x', 'exp', '-l', 'sn1', '-f', 'qcow2', img]);
  const names = [
    ['-f', 'raw', `nbd:unix:${sock}:exportname=exp`],
    ['-f', 'raw', `nbd+unix:///exp?socket=${sock}`],
    ['--image-opts', `driver=nbd,server.type=unix,server.path=${sock},export=exp`],
  ];
  for (const name of names) {
    for (const cmd of ['read -P 0xa 0x1000 0x1000', 'read -P 0 0 0x1000', 'read -P 0xc 0x1000 0x1000']) {
      const args = ['-r', '-c', cmd, ...name];
      const ours = await run(COMPAT_QEMU_IO, args);
      const theirs = await run('qemu-io', args);
      assert.deepEqual({ code: ours.code, out: maskQemuIoTiming(ours.stdout), err: ours.stderr }, { code: theirs.code, out: maskQemuIoTiming(theirs.stdout), err: theirs.stderr }, `${cmd} ${name.join(' ')}`);
    }
  }
});
