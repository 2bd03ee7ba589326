/**
 * The HTTP store on Node's own client (node-fetch.node.ts, what the CLI and node-open use) behaves
 * as it does on the global fetch: ranges, servers that ignore them, retries of transient failures
 * (dropped connections included), sizes from HEAD, redirects, missing images, aborts, and a body
 * cut short mid-way.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HttpStore, type HttpStoreOptions } from '#src/storage/http.js';
import { nodeFetch } from '#src/storage/node-fetch.node.js';
import { QcowError } from '#src/core/errors.js';
import { randomBytes, scratch, sha256 } from '../support/qemu.js';
import { failFirst, honourRange, ignoreRange, startNodeServer } from '../support/http-servers.js';

const MiB = 2 ** 20;
const CHUNK = MiB;
const isCode = (code: string) => (e: unknown) => e instanceof QcowError && e.code === code;
const open = (url: string, o: HttpStoreOptions = {}) => HttpStore.open(url, { chunkSize: CHUNK, retryDelayMs: 1, ...o, fetch: nodeFetch() });

/** `www` served through `handler`, and a store on its disk.raw (closed when the test ends). */
async function serve(t: Parameters<typeof scratch>[0], www: string, handler: Parameters<typeof startNodeServer>[2], o: HttpStoreOptions = {}) {
  const srv = await startNodeServer(t, www, handler);
  const store = await open(srv.url + 'disk.raw', o);
  t.after(() => store.close());
  return { srv, store };
}

async function site(t: Parameters<typeof scratch>[0]) {
  const dir = await scratch(t);
  const www = join(dir, 'www');
  await mkdir(www);
  const data = randomBytes(5 * MiB + 300, 11);
  await writeFile(join(www, 'disk.raw'), data);
  return { www, data };
}

test('node client: ranged reads across chunks and past the end, over a server that honours Range', async (t) => {
  const { www, data } = await site(t);
  const { store } = await serve(t, www, honourRange);
  assert.equal(store.rangeRequests, true);
  assert.equal(await store.size(), data.length);
  const all = new Uint8Array(data.length + 1000).fill(0xee);
  assert.equal(await store.read(0, all), data.length);
  assert.equal(sha256(all.subarray(0, data.length)), sha256(data));
  assert.ok(all.subarray(data.length).every((b) => b === 0));
});

test('node client: a server that ignores Range, transient failures, and a size from HEAD', async (t) => {
  const { www, data } = await site(t);
  const { store: a } = await serve(t, www, ignoreRange);
  assert.equal(a.rangeRequests, false);
  const buf = new Uint8Array(1000);
  await a.read(3 * MiB + 1, buf);
  assert.deepEqual(buf, data.subarray(3 * MiB + 1, 3 * MiB + 1001));

  // 503, a dropped connection, 429: each retried.
  const { store: b } = await serve(t, www, failFirst(3, honourRange));
  await b.read(2 * MiB, buf);
  assert.deepEqual(buf, data.subarray(2 * MiB, 2 * MiB + 1000));
  assert.equal(b.stats.retries, 3);

  const noTotal = await startNodeServer(t, www, (req, res, file) => {
    const writeHead = res.writeHead.bind(res) as (status: number, headers?: Record<string, string | number>) => typeof res;
    res.writeHead = ((status: number, headers?: Record<string, string | number>) =>
      writeHead(status, headers && typeof headers['Content-Range'] === 'string' ? { ...headers, 'Content-Range': headers['Content-Range'].replace(/\/\d+$/, '/*') } : headers)) as typeof res.writeHead;
    return honourRange(req, res, file);
  });
  const c = await open(noTotal.url + 'disk.raw');
  t.after(() => c.close());
  assert.equal(await c.size(), data.length);
  assert.deepEqual(
    noTotal.requests.map((r) => r.method),
    ['GET', 'HEAD'],
  );
});

test('node client: redirects are followed; a missing image is QCOW_NOT_FOUND with the status text', async (t) => {
  const { www, data } = await site(t);
  const srv = await startNodeServer(t, www, (req, res, file) => {
    if (req.url === '/moved.raw') return void res.writeHead(302, { Location: '/disk.raw' }).end();
    return honourRange(req, res, file);
  });
  const moved = await open(srv.url + 'moved.raw');
  t.after(() => moved.close());
  assert.equal(await moved.size(), data.length);
  await assert.rejects(open(srv.url + 'nope.raw'), (e: unknown) => isCode('QCOW_NOT_FOUND')(e) && /HTTP 404 Not Found/.test((e as Error).message));
});

test('node client: a body cut short is retried; an abort stops a request in flight', async (t) => {
  const { www, data } = await site(t);
  let cut = 1;
  let hang = false;
  const srv = await startNodeServer(t, www, (req, res, file) => {
    if (hang) return;
    if (req.headers.range?.startsWith(`bytes=${2 * MiB}-`) && cut-- > 0) {
      // Promise the range asked for, send 1000 bytes, drop the connection.
      const end = Number(/-(\d+)$/.exec(req.headers.range)![1]);
      res.writeHead(206, { 'Content-Length': end - 2 * MiB + 1, 'Content-Range': `bytes ${2 * MiB}-${end}/${data.length}` });
      res.write(data.subarray(2 * MiB, 2 * MiB + 1000), () => req.socket.destroy());
      return;
    }
    return honourRange(req, res, file);
  });
  const ctl = new AbortController();
  const store = await open(srv.url + 'disk.raw', { signal: ctl.signal });
  t.after(() => store.close());
  const buf = new Uint8Array(5000);
  await store.read(2 * MiB + 10, buf);
  assert.deepEqual(buf, data.subarray(2 * MiB + 10, 2 * MiB + 5010));
  assert.equal(store.stats.retries, 1);
  hang = true;
  const pending = store.read(4 * MiB, new Uint8Array(10));
  setTimeout(() => ctl.abort(), 20);
  await assert.rejects(pending, isCode('QCOW_ABORTED'));
});
