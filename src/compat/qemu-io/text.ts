/**
 * qemu-io's number parsing and printing: sizes with suffixes (`64k`, `1.5M`, `0x200`), the
 * human size form (`64 KiB`, `1.500 KiB`, `512 bytes`), the statistics line, and the `-v` hexdump.
 * Pure functions: no I/O, so they are tested on their own.
 */

/** A parsed size, or the reason it is not one (qemu's EINVAL / ERANGE). */
export type Num = { value: number } | { error: 'invalid' | 'range' };

const UNITS: Record<string, bigint> = { B: 1n, K: 1n << 10n, M: 1n << 20n, G: 1n << 30n, T: 1n << 40n, P: 1n << 50n, E: 1n << 60n };
const INT64_MAX = (1n << 63n) - 1n;

/**
 * A byte count as qemu-io reads it: decimal with an optional fraction and a binary suffix
 * (B K M G T P E, any case), or hexadecimal (`0x...`, no fraction). A fraction needs a suffix
 * other than B; the result is rounded to the nearest byte. Negative numbers are invalid.
 */
export function parseNumber(text: string): Num {
  const s = text.replace(/^[ \t\n\r\f\v]+/, '');
  let m = /^(0[xX])([0-9a-fA-F]+)(.*)$/.exec(s);
  let int: bigint;
  let frac = '';
  let rest: string;
  let hex = false;
  if (m) {
    int = BigInt('0x' + m[2]!);
    rest = m[3]!;
    if (rest.startsWith('.')) return { error: 'invalid' };
    hex = true;
  } else {
    m = /^(\d+)(?:\.(\d*))?(.*)$/.exec(s);
    if (!m) return { error: 'invalid' };
    int = BigInt(m[1]!);
    frac = m[2] ?? '';
    rest = m[3]!;
    if (m[2] !== undefined && /^[eE]/.test(rest)) return { error: 'invalid' };
  }
  if (int >= 1n << 64n) return { error: 'range' };
  let mul = 1n;
  if (rest.length > 0) {
    const u = UNITS[rest[0]!.toUpperCase()];
    if (u === undefined || rest.length > 1) return { error: 'invalid' };
    mul = u;
  }
  void hex;
  let value: bigint;
  if (mul === 1n) {
    if (/[1-9]/.test(frac)) return { error: 'invalid' };
    value = int;
  } else {
    value = int * mul;
    if (frac) {
      const den = 10n ** BigInt(frac.length);
      const f = BigInt(frac) * mul;
      value += (f * 2n + den) / (den * 2n); // rounded half up, as qemu does
    }
  }
  if (value >= 1n << 64n) return { error: 'range' };
  if (value > INT64_MAX) return { error: 'range' };
  return { value: Number(value) };
}

/** qemu-io's line for a number it could not parse. */
export function numberError(n: Num & { error: string }, arg: string): string {
  return n.error === 'range'
    ? `Parsing error: argument too large -- ${arg}\n`
    : `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${arg}\n`;
}

/**
 * C's "%.Nf": the exact value rounded, ties to even. toFixed rounds the exact value too but sends
 * ties up (1.0625 gives "1.063" where printf gives "1.062"); a tie is exact only when the scaled
 * value is, so it can be caught and sent to the even neighbour.
 */
export function fixed(v: number, digits: number): string {
  const scale = 10 ** digits;
  const scaled = v * scale;
  if (Number.isFinite(scaled) && Math.abs(scaled) < 2 ** 52 && scaled - Math.floor(scaled) === 0.5 && scaled / scale === v) {
    const lo = Math.floor(scaled);
    return ((lo % 2 === 0 ? lo : lo + 1) / scale).toFixed(digits);
  }
  return v.toFixed(digits);
}

const SUFFIXES: [number, string][] = [
  [2 ** 60, 'EiB'],
  [2 ** 50, 'PiB'],
  [2 ** 40, 'TiB'],
  [2 ** 30, 'GiB'],
  [2 ** 20, 'MiB'],
  [2 ** 10, 'KiB'],
];

