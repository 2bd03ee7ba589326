/** The formats a program knows, found by name or by probing an image's first bytes. */
import type { ImageFormat } from './block-device.js';
import { QcowError } from './errors.js';

/**
 * A set of image formats, looked up by name (`-f`) or by probing an image's first bytes. Give one
 * to the open and create functions (`formats`) to limit or extend the formats they accept.
 *
 * @example
 * ```ts
 * import { FormatRegistry, builtinFormats, rawFormat } from 'qcow';
 *
 * console.log(builtinFormats().names()); // [ 'raw', 'qcow', 'qcow2', 'luks' ]
 * const rawOnly = new FormatRegistry([rawFormat]); // open everything as raw, never probe
 * ```
 */
export class FormatRegistry {
  private readonly byName = new Map<string, ImageFormat>();

  constructor(formats: ImageFormat[]) {
    for (const f of formats) this.byName.set(f.name, f);
  }

  /** The formats' names, in the order they were given. */
  names(): string[] {
    return [...this.byName.keys()];
  }

  /** The format called `name`; QCOW_INVALID_ARGUMENT when there is none. */
  get(name: string): ImageFormat {
    const f = this.byName.get(name);
    if (!f) throw new QcowError('QCOW_INVALID_ARGUMENT', `Unknown file format '${name}' (known: ${this.names().join(', ')})`);
    return f;
  }

  /**
   * The format whose magic matches `head` best; `fallback` (raw) when none does. Raw never claims
   * an image by itself, so a format is only ever guessed from positive evidence.
   */
  probe(head: Uint8Array, fallback = 'raw'): ImageFormat {
    let best: ImageFormat | undefined;
    let bestScore = 0;
    for (const f of this.byName.values()) {
      const s = f.probe(head);
      if (s > bestScore) {
        best = f;
        bestScore = s;
      }
    }
    return best ?? this.get(fallback);
  }
}
