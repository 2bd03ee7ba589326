/** Option values as qemu-img reads them: sizes, `-o` lists, `--object secret,...`. */
import { readFileSync } from 'node:fs';
import type { Parsed } from '../getopt.js';
import { splitOptionItems } from '../../cli/option-list.js';

const SUFFIX: Record<string, bigint> = { b: 1n, k: 1n << 10n, m: 1n << 20n, g: 1n << 30n, t: 1n << 40n, p: 1n << 50n, e: 1n << 60n };

/** A size qemu-img refuses, with its two kinds of complaint. */
export class SizeError extends Error {
  constructor(readonly range: boolean) {
    super(range ? 'size out of range' : 'size not understood');
  }
  /** QEMU's lines for a size named `what` ("image size", "start offset"...). */
  lines(what: string): string[] {
    return this.range
      ? [`Invalid ${what} specified. Must be between 0 and 9223372036854775807.`]
      : [`Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for`, 'kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.'];
  }
}

/**
 * A byte count: a number (decimal, or 0x-hex without suffix) with an optional B/K/M/G/T/P/E
 * suffix (powers of 1024); fractions are allowed with a suffix. Up to 2^63-1; values past 2^53
 * come back as unsafe numbers (callers that need exactness check Number.isSafeInteger).
 */
export function qemuSize(text: string): number {
  return Number(qemuSizeExact(text));
}

/** qemuSize, exact (as QEMU prints sizes past 2^53). */
export function qemuSizeExact(text: string): bigint {
  const m = /^\s*(0x[0-9a-f]+|\d+(?:\.\d*)?|\.\d+)([bkmgtpe])?$/i.exec(text);
  if (!m) throw new SizeError(false);
  const unit = SUFFIX[(m[2] ?? 'b').toLowerCase()]!;
  let bytes: bigint;
  if (m[1]!.startsWith('0x') || m[1]!.startsWith('0X')) {
    if (m[2] !== undefined) throw new SizeError(false);
    bytes = BigInt(m[1]!);
  } else {
    const [whole, frac = ''] = m[1]!.split('.');
    const scale = 10n ** BigInt(frac.length);
    bytes = (BigInt(whole || '0') * scale + BigInt(frac || '0')) * unit;
    if (bytes % scale !== 0n && unit === 1n) throw new SizeError(false);
    bytes /= scale;
  }
  if (bytes > (1n << 63n) - 1n) throw new SizeError(true);
  return bytes;
}

/** An `-o` list (several -o are joined by commas): `k=v` pairs, `,,` a literal comma, a bare word is `word=on`. */
export function splitOptions(text: string): Map<string, string> {
  const out = new Map<string, string>();
  const parts = splitOptionItems(text);
  for (const p of parts) {
    if (p === '') continue;
    const eq = p.indexOf('=');
    if (eq < 0) out.set(p, 'on');
    else out.set(p.slice(0, eq), p.slice(eq + 1));
  }
  return out;
}

/** `--object secret,id=ID,data=TEXT` (or `file=PATH`): the secrets by id. */
export function secretsOf(parsed: Parsed): Map<string, string> {
  const out = new Map<string, string>();
  for (const o of parsed.options) {
    if (o.key !== 'object') continue;
    const kv = splitOptions(o.value ?? '');
    const id = kv.get('id');
    if (!id || !(kv.has('secret') || o.value!.startsWith('secret'))) continue;
    if (kv.has('data')) out.set(id, kv.get('data')!);
    else if (kv.has('file')) {
      out.set(id, readFileSync(kv.get('file')!, 'utf8'));
    }
  }
  return out;
}
