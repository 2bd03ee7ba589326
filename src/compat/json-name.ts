/**
 * The name QEMU gives a node opened from a `json:{...}` filename, which is what qemu-img info and
 * map print for it: not the name as typed but one made again from the node. A node whose options
 * come down to a file's is named by that file's name (a format over `{"driver": "file",
 * "filename": "x"}` is plain `x`; null-co with none of its own options is `null-co://`); any
 * other is `json:` and its options as QEMU prints JSON on one line: only the options that change
 * what the node reads ("strong" ones, per driver), the child nodes nested the same way, the keys
 * in QEMU's hash order (qemu-json.ts) and `", "`/`": "` between them.
 *
 * Only drivers whose strong options are known here are named this way; for any other the caller
 * keeps the name as typed.
 */
import { JsonInteger, jsonFilenameTree } from './json-filename.js';
import { qdictBucket } from './qemu-json.js';

/** Per driver, the options that stay in its name. */
const STRONG: Record<string, readonly string[]> = {
  file: ['filename'],
  host_device: ['filename'],
  host_cdrom: ['filename'],
  'null-co': ['size', 'read-zeroes'],
  'null-aio': ['size', 'read-zeroes'],
  raw: ['offset', 'size'],
  qcow2: [],
};
const PROTOCOLS = new Set(['file', 'host_device', 'host_cdrom']);
const NULL_DRIVERS = new Set(['null-co', 'null-aio']);

interface Named {
  /** The plain name, when the node has one. */
  exact?: string;
  /** Its options as they appear in a `json:` name. */
  full: Record<string, unknown>;
}

/**
 * The name QEMU shows for the node `name` (a `json:` filename) opens, `format` being the top
 * node's driver when the name does not say (the command line's or the probed one); undefined
 * when a driver of the tree is one this module does not know (or the name is not valid JSON).
 */
export function qemuJsonName(name: string, format?: string): string | undefined {
  let tree: Record<string, unknown>;
  try {
    tree = jsonFilenameTree(name);
  } catch {
    return undefined;
  }
  const top = nameOf(tree, format ?? 'raw');
  if (!top) return undefined;
  return top.exact ?? `json:${oneLine(top.full)}`;
}

function nameOf(node: Record<string, unknown>, defaultDriver: string): Named | undefined {
  const driver = typeof node.driver === 'string' ? node.driver : defaultDriver;
  const strong = STRONG[driver];
  if (!strong) return undefined;
  const full: Record<string, unknown> = { driver };
  for (const k of strong) if (k in node) full[k] = node[k];
  const own = strong.filter((k) => k in node);
  if (PROTOCOLS.has(driver)) return typeof node.filename === 'string' ? { exact: node.filename, full } : undefined;
  if (NULL_DRIVERS.has(driver)) return own.length === 0 ? { exact: `${driver}://`, full } : { full };
  // A format over its file (raw is the only one named here): the file's name when the format
  // adds nothing of its own.
  const file = node.file;
  if (file === null || typeof file !== 'object' || Array.isArray(file) || file instanceof JsonInteger) return undefined;
  const child = nameOf(file as Record<string, unknown>, 'file');
  if (!child) return undefined;
  full.file = child.full;
  return own.length === 0 && child.exact !== undefined ? { exact: child.exact, full } : { full };
}

/**
 * JSON on one line as QEMU writes it (`{"a": 1, "b": [2, 3]}`): an object's keys in QEMU's hash
 * order (by bucket; newest first within one), non-ASCII escaped.
 */
function oneLine(v: unknown): string {
  if (v instanceof JsonInteger) return v.text;
  if (Array.isArray(v)) return `[${v.map(oneLine).join(', ')}]`;
  if (v !== null && typeof v === 'object') {
    const entries = Object.entries(v as Record<string, unknown>).map(([k, x], i) => ({ k, x, i, b: qdictBucket(k) }));
    entries.sort((p, q) => p.b - q.b || q.i - p.i);
    return `{${entries.map(({ k, x }) => `${oneLine(k)}: ${oneLine(x)}`).join(', ')}}`;
  }
  if (typeof v === 'string') return JSON.stringify(v).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  return JSON.stringify(v);
}
