import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HttpStore, httpOpener, withHttp } from '#src/storage/http.js';
import { fileOpener } from '#src/storage/file.node.js';
import { QcowError } from '#src/core/errors.js';
import { openImage } from '#src/chain/open.js';
import { builtinFormats } from '#src/formats/index.js';
import { deviceSha256, needs, qemuGuestSha256, randomBytes, scratch, sha256 } from '../support/qemu.js';
import { failFirst, honourRange, ignoreRange, needsNginx, startNginx, startNodeServer } from '../support/http-servers.js';

const MiB = 2 ** 20;
const CHUNK = MiB;

const isCode = (code: string) => (e: unknown) => e instanceof QcowError && e.code === code;

/** A scratch folder with `www/disk.raw` (9.5 MiB of random bytes) and a work folder for servers. */
async function site(t: Parameters<typeof scratch>[0]) {
  const dir = await scratch(t);
  const www = join(dir, 'www');
  const work = join(dir, 'work');
  await mkdir(www);
  await mkdir(work);
  const data = randomBytes(9 * MiB + 512 * 1024, 7);
  await writeFile(join(www, 'disk.raw'), data);
  return { www, work, data };
}

test('over nginx: size, content and reads past the end match the file', needsNginx(), async (t) => {
  const { www, work, data } = await site(t);
  const nginx = await startNginx(t, www, work);
  const store = await HttpStore.open(nginx.url + 'disk.raw', { chunkSize: CHUNK });
  t.after(() => store.close());
  assert.equal(store.readOnly, true);
  assert.equal(store.rangeRequests, true);
  assert.equal(await store.size(), data.length);

  const across = new Uint8Array(3 * MiB);
  assert.equal(await store.read(CHUNK - 100, across), across.length);
  assert.deepEqual(across, data.subarray(CHUNK - 100, CHUNK - 100 + across.length));

  const tail = new Uint8Array(4096).fill(0xee);
  assert.equal(await store.read(data.length - 1000, tail), 1000);
  assert.deepEqual(tail.subarray(0, 1000), data.subarray(data.length - 1000));
  assert.ok(tail.subarray(1000).every((b) => b === 0), 'bytes past the end read as zeros');

  const all = new Uint8Array(data.length);
  await store.read(0, all);
  assert.equal(sha256(all), sha256(data));
});

test('a first read into a chunk fetches its sixteenth; a second read there, or one that continues the last, fetches the rest of the chunk (nginx log)', needsNginx(), async (t) => {
  const { www, work, data } = await site(t);
  const nginx = await startNginx(t, www, work);
  const store = await HttpStore.open(nginx.url + 'disk.raw', { chunkSize: CHUNK });
  t.after(() => store.close());
  const PIECE = CHUNK / 16;
  const at = async (offset: number, length = 4096) => {
    const buf = new Uint8Array(length);
    await store.read(offset, buf);
    assert.deepEqual(buf, data.subarray(offset, offset + length), `bytes at ${offset}`);
  };
  await at(5 * MiB + 123); // a lone read: one piece
  await at(5 * MiB + 8192); // the same piece: cached
  await at(7 * MiB + 3 * PIECE + 5); // another chunk: one piece
  await at(5 * MiB + 5 * PIECE); // back in chunk 5: the rest of it, from the first piece not held
  await at(5 * MiB + 15 * PIECE + 100); // held now
  await at(8 * MiB - 4096, 4096); // chunk 7's last piece, a second read in chunk 7: the rest of chunk 7
  await at(8 * MiB, 4096); // continues the last read: all of chunk 8
  await at(8 * MiB + 10 * PIECE); // held
  const log = await nginx.accessLog();
  const r = (from: number, to: number) => [206, `bytes=${from}-${to - 1}`];
  assert.deepEqual(
    log.map((l) => [l.status, l.range]),
    [r(0, CHUNK), r(5 * MiB, 5 * MiB + PIECE), r(7 * MiB + 3 * PIECE, 7 * MiB + 4 * PIECE), r(5 * MiB + PIECE, 6 * MiB), r(7 * MiB + 4 * PIECE, 8 * MiB), r(8 * MiB, 9 * MiB)],
  );
  assert.equal(store.stats.requests, log.length);
  assert.equal(
    log.reduce((n, l) => n + l.bytes, 0),
    store.stats.bytesFetched,
  );
});

