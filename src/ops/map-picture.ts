/**
 * A picture of an image's guest address space: one row per layer of the backing chain (top
 * first), each cell a slice of the guest range drawn as the shares of data, compressed, zero and
 * unallocated bytes that layer holds there, and a last row for what the guest reads (which layer
 * supplies each slice). Built at the picture's resolution from block status, never per cluster:
 * the cost is a bounded number of block-status calls per layer and counters per cell, so a 4 TiB
 * sparse image draws as fast as a small one.
 *
 * `mapSvg` gives a standalone SVG (for reports and CI logs: `qcow map --output=svg`), `mapHtml`
 * the same picture in a page with a legend and a table of the layers.
 */
import type { BlockDevice, BlockExtent } from '../core/block-device.js';
import { mapChain } from './chain-status.js';

/** The kinds of bytes a cell counts, in the order they are stacked. */
export const KINDS = ['data', 'compressed', 'zero', 'unallocated'] as const;
/** One kind of guest bytes: stored data, compressed data, reads as zero, or not allocated anywhere. */
export type ByteKind = (typeof KINDS)[number];

/** Colours of the kinds (also the legend's). */
export const KIND_COLOURS: Record<ByteKind, string> = {
  data: '#2f6fb3',
  compressed: '#8e44ad',
  zero: '#9fd39a',
  unallocated: '#eeeeee',
};

/** Bytes of each kind in one cell of one row. */
export type CellCounts = Record<ByteKind, number>;

/** One row of the picture: one layer of the chain, or the guest's view through all of them. */
export interface PictureRow {
  /** "layer 0: top.qcow2 (qcow2)" or "guest view". */
  label: string;
  /** The bytes of each kind in each cell, left to right. */
  cells: CellCounts[];
}

/** What {@link mapPicture} finds: a row per layer and one for the guest's view, in cells of equal guest length. */
export interface MapPicture {
  /** The top image's file name. */
  filename: string;
  /** The guest size in bytes. */
  size: number;
  /** Guest bytes per cell (the last cell may cover fewer). */
  cellBytes: number;
  /** The layers from the top down, then the guest view. */
  rows: PictureRow[];
}

/** Options of {@link mapPicture}. */
export interface PictureOptions {
  /** Cells per row (the picture's horizontal resolution). Default 512. */
  cells?: number;
  /** Stops the walk with QCOW_ABORTED. */
  signal?: AbortSignal;
}

/** The kind of one layer's extent. */
function kindOf(e: BlockExtent): ByteKind {
  if (!e.allocated) return 'unallocated';
  if (e.compressed) return 'compressed';
  if (e.data) return 'data';
  return 'zero';
}

function emptyCells(n: number): CellCounts[] {
  return Array.from({ length: n }, () => ({ data: 0, compressed: 0, zero: 0, unallocated: 0 }));
}

/** Add `length` bytes of `kind` starting at guest `start` to the cells they fall in. */
function addRange(cells: CellCounts[], cellBytes: number, start: number, length: number, kind: ByteKind): void {
  let off = start;
  const end = start + length;
  while (off < end) {
    const i = Math.min(cells.length - 1, Math.floor(off / cellBytes));
    const cellEnd = i === cells.length - 1 ? end : Math.min(end, (i + 1) * cellBytes);
    cells[i]![kind] += cellEnd - off;
    off = cellEnd;
  }
}

/** Count a picture of `dev` and its chain: one row per layer, then the guest view. */
export async function mapPicture(dev: BlockDevice, options: PictureOptions = {}): Promise<MapPicture> {
  const size = dev.size;
  const wanted = Math.max(1, Math.floor(options.cells ?? 512));
  // Cells cover whole 512-byte sectors, and there are never more cells than sectors.
  const cellBytes = Math.max(512, Math.ceil(size / wanted / 512) * 512);
  const n = Math.max(1, Math.ceil(size / cellBytes));
  const rows: PictureRow[] = [];
  let depth = 0;
  for (let layer: BlockDevice | null = dev; layer; layer = layer.backing, depth++) {
    const cells = emptyCells(n);
    const layerSize = Math.min(layer.size, size);
    // One block-status call per cell bounds the extents held at once whatever the layout.
    for (let i = 0; i < n && i * cellBytes < layerSize; i++) {
      options.signal?.throwIfAborted();
      const from = i * cellBytes;
      const to = Math.min(layerSize, from + cellBytes);
      for (const e of await layer.blockStatus(from, to - from)) addRange(cells, cellBytes, e.offset, e.length, kindOf(e));
    }
    // Past the end of a shorter backing file the layer holds nothing.
    if (layerSize < size) addRange(cells, cellBytes, layerSize, size - layerSize, 'unallocated');
    rows.push({ label: `layer ${depth}: ${layer.filename} (${layer.format})`, cells });
  }
  const guest = emptyCells(n);
  for await (const e of mapChain(dev, 0, size)) {
    options.signal?.throwIfAborted();
    const kind: ByteKind = !e.present ? 'unallocated' : e.compressed ? 'compressed' : e.data ? 'data' : 'zero';
    addRange(guest, cellBytes, e.start, e.length, kind);
  }
  rows.push({ label: 'guest view', cells: guest });
  return { filename: dev.filename, size, cellBytes, rows };
}

