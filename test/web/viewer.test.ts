/**
 * The image viewer page (dist/web, built by `npm run build`) in a real headless Chromium, served by
 * nginx: opened on a URL and on local files, its figures (info per layer, the byte totals of the
 * layout picture, the check) must be what qemu-img reports for the same chain. A screenshot of
 * the page is kept in .cache/artifacts/ (QCOW_ARTIFACTS to put it elsewhere).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdir, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, scratch, type QemuMapExtent } from '../support/qemu.js';
import { needsNginx, startNginx } from '../support/http-servers.js';
import type { PageResult } from '#src/web/page.js';

const WEB = fileURLToPath(new URL('../../dist/web', import.meta.url));
const ARTIFACTS = process.env.QCOW_ARTIFACTS ?? fileURLToPath(new URL('../../.cache/artifacts', import.meta.url));
const CHROMIUM = '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];


type Totals = PageResult['rows'][number]['totals'];

/** Byte totals from qemu-img map's JSON: the guest view, or (`layer`) what depth 0 holds. */
function totalsOf(extents: QemuMapExtent[], layer: boolean): Totals {
  const t = { data: 0, compressed: 0, zero: 0, unallocated: 0 };
  for (const e of extents) {
    const mine = layer ? e.present && e.depth === 0 : e.present;
    t[!mine ? 'unallocated' : e.data ? 'data' : 'zero'] += e.length;
  }
  return t;
}

/** qemu-img 7.2 counts compressed clusters as data: fold ours in to compare. */
const asQemu = (t: Totals): Totals => ({ ...t, data: t.data + t.compressed, compressed: 0 });

interface PageState {
  ready: boolean;
  shown: number;
  error?: string;
  result?: PageResult;
}

test('the viewer page shows what qemu-img reports for a chain, opened on a URL and on local files', { ...needs('chromium', 'qemu-img', 'qemu-io'), ...needsNginx() }, async (t) => {
  const dir = await scratch(t);
  const www = join(dir, 'www');
  const work = join(dir, 'work');
  await mkdir(www);
  await mkdir(work);
  for (const f of await readdir(WEB)) if (/^(index\.html|app\.js|zstd\.wasm)$/.test(f)) await copyFile(join(WEB, f), join(www, f));
  // A chain with every kind of bytes: data and compressed data below, data and zeros on top.
  const base = join(www, 'base.qcow2');
  const top = join(www, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '64M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 8M', '-c', 'write -c -P 2 20M 6M', '-c', 'write -P 3 40M 1M', base]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 9 4M 8M', '-c', 'write -z 22M 2M', '-c', 'write -P 5 50M 64k', top]);
  const huge = join(www, 'huge.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', huge, '4T']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 7 3T 64k', huge]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', join(www, 'allocated.qcow2'), '64G']);
  const nginx = await startNginx(t, www, work);

  const guest = totalsOf(JSON.parse((await qemuImg(['map', '--output=json', top])).stdout) as QemuMapExtent[], false);
  const topLayer = totalsOf(JSON.parse((await qemuImg(['map', '--output=json', top])).stdout) as QemuMapExtent[], true);
  const baseLayer = totalsOf(JSON.parse((await qemuImg(['map', '--output=json', base])).stdout) as QemuMapExtent[], true);
  const info = JSON.parse((await qemuImg(['info', '--output=json', '--backing-chain', top])).stdout) as Record<string, unknown>[];
  const check = JSON.parse((await qemuImg(['check', '--output=json', top])).stdout) as Record<string, unknown>;

  const { chromium } = await import('playwright-core');
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1100, height: 1000 } });
  const pageErrors: string[] = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  const shown = async (n: number): Promise<PageState> => {
    await page.waitForFunction((k) => ((window as unknown as { qcowPage?: PageState }).qcowPage?.shown ?? 0) >= k, n, { timeout: 60_000 });
    return page.evaluate(() => (window as unknown as { qcowPage: PageState }).qcowPage);
  };
  const expectChain = (s: PageState, how: string) => {
    assert.equal(s.error, undefined, how);
    const r = s.result!;
    assert.deepEqual(r.info.map((i) => [i.format, i['virtual-size'], i['cluster-size']]), info.map((i) => [i.format, i['virtual-size'], i['cluster-size']]), `${how}: info`);
    assert.deepEqual(r.rows.map((row) => row.label.replace(/^(layer \d+): .*\/([^/]+) \((\w+)\)$/, '$1: $2 ($3)')), ['layer 0: top.qcow2 (qcow2)', 'layer 1: base.qcow2 (qcow2)', 'guest view'], how);
    assert.deepEqual(asQemu(r.rows[0]!.totals), topLayer, `${how}: top layer`);
    assert.deepEqual(asQemu(r.rows[1]!.totals), baseLayer, `${how}: base layer`);
    assert.equal(r.rows[1]!.totals.compressed, 6 * 2 ** 20, `${how}: compressed bytes of the base`);
    assert.deepEqual(asQemu(r.rows[2]!.totals), guest, `${how}: guest view`);
    for (const key of ['check-errors', 'image-end-offset', 'allocated-clusters', 'total-clusters', 'fragmented-clusters', 'compressed-clusters']) {
      assert.equal(r.check?.[key], check[key], `${how}: check ${key}`);
    }
  };

  await page.goto(`${nginx.url}index.html?url=top.qcow2`);
  expectChain(await shown(1), 'URL');
  await mkdir(ARTIFACTS, { recursive: true });
  const shot = join(ARTIFACTS, 'viewer.png');
  await page.screenshot({ path: shot, fullPage: true });
  assert.ok((await stat(shot)).size > 10_000, 'the screenshot has content');
  t.diagnostic(`screenshot: ${shot}`);

  // The convert buttons hand over images qemu-img finds clean and equal to the chain.
  for (const format of ['raw', 'qcow2']) {
    const [download] = await Promise.all([page.waitForEvent('download'), page.click(`text=download as ${format}`)]);
    const saved = join(work, `download.${format}`);
    await download.saveAs(saved);
    if (format === 'qcow2') await qemuImg(['check', saved]);
    await qemuImg(['compare', '-f', 'qcow2', '-F', format, top, saved]);
  }

  // Local files: the picker gets the image and its backing file; nothing is fetched for them.
  await page.goto(`${nginx.url}index.html`);
  await page.waitForFunction(() => (window as unknown as { qcowPage?: PageState }).qcowPage?.ready === true);
  await page.setInputFiles('#file', [top, base]);
  expectChain(await shown(1), 'local files');

  // Without its backing file the page says which file to add.
  await page.setInputFiles('#file', [top]);
  const missing = await shown(2);
  assert.match(missing.error ?? '', /Could not open backing file 'base\.qcow2'/);

  // A 4 TiB sparse image: drawn from block status, its one cluster of data found.
  await page.goto(`${nginx.url}index.html?url=huge.qcow2`);
  const s = await shown(1);
  assert.equal(s.error, undefined);
  assert.equal(s.result!.rows.at(-1)!.totals.data, 65536);

  // A 64 GiB image allocated throughout (metadata preallocation: a million mapped clusters, 8 MiB
  // of L2 tables, a sparse file): the whole guest is data, read in table-sized ranges.
  await page.goto(`${nginx.url}index.html?url=allocated.qcow2`);
  const a = await shown(1);
  assert.equal(a.error, undefined);
  assert.equal(a.result!.rows.at(-1)!.totals.data, 64 * 2 ** 30);
  assert.deepEqual(pageErrors, []);
});
