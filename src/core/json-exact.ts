/**
 * JSON with byte counts past 2^53 printed exactly. JSON.stringify prints a number as its shortest
 * round-trip form, so a virtual size of 2^55 comes out as 36028797018963970; QEMU prints the
 * integer (36028797018963968). Such numbers are whole sectors, exact as doubles (core/bytes.ts).
 */
import { byteCountText } from './bytes.js';

// A string no JSON value of ours contains: it marks the numbers to print as integers.
const MARK = '\u0000exact:';

/** JSON.stringify(value, null, indent), with every integer past 2^53 printed exactly. */
export function stringifyExact(value: unknown, indent?: number): string {
  let marked = false;
  const text = JSON.stringify(
    value,
    (_k, v: unknown) => {
      if (typeof v !== 'number' || Number.isSafeInteger(v) || !Number.isInteger(v)) return v;
      marked = true;
      return MARK + byteCountText(v);
    },
    indent,
  );
  // Only the rare document that has such a number pays for the second pass.
  return marked ? text.replace(/"\\u0000exact:(\d+)"/g, '$1') : text;
}
