// Images read over HTTP (nginx on loopback) have the content qemu-img sees in the same files, and
// the CLI takes URLs wherever it takes a source image.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { setTimeout as delay } from 'node:timers/promises';
import { join } from 'node:path';
import { openImage } from '#src/node.js';
import { httpOpener, type HttpStore } from '#src/storage/http.js';
import { builtinFormats } from '#src/formats/index.js';
import { CLI, deviceSha256, needs, qcow, qcowOk, qemuGuestSha256, qemuImg, randomBytes, runOk, scratch, sha256 } from '../support/qemu.js';
import { buildImageSite, needsNginx, startNginx, type Nginx, type SiteImage } from '../support/http-servers.js';

const MiB = 2 ** 20;
const interop = { ...needs('qemu-img', 'qemu-io'), ...needsNginx() };

/** One site and one nginx for the whole file, made on first use (so skipped tests cost nothing). */
let site: Promise<{ www: string; nginx: Nginx; images: SiteImage[] }> | undefined;
const cleanups: (() => Promise<void> | void)[] = [];
const fileScope = { after: (fn: () => Promise<void> | void) => void cleanups.unshift(fn) };
after(async () => {
  for (const fn of cleanups) await fn();
});
function getSite() {
  return (site ??= (async () => {
    const dir = await scratch(fileScope);
    const www = join(dir, 'www');
    const work = join(dir, 'work');
    await mkdir(www);
    await mkdir(work);
    const images = await buildImageSite(www);
    return { www, nginx: await startNginx(fileScope, www, work), images };
  })());
}

test('every test image read over HTTP has the guest content qemu-img reads from the file', interop, async () => {
  const { nginx, images } = await getSite();
  for (const image of images) {
    const dev = await openImage(nginx.url + image.path, { readOnly: true, opener: httpOpener({ chunkSize: MiB }) });
    try {
      assert.equal(dev.format, image.format, image.path);
      assert.equal(await deviceSha256(dev), await qemuGuestSha256(image.qemuArgs), image.path);
    } finally {
      await dev.close();
    }
  }
});

test('a backing chain named relative to the image is fetched from the same server', interop, async () => {
  const { nginx } = await getSite();
  const dev = await openImage(nginx.url + 'images/top.qcow2', { readOnly: true });
  try {
    assert.equal(dev.backing?.filename, nginx.url + 'bases/base.qcow2');
    assert.equal(dev.backing?.backing?.filename, nginx.url + 'bases/src.raw');
    assert.equal(dev.backing?.backing?.format, 'raw');
  } finally {
    await dev.close();
  }
});

test('a small read of a large remote qcow2 fetches a small multiple of the chunk size', interop, async (t) => {
  const { www, nginx } = await getSite();
  const data = randomBytes(64 * MiB, 21);
  await writeFile(join(www, 'big.raw'), data);
  await qemuImg(['convert', '-O', 'qcow2', join(www, 'big.raw'), join(www, 'big.qcow2')]);
  const dev = await openImage(nginx.url + 'big.qcow2', { readOnly: true, opener: httpOpener({ chunkSize: MiB }), formats: builtinFormats() });
  t.after(() => dev.close());
  const buf = new Uint8Array(4096);
  await dev.read(40 * MiB + 512, buf);
  assert.deepEqual(buf, data.subarray(40 * MiB + 512, 40 * MiB + 512 + 4096));
  const stats = (dev.store as HttpStore).stats;
  t.diagnostic(`4 KiB read of a 64 MiB qcow2 with 1 MiB chunks: ${stats.requests} requests, ${stats.bytesFetched} bytes fetched`);
  assert.ok(stats.bytesFetched <= 4 * MiB, `fetched ${stats.bytesFetched} bytes`);
  const served = (await nginx.accessLog()).filter((l) => l.path === '/big.qcow2').reduce((n, l) => n + l.bytes, 0);
  assert.equal(served, stats.bytesFetched, 'what nginx sent is what the store counted');
});

test('qcow info, map, compare and convert take URLs', interop, async (t) => {
  const { www, nginx } = await getSite();
  const url = nginx.url + 'images/top.qcow2';
  const info = JSON.parse((await qcowOk(['info', '--output=json', url])).stdout);
  const expected = JSON.parse((await qemuImg(['info', '--output=json', join(www, 'images/top.qcow2')])).stdout);
  assert.equal(info.format, 'qcow2');
  assert.equal(info['virtual-size'], expected['virtual-size']);
  assert.equal(info['backing-filename'], '../bases/base.qcow2');

  const map = JSON.parse((await qcowOk(['map', '--output=json', url])).stdout) as { start: number; length: number; depth: number; data: boolean }[];
  const qemuMap = JSON.parse((await qemuImg(['map', '--output=json', join(www, 'images/top.qcow2')])).stdout) as typeof map;
  assert.deepEqual(
    map.map((e) => [e.start, e.length, e.depth, e.data]),
    qemuMap.map((e) => [e.start, e.length, e.depth, e.data]),
  );

  assert.equal((await qcow(['compare', url, join(www, 'images/top.qcow2')])).code, 0);
  assert.equal((await qcow(['compare', nginx.url + 'zlib.qcow2', join(www, 'src.raw')])).code, 0);

  const dir = await scratch(t);
  await qcowOk(['convert', '-O', 'raw', url, join(dir, 'out.raw')]);
  assert.equal(sha256(await readFile(join(dir, 'out.raw'))), await qemuGuestSha256(['-f', 'qcow2', join(www, 'images/top.qcow2')]));
});

test('writing to a URL is refused with a clear message; a missing URL says so', interop, async () => {
  const { nginx } = await getSite();
  const w = await qcow(['io', '-c', 'write 0 512', nginx.url + 'plain.qcow2']);
  assert.equal(w.code, 1);
  assert.match(w.stderr, /read-only/);
  const missing = await qcow(['info', nginx.url + 'nope.qcow2']);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /nope\.qcow2: No such file or directory \(HTTP 404/);
});

test('qcow serve -r exports a remote image over NBD', { ...interop, ...needs('nbdcopy') }, async (t) => {
  const { www, nginx } = await getSite();
  const dir = await scratch(t);
  const sock = join(dir, 'nbd.sock');
  const pidFile = join(dir, 'serve.pid');
  const server = spawn(process.execPath, [CLI, 'serve', '-r', '-k', sock, '--pid-file', pidFile, nginx.url + 'images/top.qcow2'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  server.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise((resolve) => server.once('exit', resolve));
  t.after(async () => {
    if (server.exitCode === null) server.kill('SIGTERM');
    await exited;
  });
  // --pid-file appears once the socket listens; give up after ~10 s.
  for (let i = 0; i < 200 && (await readFile(pidFile).catch(() => undefined)) === undefined; i++) {
    assert.equal(server.exitCode, null, `qcow serve exited: ${stderr}`);
    await delay(50);
  }
  // One connection: the server serves one client at a time (-e 1).
  await runOk('nbdcopy', ['--connections=1', `nbd+unix:///?socket=${sock}`, join(dir, 'out.raw')]);
  assert.equal(sha256(await readFile(join(dir, 'out.raw'))), await qemuGuestSha256(['-f', 'qcow2', join(www, 'images/top.qcow2')]));
});
