/**
 * bin/qcow keeps NODE_EXTRA_CA_CERTS out of Node's start-up and loads it on the first https
 * request (see bin/qcow and deferred-ca.node.ts). An https image served with a certificate from a
 * private CA opens exactly when that CA is named, whether it is named on the command line or as a
 * backing file inside a local image, and commands that use no https never read the file.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI, qcowOk, QCOW_BIN, run, scratch, sha256 } from '../support/qemu.js';
import { honourRange, startNodeServer } from '../support/http-servers.js';
import { deferredCaFetch } from '#src/storage/deferred-ca.node.js';

const TLS = fileURLToPath(new URL('../../test/storage/fixture/tls/', import.meta.url));
const PRIVATE_CA = join(TLS, 'ca.pem');

/** The environment without any extra CA, plus `extra`. */
function env(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const e = { ...process.env, ...extra };
  delete e.NODE_EXTRA_CA_CERTS;
  delete e.QCOW_DEFERRED_CA_CERTS;
  return { ...e, ...extra };
}

test('https images from a private CA open when NODE_EXTRA_CA_CERTS names it, and only then', async (t) => {
  const dir = await scratch(t);
  await qcowOk(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '4M']);
  await qcowOk(['io', '-c', 'write -P 0x5a 512k 1M', join(dir, 'base.qcow2')]);
  const server = await startNodeServer(t, dir, honourRange, { cert: await readFile(join(TLS, 'server.pem'), 'utf8'), key: await readFile(join(TLS, 'server.key'), 'utf8') });
  const url = server.url + 'base.qcow2';
  await qcowOk(['convert', '-O', 'raw', join(dir, 'base.qcow2'), join(dir, 'expected.raw')]);
  const expected = sha256(await readFile(join(dir, 'expected.raw')));

  await t.test('named on the command line', async () => {
    const r = await run(QCOW_BIN, ['convert', '-O', 'raw', url, join(dir, 'a.raw')], { env: env({ NODE_EXTRA_CA_CERTS: PRIVATE_CA }) });
    assert.equal(r.stderr, '');
    assert.equal(r.code, 0);
    assert.equal(sha256(await readFile(join(dir, 'a.raw'))), expected);
  });

  await t.test('named as the backing file of a local image', async () => {
    const top = join(dir, 'top.qcow2');
    await qcowOk(['create', '-q', '-f', 'qcow2', '-b', url, '-F', 'qcow2', '-u', top, '4M']);
    const r = await run(QCOW_BIN, ['convert', '-O', 'raw', top, join(dir, 'b.raw')], { env: env({ NODE_EXTRA_CA_CERTS: PRIVATE_CA }) });
    assert.equal(r.stderr, '');
    assert.equal(r.code, 0);
    assert.equal(sha256(await readFile(join(dir, 'b.raw'))), expected);
  });

  await t.test('without the CA the certificate is refused in one line', async () => {
    const r = await run(QCOW_BIN, ['info', url], { env: env() });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /^qcow: [^\n]*certificate is not trusted[^\n]*\n$/);
  });
});

test('a command without https never reads the deferred file (node itself would, at start-up)', async (t) => {
  const dir = await scratch(t);
  const image = join(dir, 'x.qcow2');
  await qcowOk(['create', '-q', '-f', 'qcow2', image, '1M']);
  const missing = join(dir, 'no-such-ca.pem');
  // Node warns about an unreadable NODE_EXTRA_CA_CERTS as it starts: proof the file is read then.
  const direct = await run(process.execPath, [CLI, 'info', image], { env: env({ NODE_EXTRA_CA_CERTS: missing }) });
  assert.equal(direct.code, 0);
  assert.match(direct.stderr, /no-such-ca\.pem/);
  const launched = await run(QCOW_BIN, ['info', image], { env: env({ NODE_EXTRA_CA_CERTS: missing }) });
  assert.equal(launched.code, 0);
  assert.equal(launched.stderr, '');
});

test('without a deferred file the global fetch is used', () => {
  assert.equal(deferredCaFetch({}), undefined);
  assert.equal(typeof deferredCaFetch({ QCOW_DEFERRED_CA_CERTS: PRIVATE_CA }), 'function');
});
