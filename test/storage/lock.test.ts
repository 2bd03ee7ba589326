import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileStore } from '#src/storage/file.node.js';
import { qcow, scratch } from '../support/qemu.js';
import { QcowError } from '#src/core/errors.js';

// These tests are about the fallback lock file (no host addon), for this process and the qcow
// processes it starts; QEMU-compatible locks are tested in qemu-lock.test.ts. The addon is loaded
// on first use, after this line.
process.env.QCOW_NO_NATIVE = '1';

test('a second writer is refused while one holds the image; readers may share', async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'disk.raw');
  await writeFile(img, new Uint8Array(65536));
  const writer = await FileStore.open(img, { readOnly: false });
  try {
    // Another process (our CLI) is refused with one clear line...
    const r = await qcow(['io', '-f', 'raw', '-c', 'write -P 1 0 512', img]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^qcow: .*disk\.raw: Failed to get "write" lock: the image is open for writing by process \d+\n$/);
    // ...even through another spelling of the same file,
    await symlink(img, join(dir, 'alias.raw'));
    await assert.rejects(FileStore.open(join(dir, 'alias.raw'), { readOnly: false }), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_LOCKED');
    // ...while readers are not.
    const read = await qcow(['io', '-f', 'raw', '-r', '-c', 'read -P 0 0 512', img]);
    assert.equal(read.code, 0, read.stderr);
  } finally {
    await writer.close();
  }
  // Released on close: the next writer gets it.
  const again = await qcow(['io', '-f', 'raw', '-c', 'write -P 1 0 512', img]);
  assert.equal(again.code, 0, again.stderr);
});

test('a lock left by a process that died is taken over', async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'disk.raw');
  await writeFile(img, new Uint8Array(4096));
  // Hold the lock from a child that is then killed without releasing it.
  const holder = await FileStore.open(img, { readOnly: false });
  // This image's lock file (the folder is shared with every other qcow process on the machine:
  // only this one is ours to touch). Pretend its owner is a pid that cannot exist.
  const { stat, readFile } = await import('node:fs/promises');
  const st = await stat(img);
  const lockFile = join(tmpdir(), 'qcow-locks', `${st.dev}-${st.ino}.lock`);
  assert.equal(await readFile(lockFile, 'utf8'), String(process.pid));
  await writeFile(lockFile, '4194999');
  const next = await FileStore.open(img, { readOnly: false });
  await next.close();
  await holder.close().catch(() => undefined);
});

test('a lock naming a live process that does not have the image open is stale (pids are reused)', async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'disk.raw');
  await writeFile(img, new Uint8Array(4096));
  const { stat, readFile } = await import('node:fs/promises');
  const st = await stat(img);
  const lockFile = join(tmpdir(), 'qcow-locks', `${st.dev}-${st.ino}.lock`);
  // A lock file left behind for this inode, naming a process that is alive but is not using the
  // image: our parent (the test runner), as a recycled pid would.
  const holder = await FileStore.open(img, { readOnly: false });
  await holder.close();
  await writeFile(lockFile, String(process.ppid));
  const r = await qcow(['io', '-f', 'raw', '-c', 'write -P 7 0 512', img]);
  assert.equal(r.code, 0, r.stderr);
  // While this process really holds the image open, another writer is still refused.
  const writer = await FileStore.open(img, { readOnly: false });
  try {
    assert.equal((await readFile(lockFile, 'utf8')).trim(), String(process.pid));
    const refused = await qcow(['io', '-f', 'raw', '-c', 'write -P 8 0 512', img]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /Failed to get "write" lock: the image is open for writing by process \d+/);
  } finally {
    await writer.close();
  }
});

test('the shared lock folder is made writable by every user (sticky, like /tmp), whatever the umask', async (t) => {
  const { run, QCOW_BIN } = await import('../support/qemu.js');
  const { stat } = await import('node:fs/promises');
  const dir = await scratch(t);
  const img = join(dir, 'disk.raw');
  await writeFile(img, new Uint8Array(4096));
  // A fresh temp dir for the child, so it makes the folder itself; sh applies umask 022 first.
  const tmp = join(dir, 'tmp');
  const { mkdir } = await import('node:fs/promises');
  await mkdir(tmp);
  const r = await run('sh', ['-c', `umask 022; exec "$0" "$@"`, QCOW_BIN, 'io', '-f', 'raw', '-c', 'write -P 3 0 512', img], { env: { ...process.env, TMPDIR: tmp } });
  assert.equal(r.code, 0, r.stderr);
  assert.equal((await stat(join(tmp, 'qcow-locks'))).mode & 0o7777, 0o1777);
});
