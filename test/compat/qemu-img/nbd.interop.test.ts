/**
 * compat/qemu-img opens NBD exports (driver=nbd options, nbd+unix:// and nbd:unix: names, json:
 * names) as QEMU's nbd driver does: map shows the server's block status, of base:allocation or of
 * the context x-dirty-bitmap names, the same as qemu-img's; info, compare and convert read them.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, run, runOk, scratch } from '../../support/qemu.js';
import { nbdTargetOf } from '#src/compat/nbd-store.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

/** qemu-nbd serving `image` read-only with allocation depth on a socket in `dir`, until the test ends. */
async function serve(t: TestContext, dir: string, image: string): Promise<string> {
  const sock = join(dir, 'nbd.sock');
  const pidFile = join(dir, 'nbd.pid');
  await runOk('qemu-nbd', ['--fork', '--persistent', '--pid-file', pidFile, '-r', '-f', 'qcow2', '-A', '-B', 'b0', '-k', sock, image]);
  const pid = Number((await readFile(pidFile, 'utf8')).trim());
  t.after(() => {
    try {
      process.kill(pid);
    } catch {
      // already gone
    }
  });
  return sock;
}

test('map, info, compare and convert of an NBD export match qemu-img', needs('qemu-img', 'qemu-io', 'qemu-nbd'), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await runOk('qemu-img', ['create', '-f', 'qcow2', base, '4M']);
  await runOk('qemu-io', ['-c', 'w 0 2M', '-f', 'qcow2', base]);
  await runOk('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '4M']);
  await runOk('qemu-img', ['bitmap', '--add', top, 'b0']);
  await runOk('qemu-io', ['-c', 'w 1M 1M', '-f', 'qcow2', top]);
  const sock = await serve(t, dir, top);
  const opts = `driver=nbd,server.type=unix,server.path=${sock}`;
  const same = async (args: string[]) => {
    const ours = await run(COMPAT_QEMU_IMG, args);
    const theirs = await run('qemu-img', args);
    assert.equal(ours.code, theirs.code, `${args.join(' ')}: ${ours.stderr}`);
    assert.equal(ours.stdout, theirs.stdout, args.join(' '));
  };
  for (const extra of ['', ',x-dirty-bitmap=qemu:allocation-depth', ',x-dirty-bitmap=qemu:dirty-bitmap:b0']) {
    await same(['map', '--output=json', '--image-opts', opts + extra]);
  }
  await same(['map', '--output=json', `nbd+unix:///?socket=${sock}`]);
  await same(['map', `nbd:unix:${sock}`]);
  await same(['map', '--output=json', `json:{"driver": "nbd", "server": {"type": "unix", "path": "${sock}"}}`]);
  await same(['compare', '-f', 'qcow2', top, `nbd+unix:///?socket=${sock}`]);
  const out = join(dir, 'copy.raw');
  const r = await run(COMPAT_QEMU_IMG, ['convert', '-O', 'raw', `nbd+unix:///?socket=${sock}`, out]);
  assert.equal(r.code, 0, r.stderr);
  await same(['compare', '-f', 'qcow2', '-F', 'raw', top, out]);
  const info = await run(COMPAT_QEMU_IMG, ['info', '--output=json', `nbd+unix:///?socket=${sock}`]);
  assert.equal(info.code, 0, info.stderr);
  assert.equal(JSON.parse(info.stdout)['virtual-size'], 4 << 20);
});

test('the NBD names QEMU accepts name the same exports', () => {
  assert.deepEqual(nbdTargetOf('nbd://example.org:10810/disk'), { address: { host: 'example.org', port: 10810 }, exportName: 'disk' });
  assert.deepEqual(nbdTargetOf('nbd://127.0.0.1'), { address: { host: '127.0.0.1', port: 10809 }, exportName: '' });
  assert.deepEqual(nbdTargetOf('nbd+unix:///disk?socket=/run/s'), { address: { path: '/run/s' }, exportName: 'disk' });
  assert.deepEqual(nbdTargetOf('nbd:unix:/run/s:exportname=disk'), { address: { path: '/run/s' }, exportName: 'disk' });
  assert.deepEqual(nbdTargetOf('nbd:localhost:10809'), { address: { host: 'localhost', port: 10809 }, exportName: '' });
  assert.equal(nbdTargetOf('/tmp/disk.img'), undefined);
});
