/**
 * `qcow serve --copy-on-read`: what a client reads of an overlay is copied from the backing file
 * into the overlay, which then holds it alone; -r with it is refused.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { CLI, needs, qemuImg, qemuIo, run, scratch } from '../support/qemu.js';
import { serveQcow } from '../support/serve.js';

test('serve --copy-on-read copies what clients read into the overlay', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '4M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x5a 1M 128k', base]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  const served = await serveQcow(t, dir, ['-f', 'qcow2', '--copy-on-read', top]);
  const r = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 1M 128k', served.uri]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.doesNotMatch(r.stdout, /Pattern verification failed/);
  served.child.kill('SIGTERM');
  await served.exited;
  // The overlay alone (its backing file out of view) now holds the bytes read.
  const alone = `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: top } })}`;
  const check = await run('qemu-io', ['-r', '-c', 'read -P 0x5a 1M 128k', alone]);
  assert.doesNotMatch(check.stdout, /Pattern verification failed/, check.stdout);
  assert.equal(check.code, 0);
  const refused = await run(process.execPath, [CLI, 'serve', '-r', '--copy-on-read', '-k', join(dir, 'x.sock'), top]);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /copy-on-read on read-only/);
});
