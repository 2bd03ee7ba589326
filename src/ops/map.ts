/** `qemu-img map`: the allocation of an image and its backing chain, in JSON or human form. */
import type { BlockDevice } from '../core/block-device.js';
import { QcowError } from '../core/errors.js';
import { mapChain, type ChainExtent } from './chain-status.js';

export { mapChain, type ChainExtent };

/** One line per extent, with the key order and spacing qemu-img uses. */
export function mapEntryJson(e: ChainExtent): string {
  const offset = e.offset !== undefined ? `, "offset": ${e.offset}` : '';
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}`;
}

const JSON_CHUNK = 512;

/** `qemu-img map --output=json` of `dev`'s chain over [start, end) (the whole image by default): the JSON text, one extent a line. */
export async function mapJson(dev: BlockDevice, start?: number, end?: number): Promise<string> {
  // Lines are joined into flat chunks as they come: each line is a tree of concatenated strings,
  // and holding thousands of them to the end had the young-generation collections copy and
  // promote every one.
  const chunks: string[] = [];
  let lines: string[] = [];
  for await (const e of mapChain(dev, start, end)) {
    lines.push(mapEntryJson(e));
    if (lines.length === JSON_CHUNK) {
      chunks.push(lines.join(',\n'));
      lines = [];
    }
  }
  if (lines.length > 0) chunks.push(lines.join(',\n'));
  lines = chunks;
  // An empty range (an image of size 0) is one empty entry: qemu-img prints the run it was
  // gathering, which never started.
  if (lines.length === 0) lines.push('{ "start": 0, "length": 0, "depth": 0, "present": false, "zero": false, "data": false}');
  return `[${lines.join(',\n')}]\n`;
}

/**
 * qemu-img's human map, a line at a time: only ranges holding data at a known host offset (data
 * that reads as zeros, as in a metadata-preallocated file's holes, is left out as qemu-img leaves
 * it out). Like qemu-img it stops, after the lines before, at data it cannot place: compressed,
 * encrypted or external clusters have no offset in the file to print.
 */
export async function* mapHumanLines(dev: BlockDevice, start?: number, end?: number): AsyncGenerator<string> {
  const hex = (n: number) => (n === 0 ? '0' : `0x${n.toString(16)}`);
  const pad = (s: string) => s.padEnd(16);
  yield `${pad('Offset')}${pad('Length')}${pad('Mapped to')}File\n`;
  for await (const e of mapChain(dev, start, end)) {
    if (!e.data) continue;
    if (e.offset === undefined) throw new QcowError('QCOW_UNSUPPORTED', UNPLACED_DATA, { file: dev.filename });
    if (e.zero) continue;
    yield `${pad(hex(e.start))}${pad(hex(e.length))}${pad(hex(e.offset))}${e.filename}\n`;
  }
}

/** The error mapHumanLines stops with (the compat front end words it as qemu-img does). */
export const UNPLACED_DATA = 'the human map cannot show data that has no host offset in the file (compressed, encrypted or external clusters): use --output=json';

/** qemu-img's human map as one text (see mapHumanLines). */
export async function mapHuman(dev: BlockDevice, start?: number, end?: number): Promise<string> {
  let out = '';
  for await (const line of mapHumanLines(dev, start, end)) out += line;
  return out;
}
