/** `qemu-img map`: the allocation of an image and its backing chain, in JSON or human form. */
import type { BlockDevice } from '../core/block-device.js';
import { mapChain, type ChainExtent } from './chain-status.js';

export { mapChain, type ChainExtent };

/** One line per extent, with the key order and spacing qemu-img uses. */
export function mapEntryJson(e: ChainExtent): string {
  const offset = e.offset !== undefined ? `, "offset": ${e.offset}` : '';
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}`;
}

/** `qemu-img map --output=json` of `dev`'s chain over [start, end) (the whole image by default): the JSON text, one extent a line. */
export async function mapJson(dev: BlockDevice, start?: number, end?: number): Promise<string> {
  const lines: string[] = [];
  for await (const e of mapChain(dev, start, end)) lines.push(mapEntryJson(e));
  return `[${lines.join(',\n')}]\n`;
}

/** qemu-img's human map: only ranges with data at a known host offset. */
export async function mapHuman(dev: BlockDevice, start?: number, end?: number): Promise<string> {
  const hex = (n: number) => (n === 0 ? '0' : `0x${n.toString(16)}`);
  const pad = (s: string) => s.padEnd(16);
  let out = `${pad('Offset')}${pad('Length')}${pad('Mapped to')}File\n`;
  for await (const e of mapChain(dev, start, end)) {
    if (!e.data || e.offset === undefined) continue;
    out += `${pad(hex(e.start))}${pad(hex(e.length))}${pad(hex(e.offset))}${e.filename}\n`;
  }
  return out;
}