test('concurrent readers of one chunk share one request', needsNginx(), async (t) => {
  const { www, work, data } = await site(t);
  const nginx = await startNginx(t, www, work);
  const store = await HttpStore.open(nginx.url + 'disk.raw', { chunkSize: CHUNK });
  t.after(() => store.close());
  const bufs = Array.from({ length: 8 }, () => new Uint8Array(512));
  await Promise.all(bufs.map((b, i) => store.read(3 * MiB + i * 1000, b)));
  bufs.forEach((b, i) => assert.deepEqual(b, data.subarray(3 * MiB + i * 1000, 3 * MiB + i * 1000 + 512)));
  assert.equal(store.stats.requests, 2, 'the probe and one request for chunk 3');
});

test('the cache holds at most its byte budget, dropping the least recently used chunk', needsNginx(), async (t) => {
  const { www, work } = await site(t);
  const nginx = await startNginx(t, www, work);
  const store = await HttpStore.open(nginx.url + 'disk.raw', { chunkSize: CHUNK, cacheBytes: 2 * CHUNK });
  t.after(() => store.close());
  const whole = new Uint8Array(CHUNK);
  const b = new Uint8Array(1);
  for (const chunk of [1, 2, 3, 4]) {
    await store.read(chunk * CHUNK, b);
    await store.read(chunk * CHUNK + CHUNK / 2, b); // a second read: the rest of the chunk
    assert.ok(store.cachedBytes <= 2 * CHUNK, `${store.cachedBytes} bytes held`);
  }
  await store.read(4 * CHUNK, whole);
  const before = store.stats.requests;
  await store.read(4 * CHUNK + 100, b); // most recent: cached
  assert.equal(store.stats.requests, before);
  await store.read(1 * CHUNK + 100, b); // evicted: fetched again
  assert.equal(store.stats.requests, before + 1);
});

test('a server that ignores Range (200 with the whole body) is served from that one body', async (t) => {
  const { www, data } = await site(t);
  const srv = await startNodeServer(t, www, ignoreRange);
  const store = await HttpStore.open(srv.url + 'disk.raw', { chunkSize: CHUNK });
  t.after(() => store.close());
  assert.equal(store.rangeRequests, false);
  assert.equal(await store.size(), data.length);
  const buf = new Uint8Array(10_000);
  await store.read(7 * MiB + 3, buf);
  assert.deepEqual(buf, data.subarray(7 * MiB + 3, 7 * MiB + 3 + buf.length));
  assert.equal(srv.requests.length, 1);
});

test('...but not when the whole body is larger than maxWholeBodyBytes', async (t) => {
  const { www } = await site(t);
  const srv = await startNodeServer(t, www, ignoreRange);
  await assert.rejects(HttpStore.open(srv.url + 'disk.raw', { chunkSize: CHUNK, maxWholeBodyBytes: 4 * MiB }), (e: unknown) => {
    assert.ok(isCode('QCOW_UNSUPPORTED')(e));
    assert.match((e as Error).message, /ignores range requests.*maxWholeBodyBytes/);
    return true;
  });
});

test('transient failures (503, dropped connections, 429) are retried, then reads succeed', async (t) => {
  const { www, data } = await site(t);
  const srv = await startNodeServer(t, www, failFirst(3, honourRange));
  const store = await HttpStore.open(srv.url + 'disk.raw', { chunkSize: CHUNK, retryDelayMs: 1 });
  t.after(() => store.close());
  const buf = new Uint8Array(100);
  await store.read(2 * MiB, buf);
  assert.deepEqual(buf, data.subarray(2 * MiB, 2 * MiB + 100));
  assert.equal(store.stats.retries, 3);
});

test('a server that gives no total in Content-Range: the size comes from HEAD', async (t) => {
  const { www, data } = await site(t);
  const srv = await startNodeServer(t, www, (req, res, file) => {
    const writeHead = res.writeHead.bind(res) as (status: number, headers?: Record<string, string | number>) => typeof res;
    res.writeHead = ((status: number, headers?: Record<string, string | number>) =>
      writeHead(status, headers && typeof headers['Content-Range'] === 'string' ? { ...headers, 'Content-Range': headers['Content-Range'].replace(/\/\d+$/, '/*') } : headers)) as typeof res.writeHead;
    return honourRange(req, res, file);
  });
  const store = await HttpStore.open(srv.url + 'disk.raw', { chunkSize: CHUNK });
  t.after(() => store.close());
  assert.equal(await store.size(), data.length);
  assert.deepEqual(
    srv.requests.map((r) => r.method),
    ['GET', 'HEAD'],
  );
  const buf = new Uint8Array(100);
  await store.read(data.length - 50, buf);
  assert.deepEqual(buf.subarray(0, 50), data.subarray(data.length - 50));
});

