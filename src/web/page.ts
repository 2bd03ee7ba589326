/**
 * The image viewer page (dist/web/index.html, bundled as dist/web/page.js): open a local file
 * (picker or drag and drop; a backing file is found among the files given with it) or a URL
 * (`?url=...`, fetched in ranges), and show the image's `info` per layer, a picture of its layout
 * (the same one as `qcow map --output=svg`), the `check` result, the snapshots, and buttons that
 * convert it to raw or qcow2 as a download.
 *
 * What it found is also kept on `window.qcowPage` (`ready`, `error`, `result`), so a test can
 * compare the page's figures with the command line's.
 */
import type { BlockDevice } from '../core/block-device.js';
import { isQcowError } from '../core/errors.js';
import { openImage, createImage } from '../chain/open.js';
import { builtinFormats } from '../formats/index.js';
import { chainInfo, type ImageInfoJson } from '../ops/info.js';
import { mapPicture, mapSvg, rowTotals, type CellCounts } from '../ops/map-picture.js';
import { convert } from '../ops/convert.js';
import { checkImage, checkJson } from '../ops/check.js';
import { openUrl } from '../browser/open-url.js';
import { blobOpener } from '../storage/blob.js';
import { MemoryStore } from '../storage/memory.js';
import type { StoreOpener } from '../storage/types.js';

/** What the page found, for people (rendered) and for tests (`window.qcowPage.result`). */
export interface PageResult {
  info: ImageInfoJson[];
  /** Byte totals of each picture row: one per layer, then the guest view. */
  rows: { label: string; totals: CellCounts }[];
  cellBytes: number;
  /** qemu-img check's JSON for a qcow2 top image; undefined for other formats. */
  check?: Record<string, unknown>;
}

interface PageState {
  ready: boolean;
  /** How many images have been shown (or failed to open): tests wait for it to move. */
  shown: number;
  error?: string;
  result?: PageResult;
}

/** Largest virtual size the convert buttons build in memory (the download is a Blob). */
const CONVERT_LIMIT = 2 ** 30;

const state: PageState = { ready: false, shown: 0 };
(globalThis as { qcowPage?: PageState }).qcowPage = state;

function el<K extends keyof HTMLElementTagNameMap>(tag: K, props: Partial<HTMLElementTagNameMap[K]> = {}, ...children: (Node | string)[]): HTMLElementTagNameMap[K] {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...children);
  return e;
}

function table(head: string[], rows: (string | number)[][]): HTMLTableElement {
  return el('table', {}, el('tr', {}, ...head.map((h) => el('th', {}, h))), ...rows.map((r) => el('tr', {}, ...r.map((c) => el('td', {}, String(c))))));
}

/** The picture's resolution follows the window: two pixels per cell, at most 2048 cells. */
function cellsForScreen(): number {
  return Math.max(64, Math.min(2048, Math.floor((document.body.clientWidth - 40) / 2)));
}

async function describe(dev: BlockDevice): Promise<PageResult> {
  const info = await chainInfo(dev);
  const pic = await mapPicture(dev, { cells: cellsForScreen() });
  const result: PageResult = { info, rows: pic.rows.map((r) => ({ label: r.label, totals: rowTotals(r) })), cellBytes: pic.cellBytes };
  if (dev.format === 'qcow2') result.check = checkJson(await checkImage(dev.store, { formats: builtinFormats(), format: 'qcow2' }), dev.filename);
  render(dev, result, mapSvg(pic));
  return result;
}

