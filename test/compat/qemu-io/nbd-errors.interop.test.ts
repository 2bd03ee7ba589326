/**
 * A request an NBD server fails: compat/qemu-io names the error the server sent, as qemu-io does
 * (NBD carries a few errno values; the server sends EINVAL for the others), instead of calling
 * every such failure an I/O error. The server is qemu-nbd over a blkdebug node that fails the
 * image's data writes with one errno at a time.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** qemu-nbd serving `name` (persistent, so that both clients connect), on a Unix socket, until `stop`. */
async function serve(t: TestContext, dir: string, name: string): Promise<{ sock: string; stop: () => Promise<void> }> {
  const sock = join(dir, `nbd-${Math.random().toString(36).slice(2)}.sock`);
  const pidFile = `${sock}.pid`;
  const child = spawn('qemu-nbd', ['-t', '-k', sock, '--pid-file', pidFile, name], { stdio: 'ignore' });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    child.kill('SIGTERM');
    await exited;
  };
  t.after(stop);
  for (let i = 0; i < 400 && !(await stat(pidFile).catch(() => undefined)); i++) await sleep(25);
  return { sock, stop };
}

test('compat/qemu-io: an NBD server\'s error reply reads as the errno it carries, as in qemu-io', needs('qemu-img', 'qemu-io', 'qemu-nbd'), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 't.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
  await qemuIo(['-c', 'write -P 1 0 64k', img]);
  // EINVAL, EIO, EPERM, ENOSPC, ENOMEM, EOVERFLOW travel as themselves; EACCES travels as EINVAL.
  const seen = new Set<string>();
  for (const errno of [22, 5, 1, 28, 12, 75, 13]) {
    const node = { driver: 'qcow2', file: { driver: 'blkdebug', 'inject-error': [{ event: 'write_aio', errno }], image: { driver: 'file', filename: img } } };
    const { sock, stop } = await serve(t, dir, `json:${JSON.stringify(node)}`);
    const uri = `nbd+unix:///?socket=${sock}`;
    const args = ['-f', 'raw', '-c', 'write -P 2 0 512', uri];
    const want = await run('qemu-io', args);
    const got = await run(COMPAT_QEMU_IO, args);
    assert.match(want.stdout, /^write failed: /, `errno ${errno}: ${want.stdout}${want.stderr}`);
    assert.deepEqual([got.code, got.stdout], [want.code, want.stdout], `errno ${errno}`);
    seen.add(want.stdout);
    await stop();
  }
  assert.ok(seen.has('write failed: Invalid argument\n') && seen.size >= 6, [...seen].join(''));
});
