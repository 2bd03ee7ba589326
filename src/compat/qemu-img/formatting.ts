/**
 * The line qemu-img create prints before it makes an image:
 * `Formatting 'FILE', fmt=FMT opt=value ...`. QEMU prints every create option of the format
 * (then of the file protocol) in the format's own declaration order: string options whenever they
 * have a value or a default, sizes and numbers as parsed integers when given (their default text
 * otherwise), booleans as given or defaulted. Commas inside values are doubled.
 */

type Kind = 'string' | 'size' | 'number' | 'bool';
interface Desc {
  name: string;
  kind: Kind;
  def?: string;
}

const CRYPTO = (prefix: string): Desc[] => [
  { name: `${prefix}key-secret`, kind: 'string' },
  { name: `${prefix}cipher-alg`, kind: 'string' },
  { name: `${prefix}cipher-mode`, kind: 'string' },
  { name: `${prefix}ivgen-alg`, kind: 'string' },
  { name: `${prefix}ivgen-hash-alg`, kind: 'string' },
  { name: `${prefix}hash-alg`, kind: 'string' },
  { name: `${prefix}iter-time`, kind: 'number' },
];

/** The file protocol's create options, appended after the format's (duplicates skipped). */
const FILE_OPTIONS: Desc[] = [
  { name: 'size', kind: 'size' },
  { name: 'nocow', kind: 'bool' },
  { name: 'preallocation', kind: 'string' },
  { name: 'extent_size_hint', kind: 'size' },
];

const FORMAT_OPTIONS: Record<string, Desc[]> = {
  qcow2: [
    { name: 'encryption', kind: 'bool' },
    { name: 'encrypt.format', kind: 'string' },
    ...CRYPTO('encrypt.'),
    { name: 'cluster_size', kind: 'size', def: '65536' },
    { name: 'extended_l2', kind: 'bool', def: 'off' },
    { name: 'preallocation', kind: 'string' },
    { name: 'compression_type', kind: 'string', def: 'zlib' },
    { name: 'size', kind: 'size' },
    { name: 'compat', kind: 'string' },
    { name: 'backing_file', kind: 'string' },
    { name: 'backing_fmt', kind: 'string' },
    { name: 'data_file', kind: 'string' },
    { name: 'data_file_raw', kind: 'bool' },
    { name: 'lazy_refcounts', kind: 'bool', def: 'off' },
    { name: 'refcount_bits', kind: 'number', def: '16' },
  ],
  qcow: [
    { name: 'size', kind: 'size' },
    { name: 'backing_file', kind: 'string' },
    { name: 'backing_fmt', kind: 'string' },
    { name: 'encryption', kind: 'bool' },
    { name: 'encrypt.format', kind: 'string' },
    { name: 'encrypt.key-secret', kind: 'string' },
  ],
  raw: [{ name: 'size', kind: 'size' }],
  luks: [{ name: 'size', kind: 'size' }, ...CRYPTO('')],
};

/** Every create option name a format takes (its own, then the file protocol's). */
export function createOptionNames(format: string): string[] | undefined {
  const own = FORMAT_OPTIONS[format];
  if (!own) return undefined;
  return [...new Set([...own, ...FILE_OPTIONS].map((d) => d.name))];
}

export function optionKind(format: string, name: string): Kind | undefined {
  return [...(FORMAT_OPTIONS[format] ?? []), ...FILE_OPTIONS].find((d) => d.name === name)?.kind;
}

/**
 * The line for `format`, given the options as the user wrote them plus `size`, `backing_file`
 * and `backing_fmt` as settled by create. Sizes and numbers come already parsed.
 */
export function formattingLine(file: string, format: string, given: Map<string, string>): string {
  const seen = new Set<string>();
  const parts: string[] = [];
  for (const d of [...(FORMAT_OPTIONS[format] ?? []), ...FILE_OPTIONS]) {
    if (seen.has(d.name)) continue;
    seen.add(d.name);
    const v = given.get(d.name) ?? d.def;
    if (v === undefined) continue;
    parts.push(`${d.name}=${d.kind === 'string' ? v.replaceAll(',', ',,') : v}`);
  }
  return `Formatting '${file}', fmt=${format} ${parts.join(' ')}`;
}
