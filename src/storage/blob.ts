/**
 * Images in a `Blob` (a `File` a user picked or dropped in a page): read-only, read lazily through
 * `Blob.slice`, so a 64 GiB file costs only the ranges that are read, never the whole file in
 * memory. `blobOpener` opens a chain from a set of files: a backing file is found among them by
 * its base name (a page cannot reach the folder a local file came from).
 */
import { QcowError } from '../core/errors.js';
import type { ByteStore, StoreOpener } from './types.js';

/**
 * A read-only {@link ByteStore} over a `Blob` or `File` (from an `<input type=file>` or a drop),
 * read lazily with `Blob.slice`. {@link blobOpener} makes one per file of a chain.
 */
export class BlobStore implements ByteStore {
  /** Always true: files opened in a page are read-only. */
  readonly readOnly = true;

  /** `blob`: the bytes; `name`: what messages call it (a File's name by default). */
  constructor(
    private readonly blob: Blob,
    readonly name: string = (blob as { name?: string }).name ?? 'blob',
  ) {}

  async size(): Promise<number> {
    return this.blob.size;
  }

  async read(offset: number, into: Uint8Array): Promise<number> {
    const end = Math.min(this.blob.size, offset + into.length);
    let n = 0;
    if (offset < end) {
      const bytes = new Uint8Array(await this.blob.slice(offset, end).arrayBuffer());
      into.set(bytes);
      n = bytes.length;
    }
    // Past the end reads as zeros, as every store does (a truncated image reads as QEMU reads it).
    into.fill(0, n);
    return n;
  }

  /** Always fails with QCOW_READ_ONLY. */
  async write(): Promise<void> {
    throw new QcowError('QCOW_READ_ONLY', `${this.name}: a file opened in the page is read-only`);
  }

  async truncate(): Promise<void> {
    throw new QcowError('QCOW_READ_ONLY', `${this.name}: a file opened in the page is read-only`);
  }

  async flush(): Promise<void> {}

  /** Nothing to release. */
  async close(): Promise<void> {}
}

/** The last path component of a name written in an image (`../base/disk.qcow2` -> `disk.qcow2`). */
function baseName(name: string): string {
  return name.slice(name.replace(/\\/g, '/').lastIndexOf('/') + 1);
}

/**
 * An opener over a set of files: `open` takes a name as an image writes it and finds the file of
 * the same base name; a missing one fails with QCOW_NOT_FOUND, naming the file to add.
 *
 * @example
 * ```ts
 * import { openImageWith, blobOpener, builtinFormats } from 'qcow/browser';
 *
 * input.addEventListener('change', async () => {
 *   const files = [...input.files!]; // the image and its backing files
 *   const dev = await openImageWith(files[0]!.name, { opener: blobOpener(files), formats: builtinFormats(), readOnly: true });
 *   console.log(dev.format, dev.size);
 * });
 * ```
 */
export function blobOpener(files: Iterable<Blob & { name: string }>): StoreOpener {
  const byName = new Map<string, Blob & { name: string }>();
  for (const f of files) byName.set(f.name, f);
  return {
    async open(name, options) {
      if (!options.readOnly || options.create) throw new QcowError('QCOW_READ_ONLY', `${name}: files opened in the page are read-only`);
      const file = byName.get(baseName(name));
      if (!file) throw new QcowError('QCOW_NOT_FOUND', `${baseName(name)}: not among the files given (add the backing file too)`);
      return new BlobStore(file, file.name);
    },
    resolve: (name) => baseName(name),
    exists: async (name) => byName.has(baseName(name)),
  };
}
