/**
 * Command-line scanning as QEMU's programs do it (GNU getopt_long with a leading ':' in the
 * option string): options and operands may be mixed, `--` ends the options, a short option that
 * takes an argument takes the rest of its word or the next word, a long option takes `=value` or
 * the next word and may be abbreviated to any unambiguous prefix.
 */

export interface LongOption {
  name: string;
  /** Whether the option takes an argument. */
  arg: boolean;
  /** What it is reported as: a short option letter, or the long name itself. */
  key: string;
}

export interface Parsed {
  /** Options in the order given: key and argument (undefined for flags). */
  options: { key: string; value: string | undefined }[];
  operands: string[];
}

export class GetoptError extends Error {
  constructor(
    readonly kind: 'missing' | 'unknown',
    readonly option: string,
  ) {
    super(kind === 'missing' ? `missing argument for option '${option}'` : `unrecognized option '${option}'`);
  }
}

export function getopt(args: string[], shortSpec: string, longs: LongOption[] = []): Parsed {
  const spec = shortSpec.replace(/^[+:]+/, '');
  const takesArg = new Map<string, boolean>();
  for (let i = 0; i < spec.length; i++) {
    const c = spec[i]!;
    if (c === ':') continue;
    takesArg.set(c, spec[i + 1] === ':');
  }
  const options: Parsed['options'] = [];
  const operands: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') {
      operands.push(...args.slice(i + 1));
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq);
      const exact = longs.find((l) => l.name === name);
      const prefixed = longs.filter((l) => l.name.startsWith(name));
      const opt = exact ?? (prefixed.length === 1 ? prefixed[0] : undefined);
      if (!opt || name === '') throw new GetoptError('unknown', a);
      if (!opt.arg) {
        if (eq >= 0) throw new GetoptError('unknown', a);
        options.push({ key: opt.key, value: undefined });
      } else if (eq >= 0) options.push({ key: opt.key, value: a.slice(eq + 1) });
      else {
        if (i + 1 >= args.length) throw new GetoptError('missing', a);
        options.push({ key: opt.key, value: args[++i]! });
      }
      continue;
    }
    if (a.startsWith('-') && a.length > 1) {
      for (let j = 1; j < a.length; j++) {
        const c = a[j]!;
        const arg = takesArg.get(c);
        if (arg === undefined) throw new GetoptError('unknown', a);
        if (!arg) {
          options.push({ key: c, value: undefined });
          continue;
        }
        if (j + 1 < a.length) options.push({ key: c, value: a.slice(j + 1) });
        else {
          if (i + 1 >= args.length) throw new GetoptError('missing', a);
          options.push({ key: c, value: args[++i]! });
        }
        break;
      }
      continue;
    }
    operands.push(a);
  }
  return { options, operands };
}
