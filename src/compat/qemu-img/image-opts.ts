/**
 * qemu-img's `--image-opts` operands: `driver=FMT,file.filename=PATH,...` option lists. Most name
 * a format and a file, and become `-f FMT PATH`. Lists that say more open through a special
 * opener (openPolicy.openName) under the name QEMU shows for them:
 * - key secrets (`encrypt.key-secret`, `key-secret`, and `backing.…` ones for backing files): each
 *   layer opens with its own password. QEMU shows such an image as `json:{...}`, since the key
 *   secret is one of the options that make up the node's identity.
 * - `backing.driver`, `backing.file.filename` (and a raw backing file's `backing.offset` and
 *   `backing.size`): the backing file QEMU opens in place of the one the image records.
 * - raw's `offset` and `size`: a raw view of part of the file, shown as QEMU's json:{...} name.
 * - `driver=nbd`: an NBD export (./nbd-device.ts), shown under the option list itself.
 */
import type { BlockDevice, NodeOpenOptions } from '../../node.js';
import { passwordsOf } from '../secrets.js';
import { nbdTargetOfOptions } from '../nbd-store.js';
import { renamed } from '../renamed.js';
import { backingOpenOptions } from '../backing-options.js';
import { openOverRawWindow, rawWindowOf, refusedAs } from '../raw-window.js';
import { qemuJsonName } from '../json-name.js';

export type SpecialOpen = (options: NodeOpenOptions) => Promise<BlockDevice>;

/** Options that only say which format and which plain file. */
const PLAIN = new Set(['driver', 'file.filename', 'filename', 'file.driver']);
const TOP_SECRETS = ['encrypt.key-secret', 'key-secret'];
/** The backing node's options followed here (./backing-options.ts). */
const BACKING = ['backing.driver', 'backing.file.filename', 'backing.filename', 'backing.offset', 'backing.size'];

export function parseImageOpts(text: string): Record<string, string> {
  const o: Record<string, string> = {};
  for (const p of text.split(',')) {
    const eq = p.indexOf('=');
    if (eq > 0) o[p.slice(0, eq)] = p.slice(eq + 1);
  }
  return o;
}

/**
 * The operand qcow's command gets for an --image-opts list (pushing `-f FMT`, or `formatFlag FMT`,
 * onto `args` when the list names a format), registering in `special` how to open it when a plain open would not do;
 * without `special` (a command that opens the file itself, as check does) just the file.
 */
export function fromImageOpts(text: string, args: string[], secrets: ReadonlyMap<string, string>, special: Map<string, SpecialOpen> | undefined, formatFlag = '-f'): string {
  const o = parseImageOpts(text);
  const driver = o.driver;
  if (special && nbdTargetOfOptions(o)) {
    special.set(text, async (options) => {
      const { openNbdImage } = await import('./nbd-device.js');
      return openNbdImage(text, o, options);
    });
    return text;
  }
  // blkdebug's options stay whole, as the json: name they are (../json-open.ts opens it).
  if (driver === 'blkdebug') return 'json:' + JSON.stringify(o);
  // So do null-co's (a node of its own, ../null-co.ts), unless the command opens files itself.
  if (driver === 'null-co' && special) {
    const name = 'json:' + JSON.stringify(o);
    special.set(name, (options) => import('../json-open.js').then((m) => m.openJsonName(name, options)).catch(refusedAs(text)));
    return name;
  }
  if (driver && driver !== 'file') args.push(formatFlag, driver);
  // A format over a raw window of a file (file.driver=raw, file.offset, file.size).
  const fileWindow = o['file.driver'] === 'raw' ? rawWindowOf(o, 'file.') : undefined;
  const inner = o['file.file.filename'];
  if (fileWindow && inner !== undefined && special) {
    const tree = { driver: driver ?? 'raw', file: { driver: 'raw', ...pick(o, ['file.offset', 'file.size'], 'file.'), file: { driver: 'file', filename: inner } } };
    const name = qemuJsonName('json:' + JSON.stringify(tree)) ?? text;
    special.set(name, async (options) => renamed(await openOverRawWindow(inner, fileWindow, driver, options).catch(refusedAs(text)), name));
    return name;
  }
  const path = o['file.filename'] ?? o.filename;
  if (path === undefined) return text;
  // raw's offset and size: a raw view of part of the file, shown (as QEMU shows it) as json:{...}.
  const window = driver === 'raw' ? rawWindowOf(o) : undefined;
  if (window && special) {
    const tree = { driver, ...pick(o, ['offset', 'size']), file: { driver: o['file.driver'] ?? 'file', filename: path } };
    const name = qemuJsonName('json:' + JSON.stringify(tree)) ?? text;
    special.set(name, async (options) => {
      const { openImage } = await import('../../cli/open-images.js');
      return renamed(await openImage(path, { ...options, format: 'raw', rawWindow: window }).catch(refusedAs(text)), name);
    });
    return name;
  }
  const wanted = Object.keys(o).filter((k) => !PLAIN.has(k) && (/(^|\.)(encrypt\.)?key-secret$/.test(k) || BACKING.includes(k)));
  if (wanted.length === 0 || !special) return path;
  const top = TOP_SECRETS.find((k) => o[k] !== undefined);
  const name = top !== undefined ? jsonName(top, o[top]!, driver, path) : path;
  special.set(name, async (options) => {
    // Opened only to look at (info, map), an image needs no key: QEMU then does not even look the
    // secrets up.
    const { password, passwordAt } = options.inspectOnly ? { password: undefined, passwordAt: undefined } : passwordsOf(o, secrets);
    const { openImage } = await import('../../cli/open-images.js');
    const backing = backingOpenOptions(o);
    const dev = await openImage(path, { ...options, ...backing, password: password ?? options.password, passwordAt, backingFormat: backing.backingFormat ?? options.backingFormat });
    return top === undefined ? dev : renamed(dev, name);
  });
  return name;
}

/** QEMU's json: name of an image opened with a key secret (key order as qemu-img 7.2 prints it). */
function jsonName(secretKey: string, id: string, driver: string | undefined, path: string): string {
  return `json:${JSON.stringify({ [secretKey]: id, driver: driver ?? 'raw', file: { driver: 'file', filename: path } }).replace(/":/g, '": ').replace(/,"/g, ', "')}`;
}

/** The options `keys` of `o` that are there, without `strip` at the start of their names. */
function pick(o: Record<string, string>, keys: readonly string[], strip = ''): Record<string, string> {
  const out: Record<string, string> = {};
  for (const k of keys) if (o[k] !== undefined) out[k.slice(strip.length)] = o[k];
  return out;
}