const CELL_W = 2;
const ROW_H = 28;
const LABEL_H = 16;
const MARGIN = 8;

function escapeXml(s: string): string {
  return s.replace(/[<>&"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function sameCounts(a: CellCounts, b: CellCounts): boolean {
  return KINDS.every((k) => a[k] === b[k]);
}

function percent(part: number, whole: number): string {
  const p = (100 * part) / whole;
  return p === 0 || p === 100 ? `${p}%` : `${p.toFixed(p < 1 ? 2 : 1)}%`;
}

/** The hover text of a run of cells: the guest range and its share of each kind. */
function runTitle(row: PictureRow, pic: MapPicture, first: number, last: number): string {
  const start = first * pic.cellBytes;
  const end = Math.min(pic.size, (last + 1) * pic.cellBytes);
  const c = row.cells[first]!;
  const total = KINDS.reduce((s, k) => s + c[k], 0) || 1;
  const shares = KINDS.filter((k) => c[k] > 0).map((k) => `${k} ${percent(c[k], total)}`);
  // Every cell of the run has the same counts, so the run has the same shares.
  return `${row.label}\n[${start}, ${end}): ${shares.join(', ')}`;
}

/** The picture as a standalone SVG document. */
export function mapSvg(pic: MapPicture): string {
  const width = MARGIN * 2 + pic.rows[0]!.cells.length * CELL_W;
  const height = MARGIN + pic.rows.length * (LABEL_H + ROW_H + MARGIN);
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<title>${escapeXml(`${pic.filename}: ${pic.size} bytes, ${pic.cellBytes} bytes per cell`)}</title>`,
  ];
  pic.rows.forEach((row, r) => {
    const top = MARGIN + r * (LABEL_H + ROW_H + MARGIN);
    out.push(`<text x="${MARGIN}" y="${top + 12}">${escapeXml(row.label)}</text>`);
    const y0 = top + LABEL_H;
    // Runs of cells with equal counts become one group of stacked rectangles (a sparse image draws
    // as a handful of rectangles, not one per cell).
    for (let first = 0; first < row.cells.length; ) {
      let last = first;
      while (last + 1 < row.cells.length && sameCounts(row.cells[last + 1]!, row.cells[first]!)) last++;
      const c = row.cells[first]!;
      const total = KINDS.reduce((s, k) => s + c[k], 0) || 1;
      const x = MARGIN + first * CELL_W;
      const w = (last - first + 1) * CELL_W;
      out.push(`<g><title>${escapeXml(runTitle(row, pic, first, last))}</title>`);
      let y = y0;
      for (const k of KINDS) {
        if (c[k] === 0) continue;
        const h = (ROW_H * c[k]) / total;
        out.push(`<rect x="${x}" y="${y.toFixed(2)}" width="${w}" height="${h.toFixed(2)}" fill="${KIND_COLOURS[k]}"/>`);
        y += h;
      }
      out.push('</g>');
      first = last + 1;
    }
  });
  out.push('</svg>');
  return out.join('\n') + '\n';
}

/** Totals of each kind in a row. */
export function rowTotals(row: PictureRow): CellCounts {
  const t: CellCounts = { data: 0, compressed: 0, zero: 0, unallocated: 0 };
  for (const c of row.cells) for (const k of KINDS) t[k] += c[k];
  return t;
}

/** The picture in a small HTML page: legend, the SVG, and the byte totals of each row. */
export function mapHtml(pic: MapPicture): string {
  const legend = KINDS.map((k) => `<span><i style="background:${KIND_COLOURS[k]}"></i>${k}</span>`).join(' ');
  const rows = pic.rows
    .map((row) => {
      const t = rowTotals(row);
      return `<tr><td>${escapeXml(row.label)}</td>${KINDS.map((k) => `<td>${t[k]}</td>`).join('')}</tr>`;
    })
    .join('\n');
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${escapeXml(pic.filename)}</title>
<style>body{font-family:sans-serif;margin:1em}i{display:inline-block;width:1em;height:1em;margin:0 .3em;vertical-align:middle;border:1px solid #999}td,th{padding:.2em .6em;text-align:right}td:first-child{text-align:left}</style>
</head><body>
<h1>${escapeXml(pic.filename)}</h1>
<p>${pic.size} bytes of guest address space, ${pic.cellBytes} bytes per cell. ${legend}</p>
${mapSvg(pic)}
<table><tr><th>row</th>${KINDS.map((k) => `<th>${k} bytes</th>`).join('')}</tr>
${rows}
</table>
</body></html>
`;
}
