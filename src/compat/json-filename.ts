/**
 * QEMU's `json:{...}` pseudo-filenames: a block node's options as a JSON object. QEMU's JSON
 * parser also takes single-quoted strings (the iotests write them so), so this is a small parser
 * of its own rather than JSON.parse. The object comes back flattened to QEMU's dotted keys
 * (`{'file': {'filename': 'x'}}` is `file.filename=x`), every value a string, as `-o` gives them.
 */
import { QcowError } from '../node.js';

export const JSON_PREFIX = 'json:';

export function isJsonFilename(name: string): boolean {
  return name.startsWith(JSON_PREFIX);
}

/** The options a `json:` filename holds; QCOW_INVALID_ARGUMENT when it is not a JSON object. */
export function jsonFilenameOptions(name: string): Record<string, string> {
  const out: Record<string, string> = {};
  flatten(parseObject(name, false), '', out);
  return out;
}

/** An integer as written in a `json:` name (kept as text: sizes past 2^53 stay exact). */
export class JsonInteger {
  constructor(readonly text: string) {}
}

/**
 * The object a `json:` filename holds with its values' JSON types (integers as JsonInteger),
 * dotted keys (`'file.filename'`) nested as QEMU nests them; QCOW_INVALID_ARGUMENT when it is not
 * a JSON object.
 */
export function jsonFilenameTree(name: string): Record<string, unknown> {
  return nest(parseObject(name, true));
}

function parseObject(name: string, typedIntegers: boolean): Record<string, unknown> {
  const p = new Parser(name.slice(JSON_PREFIX.length), typedIntegers);
  const value = p.value();
  p.end();
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `Could not parse the JSON options: not an object`);
  }
  return value as Record<string, unknown>;
}

function nest(obj: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, v] of Object.entries(obj)) {
    const value = v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof JsonInteger) ? nest(v as Record<string, unknown>) : v;
    const path = key.split('.');
    let at = out;
    for (const part of path.slice(0, -1)) {
      const next = at[part];
      at = next !== null && typeof next === 'object' && !Array.isArray(next) && !(next instanceof JsonInteger) ? (next as Record<string, unknown>) : (at[part] = {});
    }
    at[path[path.length - 1]!] = value;
  }
  return out;
}

function flatten(obj: Record<string, unknown>, prefix: string, out: Record<string, string>): void {
  for (const [k, v] of Object.entries(obj)) {
    if (v !== null && typeof v === 'object' && !Array.isArray(v)) flatten(v as Record<string, unknown>, `${prefix}${k}.`, out);
    else if (Array.isArray(v)) v.forEach((item, i) => (item !== null && typeof item === 'object' ? flatten(item as Record<string, unknown>, `${prefix}${k}.${i}.`, out) : (out[`${prefix}${k}.${i}`] = scalar(item))));
    else out[prefix + k] = scalar(v);
  }
}

function scalar(v: unknown): string {
  if (typeof v === 'boolean') return v ? 'on' : 'off';
  return String(v);
}

class Parser {
  private i = 0;
  constructor(
    private readonly s: string,
    private readonly typedIntegers = false,
  ) {}

  private fail(what: string): never {
    throw new QcowError('QCOW_INVALID_ARGUMENT', `Could not parse the JSON options: ${what} at ${this.i}`);
  }
  private ws(): void {
    while (this.i < this.s.length && /\s/.test(this.s[this.i]!)) this.i++;
  }
  end(): void {
    this.ws();
    if (this.i !== this.s.length) this.fail('unexpected text');
  }
  value(): unknown {
    this.ws();
    const c = this.s[this.i];
    if (c === '{') return this.object();
    if (c === '[') return this.array();
    if (c === '"' || c === "'") return this.string();
    const m = /^(?:-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)/.exec(this.s.slice(this.i));
    if (!m) this.fail('unexpected character');
    this.i += m[0].length;
    if (m[0] === 'true') return true;
    if (m[0] === 'false') return false;
    if (m[0] === 'null') return null;
    // Integers are kept as written (sizes past 2^53 stay exact).
    if (!/^-?\d+$/.test(m[0])) return Number(m[0]);
    return this.typedIntegers ? new JsonInteger(m[0]) : m[0];
  }
  private object(): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    this.i++;
    this.ws();
    if (this.s[this.i] === '}') {
      this.i++;
      return out;
    }
    for (;;) {
      this.ws();
      const c = this.s[this.i];
      if (c !== '"' && c !== "'") this.fail('expected a key');
      const key = this.string();
      this.ws();
      if (this.s[this.i++] !== ':') this.fail("expected ':'");
      out[key] = this.value();
      this.ws();
      const next = this.s[this.i++];
      if (next === '}') return out;
      if (next !== ',') this.fail("expected ',' or '}'");
    }
  }
  private array(): unknown[] {
    const out: unknown[] = [];
    this.i++;
    this.ws();
    if (this.s[this.i] === ']') {
      this.i++;
      return out;
    }
    for (;;) {
      out.push(this.value());
      this.ws();
      const next = this.s[this.i++];
      if (next === ']') return out;
      if (next !== ',') this.fail("expected ',' or ']'");
    }
  }
  private string(): string {
    const quote = this.s[this.i++];
    let out = '';
    while (this.i < this.s.length) {
      const c = this.s[this.i++]!;
      if (c === quote) return out;
      if (c !== '\\') {
        out += c;
        continue;
      }
      const e = this.s[this.i++];
      const simple: Record<string, string> = { '"': '"', "'": "'", '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
      if (e !== undefined && e in simple) out += simple[e];
      else if (e === 'u') {
        const hex = this.s.slice(this.i, this.i + 4);
        if (!/^[0-9a-fA-F]{4}$/.test(hex)) this.fail('bad \\u escape');
        out += String.fromCharCode(Number.parseInt(hex, 16));
        this.i += 4;
      } else this.fail('bad escape');
    }
    return this.fail('unterminated string');
  }
}
