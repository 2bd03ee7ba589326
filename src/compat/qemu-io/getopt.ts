/**
 * GNU getopt as qemu-io uses it, for the program's options and each command's: short options
 * (`-abc`, `-P 5`, `-P5`), long options (`--cmd=x`, `--cmd x`, unique prefixes), operands mixed
 * in among options (they are moved after them), and `--` ending the options. Errors are reported
 * in getopt's words (`read: invalid option -- 'x'`) through `onError`.
 */
export interface LongOption {
  name: string;
  hasArg: boolean;
  /** The short option it stands for, or its own key. */
  key: string;
}

export interface GetoptResult {
  options: { key: string; arg?: string }[];
  operands: string[];
}

/**
 * Parse `args` (without the program or command name). `spec` is getopt's option string
 * (`"bCl:pP:qs:v"`). Returns null after reporting the first bad option, as the callers then
 * print their usage.
 */
export function getopt(prog: string, args: string[], spec: string, longs: LongOption[], onError: (line: string) => void): GetoptResult | null {
  const options: { key: string; arg?: string }[] = [];
  const operands: string[] = [];
  const takesArg = (ch: string): boolean | undefined => {
    const i = spec.indexOf(ch);
    if (ch === ':' || i < 0) return undefined;
    return spec[i + 1] === ':';
  };
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') {
      operands.push(...args.slice(i + 1));
      break;
    }
    if (a.startsWith('--') && longs.length > 0) {
      const eq = a.indexOf('=');
      const name = a.slice(2, eq < 0 ? undefined : eq);
      const exact = longs.find((l) => l.name === name);
      const prefixed = longs.filter((l) => l.name.startsWith(name));
      const opt = exact ?? (prefixed.length === 1 ? prefixed[0] : undefined);
      if (!opt) {
        if (prefixed.length > 1) onError(`${prog}: option '${a}' is ambiguous\n`);
        else onError(`${prog}: unrecognized option '${a}'\n`);
        return null;
      }
      if (opt.hasArg) {
        if (eq >= 0) options.push({ key: opt.key, arg: a.slice(eq + 1) });
        else if (i + 1 < args.length) options.push({ key: opt.key, arg: args[++i]! });
        else {
          onError(`${prog}: option '--${opt.name}' requires an argument\n`);
          return null;
        }
      } else if (eq >= 0) {
        onError(`${prog}: option '--${opt.name}' doesn't allow an argument\n`);
        return null;
      } else options.push({ key: opt.key });
      continue;
    }
    if (a.startsWith('-') && a.length > 1) {
      for (let j = 1; j < a.length; j++) {
        const ch = a[j]!;
        const arg = takesArg(ch);
        if (arg === undefined) {
          onError(`${prog}: invalid option -- '${ch}'\n`);
          return null;
        }
        if (!arg) {
          options.push({ key: ch });
          continue;
        }
        if (j + 1 < a.length) options.push({ key: ch, arg: a.slice(j + 1) });
        else if (i + 1 < args.length) options.push({ key: ch, arg: args[++i]! });
        else {
          onError(`${prog}: option requires an argument -- '${ch}'\n`);
          return null;
        }
        break;
      }
      continue;
    }
    operands.push(a);
  }
  return { options, operands };
}
