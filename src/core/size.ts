/** Sizes as qemu-img writes them: a number with an optional k/M/G/T/P/E suffix (powers of 1024). */
import { invalidArgument } from './errors.js';
import { isExactByteCount } from './bytes.js';

const UNITS: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/**
 * A size as qemu-img reads it ("10G", "512", "1.5M", "64KiB", "0x10000"), in bytes: k/M/G/T/P/E are powers
 * of 1024. `what` names the value in the error (QCOW_INVALID_ARGUMENT) for a malformed one.
 *
 * @example
 * ```ts
 * import { parseSize } from 'qcow';
 *
 * parseSize('10G'); // 10737418240
 * ```
 */
export function parseSize(text: string, what = 'size'): number {
  // 0x-hex as qemu takes it: whole bytes, no fraction and no suffix.
  const hex = /^\s*(0x[0-9a-f]+)\s*$/i.exec(text);
  if (hex) {
    const v = Number.parseInt(hex[1]!, 16);
    if (!Number.isSafeInteger(v) && !exactly(v, BigInt(hex[1]!))) throw invalidArgument(`invalid ${what} '${text}': not a whole number of bytes below 2^53`);
    return v;
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) throw invalidArgument(`invalid ${what} '${text}': expected a number with an optional k, M, G, T suffix`);
  const value = Number(m[1]) * UNITS[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(value) && !(/^\d+$/.test(m[1]!) && exactly(value, BigInt(m[1]!) * BigInt(UNITS[m[2]!.toLowerCase()]!)))) throw invalidArgument(`invalid ${what} '${text}': not a whole number of bytes below 2^53`);
  return value;
}

/** Past 2^53: whether `v` is whole sectors (exact as a number, core/bytes.ts) and the value written. */
function exactly(v: number, written: bigint): boolean {
  return isExactByteCount(v) && BigInt(v) === written;
}

/** Offsets in the qemu-io language: decimal, 0x-hex, or with a size suffix (as sizes are read). */
export function parseOffset(text: string, what = 'offset'): number {
  return parseSize(text, what);
}

/**
 * Human form as qemu-img prints it: three significant digits, moving to the next unit once the
 * number would reach 1000 ("0.977 KiB" for 1000 bytes, "2.58 MiB", "196 KiB", "512 B").
 */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  const exp = bytes > 0 ? Math.floor(Math.log2(bytes * 1.024)) : 0;
  const i = Math.max(0, Math.min(units.length - 1, Math.trunc(exp / 10)));
  const v = bytes / 2 ** (i * 10);
  let s = v.toPrecision(3);
  if (s.includes('.') && !s.includes('e')) s = s.replace(/0+$/, '').replace(/\.$/, '');
  return `${s} ${units[i]}`;
}