/** A size for people: three decimals with a binary unit, the decimals dropped when they are .000. */
export function humanSize(value: number): string {
  let text: string;
  let suffix = ' bytes';
  const unit = SUFFIXES.find(([u]) => value >= u);
  if (unit) {
    text = fixed(value / unit[0], 3);
    suffix = ' ' + unit[1];
  } else text = fixed(value, 6);
  const at = text.indexOf('.000');
  return at >= 0 ? text.slice(0, at) + suffix : text + suffix;
}

/** Elapsed time as qemu-io prints it: `00.00 sec`, or `H:MM:SS.ss` from one second on (always with -C). */
export function timeText(seconds: number, verbose: boolean): string {
  const whole = Math.floor(seconds);
  const frac = seconds - whole;
  const pad = (v: number) => fixed(v, 2).padStart(5, '0');
  if (verbose || whole > 0) {
    const h = Math.floor(whole / 3600);
    const m = Math.floor((whole % 3600) / 60);
    return `${h}:${String(m).padStart(2, '0')}:${pad((whole % 60) + frac)}`;
  }
  return `${pad(frac)} sec`;
}

/** The two report lines of read/write/discard (or the one -C line). */
export function report(op: string, seconds: number, offset: number, count: number, total: number, ops: number, machine: boolean): string {
  const secs = seconds > 0 ? seconds : 1e-9;
  const t = timeText(seconds, machine);
  if (machine) return `${total},${ops},${t},${fixed(total / secs, 3)},${fixed(ops / secs, 3)}\n`;
  return `${op} ${total}/${count} bytes at offset ${offset}\n` + `${humanSize(total)}, ${ops} ops; ${t} (${humanSize(total / secs)}/sec and ${fixed(ops / secs, 4)} ops/sec)\n`;
}

const isAlnum = (b: number) => (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a);

/** The `-v` dump: 16 bytes a line, offset in hex, the bytes, then letters and digits (others as '.'). */
export function hexdump(buf: Uint8Array, offset: number): string {
  const lines: string[] = [];
  for (let i = 0; i < buf.length; i += 16) {
    const row = buf.subarray(i, Math.min(i + 16, buf.length));
    let hex = '';
    let text = '';
    for (const b of row) {
      hex += b.toString(16).padStart(2, '0') + ' ';
      text += isAlnum(b) ? String.fromCharCode(b) : '.';
    }
    lines.push(`${(offset + i).toString(16).padStart(8, '0')}:  ${hex} ${text}\n`);
  }
  return lines.join('');
}

/** A pattern byte as `-P` takes it (C's strtol base 0: decimal, 0x hex, 0 octal), or null. */
export function parsePatternByte(text: string): number | null {
  const m = /^[ \t\n\r\f\v]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!m) return null;
  const body = m[2]!;
  let v = /^0[xX]/.test(body) ? Number.parseInt(body.slice(2), 16) : body.length > 1 && body[0] === '0' ? Number.parseInt(body, 8) : Number(body);
  if (m[1] === '-') v = -v;
  return v >= 0 && v <= 255 ? v : null;
}

/** C's strerror for the errno values the block layer returns here. */
export const ERRNO_TEXT = {
  EIO: 'Input/output error',
  EINVAL: 'Invalid argument',
  ENOTSUP: 'Operation not supported',
  EPERM: 'Operation not permitted',
  EACCES: 'Permission denied',
  ENOSPC: 'No space left on device',
  ENOENT: 'No such file or directory',
  ERANGE: 'Numerical result out of range',
  EBUSY: 'Device or resource busy',
  EFBIG: 'File too large',
  ENOMEDIUM: 'No medium found',
  ENOMEM: 'Cannot allocate memory',
  EOVERFLOW: 'Value too large for defined data type',
  ESHUTDOWN: 'Cannot send after transport endpoint shutdown',
} as const;

/**
 * The errno a QEMU client takes an NBD error value for: the protocol's few values are Linux's
 * numbers, and any other value counts as EINVAL (as QEMU's NBD client counts it).
 */
export function nbdErrnoName(value: number): keyof typeof ERRNO_TEXT {
  switch (value) {
    case 1:
      return 'EPERM';
    case 5:
      return 'EIO';
    case 12:
      return 'ENOMEM';
    case 28:
      return 'ENOSPC';
    case 75:
      return 'EOVERFLOW';
    case 95:
      return 'ENOTSUP';
    case 108:
      return 'ESHUTDOWN';
    default:
      return 'EINVAL';
  }
}
