// A real headless Chromium loads a page that opens images over HTTP with the browser bundle and
// hashes their guest content with WebCrypto; the hashes must be qemu-img's.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuGuestSha256, runOk, scratch } from '../support/qemu.js';
import { buildImageSite, needsNginx, startNginx } from '../support/http-servers.js';

const BUILD_SCRIPT = fileURLToPath(new URL('../../scripts/build-browser.mjs', import.meta.url));
const PAGE = fileURLToPath(new URL('../../test/browser/fixture/index.html', import.meta.url));
const CHROMIUM = '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];

interface PageApi {
  qcowReady?: boolean;
  hashImage(path: string): Promise<{ format: string; size: number; sha256: string; chain: string[]; bytesFetched: number }>;
  v86RoundTrip(path: string, offset: number, sector: number): Promise<{ byteLength: number; before: number[]; after: number[] }>;
  streamFile(path: string, format: string, compress: boolean): Promise<{ bytes: number; sha256: string; base64: string }>;
}

test('Chromium reads raw, qcow2 (plain, zlib, zstd, backing chain) and qcow images over HTTP as qemu-img does, and streams local files out as raw and qcow2', { ...needs('chromium', 'qemu-img', 'qemu-io'), ...needsNginx() }, async (t) => {
  const dir = await scratch(t);
  const www = join(dir, 'www');
  const work = join(dir, 'work');
  await mkdir(www);
  await mkdir(work);
  const images = await buildImageSite(www);
  await runOk(process.execPath, [BUILD_SCRIPT, '--outdir', www]);
  await copyFile(PAGE, join(www, 'index.html'));
  const nginx = await startNginx(t, www, work);

  const { chromium } = await import('playwright-core');
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  t.after(() => browser.close());
  const page = await browser.newPage();
  const pageErrors: string[] = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => {
    if (m.type() === 'error') pageErrors.push(m.text());
  });
  await page.goto(nginx.url + 'index.html');
  await page.waitForFunction(() => (window as unknown as PageApi).qcowReady === true, undefined, { timeout: 30_000 });

  for (const image of images) {
    const got = await page.evaluate((path) => (window as unknown as PageApi).hashImage(path), image.path);
    assert.equal(got.format, image.format, image.path);
    assert.equal(got.sha256, await qemuGuestSha256(image.qemuArgs), image.path);
    t.diagnostic(`${image.path}: ${got.format}, ${got.size} bytes, ${got.bytesFetched} bytes fetched for the top image`);
    if (image.path === 'images/top.qcow2') {
      assert.deepEqual(got.chain, [nginx.url + 'images/top.qcow2', nginx.url + 'bases/base.qcow2', nginx.url + 'bases/src.raw']);
    }
  }

  // The emulator adapter over a writable overlay: [0, 512k) of the chain reads 0xab.
  const rt = await page.evaluate(([path, offset, sector]) => (window as unknown as PageApi).v86RoundTrip(path, offset, sector), ['images/top.qcow2', 4096, 0x77] as [string, number, number]);
  assert.equal(rt.byteLength, 4 * 2 ** 20);
  assert.deepEqual(rt.before, new Array(1024).fill(0xab));
  const expected = new Array(1024).fill(0xab).fill(0x77, 96, 96 + 512);
  assert.deepEqual(rt.after, expected);

  // A local file streamed out as raw (the guest content) and as compressed qcow2 (checked by qemu-img).
  for (const image of images.filter((i) => ['plain.qcow2', 'zstd.qcow2', 'v1.qcow'].includes(i.path))) {
    const raw = await page.evaluate(([path]) => (window as unknown as PageApi).streamFile(path, 'raw', false), [image.path] as [string]);
    assert.equal(raw.sha256, await qemuGuestSha256(image.qemuArgs), `${image.path} -> raw`);
    const q = await page.evaluate(([path]) => (window as unknown as PageApi).streamFile(path, 'qcow2', true), [image.path] as [string]);
    const out = join(work, 'streamed.qcow2');
    await writeFile(out, Buffer.from(q.base64, 'base64'));
    await runOk('qemu-img', ['check', '-q', out]);
    assert.equal(await qemuGuestSha256(['-f', 'qcow2', out]), raw.sha256, `${image.path} -> qcow2 -c`);
  }
  assert.deepEqual(pageErrors, []);
});
