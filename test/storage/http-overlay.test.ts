/**
 * A local qcow2 file as the writable layer over a remote image: `qcow create -b URL` makes an
 * overlay whose backing file is fetched lazily over HTTP, and writes stay in the local file.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { needsNginx, startNginx } from '../support/http-servers.js';
import { needs, qcowOk, qemuImg, randomBytes, scratch, sha256 } from '../support/qemu.js';

test('a local qcow2 overlay over a remote qcow2 base takes writes and leaves the base untouched', { ...needs('qemu-img'), ...needsNginx() }, async (t) => {
  const dir = await scratch(t);
  const www = join(dir, 'www');
  await mkdir(www);
  const content = new Uint8Array(2 * 1024 * 1024);
  content.set(randomBytes(300_000, 9), 100_000);
  await writeFile(join(dir, 'src.raw'), content);
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'src.raw'), join(www, 'base.qcow2')]);
  const before = sha256(await readFile(join(www, 'base.qcow2')));
  const nginx = await startNginx(t, www, join(dir, 'nginx'));

  const overlay = join(dir, 'local.qcow2');
  await qcowOk(['create', '-q', '-f', 'qcow2', '-b', `${nginx.url}base.qcow2`, '-F', 'qcow2', overlay]);
  await qcowOk(['io', '-c', 'write -P 0x77 64k 64k', overlay]);
  const out = join(dir, 'out.raw');
  await qcowOk(['convert', '-O', 'raw', overlay, out]);
  const expected = content.slice();
  expected.fill(0x77, 65536, 131072);
  assert.equal(sha256(await readFile(out)), sha256(expected));
  // The remote base is as it was; the local file holds only what was written (plus metadata).
  assert.equal(sha256(await readFile(join(www, 'base.qcow2'))), before);
  const info = JSON.parse((await qcowOk(['info', '--output=json', overlay])).stdout);
  assert.equal(info['backing-filename'], `${nginx.url}base.qcow2`);
  assert.ok(info['actual-size'] < 1024 * 1024);
  // qemu finds the overlay's own metadata consistent (it does not follow the URL: -U, no backing read needed).
  await qemuImg(['check', '-U', overlay]);
});