function render(dev: BlockDevice, r: PageResult, svg: string): void {
  const out = document.getElementById('out')!;
  out.replaceChildren();
  out.append(el('h2', {}, dev.filename));
  out.append(
    table(
      ['layer', 'format', 'virtual size', 'file size', 'cluster size', 'backing file'],
      r.info.map((i, depth) => [depth, i.format, i['virtual-size'], i['actual-size'] ?? '', i['cluster-size'] ?? '', i['backing-filename'] ?? '']),
    ),
  );
  out.append(el('h3', {}, 'Layout'));
  const picture = el('div', { className: 'picture' });
  picture.innerHTML = svg;
  out.append(picture);
  out.append(table(['row', 'data', 'compressed', 'zero', 'unallocated'], r.rows.map((row) => [row.label, row.totals.data, row.totals.compressed, row.totals.zero, row.totals.unallocated])));
  out.append(el('h3', {}, 'Check'));
  out.append(el('pre', { id: 'check' }, r.check ? JSON.stringify(r.check, null, 2) : `no check for ${dev.format} images`));
  const snapshots = (r.info[0]!.snapshots ?? []) as { id: string; name: string; 'vm-state-size': number; 'date-sec': number }[];
  out.append(el('h3', {}, 'Snapshots'));
  out.append(snapshots.length ? table(['id', 'name', 'vm state', 'date'], snapshots.map((s) => [s.id, s.name, s['vm-state-size'], new Date(s['date-sec'] * 1000).toISOString()])) : el('p', {}, 'none'));
  out.append(el('h3', {}, 'Convert'));
  for (const format of ['raw', 'qcow2'] as const) {
    const button = el('button', { disabled: dev.size > CONVERT_LIMIT, title: dev.size > CONVERT_LIMIT ? 'larger than 1 GiB: use qcow convert' : '' }, `download as ${format}`);
    button.onclick = () => void download(dev, format).catch(showError);
    out.append(button, ' ');
  }
}

/** Convert the open image in memory and hand the result to the browser as a download. */
async function download(dev: BlockDevice, format: 'raw' | 'qcow2'): Promise<void> {
  const stores = new Map<string, MemoryStore>();
  const opener: StoreOpener = {
    async open(name, o) {
      let s = stores.get(name);
      if (!s && o.create) stores.set(name, (s = new MemoryStore(undefined, { name })));
      if (!s) throw new Error(`${name}: no such file`);
      return s;
    },
    resolve: (name) => name,
  };
  const name = `${dev.filename.replace(/^.*[/\\]/, '').replace(/\.[^.]*$/, '')}.${format === 'raw' ? 'img' : 'qcow2'}`;
  const formats = builtinFormats();
  await createImage(name, { format, size: dev.size, opener, formats });
  const target = await openImage(name, { format, opener, formats });
  try {
    await convert([dev], target, { targetIsZero: true });
  } finally {
    await target.close();
  }
  const bytes = stores.get(name)!.bytes();
  const a = el('a', { href: URL.createObjectURL(new Blob([bytes as Uint8Array<ArrayBuffer>])), download: name });
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
}

function showError(e: unknown): void {
  const message = isQcowError(e) || e instanceof Error ? e.message : String(e);
  state.error = message;
  state.result = undefined;
  document.getElementById('out')!.replaceChildren(el('p', { className: 'error' }, message));
}

/** The image on show: closed when another one is opened. */
let current: BlockDevice | undefined;

async function show(open: () => Promise<BlockDevice>): Promise<void> {
  state.ready = false;
  state.error = undefined;
  document.getElementById('out')!.replaceChildren(el('p', {}, 'reading…'));
  await current?.close().catch(() => undefined);
  current = undefined;
  try {
    current = await open();
    state.result = await describe(current);
  } catch (e) {
    showError(e);
  }
  state.shown++;
  state.ready = true;
}

/** Open the first of `files` as the image; the others are its candidate backing files. */
function showFiles(files: File[]): void {
  if (files.length === 0) return;
  const formats = builtinFormats();
  void show(() => openImage(files[0]!.name, { readOnly: true, opener: blobOpener(files), formats }));
}

function start(): void {
  const input = document.getElementById('file') as HTMLInputElement;
  input.onchange = () => showFiles([...(input.files ?? [])]);
  document.body.ondragover = (e) => e.preventDefault();
  document.body.ondrop = (e) => {
    e.preventDefault();
    showFiles([...(e.dataTransfer?.files ?? [])]);
  };
  const form = document.getElementById('url-form') as HTMLFormElement;
  form.onsubmit = (e) => {
    e.preventDefault();
    const url = (document.getElementById('url') as HTMLInputElement).value;
    history.replaceState(null, '', `?url=${encodeURIComponent(url)}`);
    void show(() => openUrl(url));
  };
  const url = new URLSearchParams(location.search).get('url');
  if (url) {
    (document.getElementById('url') as HTMLInputElement).value = url;
    void show(() => openUrl(url));
  } else state.ready = true;
}

start();
