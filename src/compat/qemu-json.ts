/**
 * JSON as QEMU's programs print it. QEMU keeps an object's members in a hash table of 512
 * buckets and prints them bucket by bucket (newest first within a bucket), so its key order is
 * fixed by the key names, not by the order they were set. Indent 4, as ours.
 */

import { stringifyExact } from '../node.js';

/** QEMU's bucket for a key (the tdb/gdbm string hash, modulo 512). */
export function qdictBucket(key: string): number {
  const bytes = Buffer.from(key, 'utf8');
  let v = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) v = (v + ((bytes[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  return ((Math.imul(1103515243, v) + 12345) >>> 0) % 512;
}

/** `value` with every object's keys in QEMU's order (arrays keep theirs). */
export function qemuOrder(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(qemuOrder);
  if (value === null || typeof value !== 'object') return value;
  const keys = Object.keys(value as object);
  const order = keys.map((k, i) => ({ k, i, b: qdictBucket(k) })).sort((x, y) => x.b - y.b || y.i - x.i);
  const out: Record<string, unknown> = {};
  for (const { k } of order) out[k] = qemuOrder((value as Record<string, unknown>)[k]);
  return out;
}

export function qemuJson(value: unknown): string {
  // QEMU prints an empty list or object over two lines, its closing bracket at the line's indent.
  return stringifyExact(qemuOrder(value), 4).replace(/^( *)(.*)(\[\]|\{\})(,?)$/gm, (_m, indent: string, head: string, pair: string, comma: string) => `${indent}${head}${pair[0]}\n${indent}${pair[1]}${comma}`);
}