test('after the last retry, a clear QCOW_IO error', async (t) => {
  const { www } = await site(t);
  const srv = await startNodeServer(t, www, failFirst(100, honourRange));
  await assert.rejects(HttpStore.open(srv.url + 'disk.raw', { retries: 2, retryDelayMs: 1 }), (e: unknown) => {
    assert.ok(isCode('QCOW_IO')(e));
    assert.match((e as Error).message, /gave up after 3 attempts/);
    assert.equal((e as QcowError).file, srv.url + 'disk.raw');
    return true;
  });
  assert.equal(srv.requests.length, 3);
});

test('a missing image is QCOW_NOT_FOUND, and is not retried', async (t) => {
  const { www } = await site(t);
  const srv = await startNodeServer(t, www, honourRange);
  await assert.rejects(HttpStore.open(srv.url + 'nope.qcow2'), isCode('QCOW_NOT_FOUND'));
  assert.equal(srv.requests.length, 1);
});

test('an AbortSignal stops a request in flight and every later read', async (t) => {
  const { www } = await site(t);
  let hang = false;
  const srv = await startNodeServer(t, www, (req, res, file) => (hang ? undefined : honourRange(req, res, file)));
  const ctl = new AbortController();
  const store = await HttpStore.open(srv.url + 'disk.raw', { chunkSize: CHUNK, signal: ctl.signal });
  t.after(() => store.close());
  hang = true; // the server now never answers
  const pending = store.read(4 * MiB, new Uint8Array(10));
  setTimeout(() => ctl.abort(), 20);
  await assert.rejects(pending, isCode('QCOW_ABORTED'));
  await assert.rejects(store.read(0, new Uint8Array(10)), isCode('QCOW_ABORTED'));
});

test('the store is read-only; the opener refuses to open URLs for writing', async (t) => {
  const { www } = await site(t);
  const srv = await startNodeServer(t, www, honourRange);
  const store = await HttpStore.open(srv.url + 'disk.raw');
  t.after(() => store.close());
  await assert.rejects(store.write(0, new Uint8Array(1)), isCode('QCOW_READ_ONLY'));
  await assert.rejects(store.truncate(0), isCode('QCOW_READ_ONLY'));
  await assert.rejects(httpOpener().open(srv.url + 'disk.raw', { readOnly: false }), isCode('QCOW_READ_ONLY'));
});

test('names inside a remote image resolve against its URL, never to local files', () => {
  const o = withHttp(fileOpener);
  assert.equal(o.resolve('base.qcow2', 'https://h.example/img/top.qcow2'), 'https://h.example/img/base.qcow2');
  assert.equal(o.resolve('../b/base.qcow2', 'https://h.example/img/top.qcow2'), 'https://h.example/b/base.qcow2');
  assert.equal(o.resolve('/etc/base.qcow2', 'https://h.example/img/top.qcow2'), 'https://h.example/etc/base.qcow2');
  assert.throws(() => o.resolve('file:///etc/passwd', 'https://h.example/img/top.qcow2'), isCode('QCOW_UNSUPPORTED'));
  assert.equal(o.resolve('base.qcow2', 'dir/top.qcow2'), 'dir/base.qcow2', 'local names still resolve as files');
  assert.equal(o.resolve('http://h.example/base.raw', 'dir/top.qcow2'), 'http://h.example/base.raw');
});

test('exists() tells a missing URL from a present one', async (t) => {
  const { www } = await site(t);
  const srv = await startNodeServer(t, www, honourRange);
  const o = withHttp(fileOpener);
  assert.equal(await o.exists!(srv.url + 'disk.raw'), true);
  assert.equal(await o.exists!(srv.url + 'missing.raw'), false);
});

test('a raw image opened by URL has the content qemu-img sees in the file', { ...needs('qemu-img'), ...needsNginx() }, async (t) => {
  const { www, work } = await site(t);
  const nginx = await startNginx(t, www, work);
  const dev = await openImage(nginx.url + 'disk.raw', { readOnly: true, opener: httpOpener({ chunkSize: CHUNK }), formats: builtinFormats() });
  t.after(() => dev.close());
  assert.equal(dev.format, 'raw');
  assert.equal(await deviceSha256(dev), await qemuGuestSha256(['-f', 'raw', join(www, 'disk.raw')]));
});
