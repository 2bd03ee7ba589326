/**
 * Opening an image together with its backing chain. Each backing name is resolved against the
 * image that names it; the format an image records for its backing file is used as given (never
 * probed over); chains that loop or run deeper than a limit are refused.
 */
import type { BlockDevice, CreateOptions, OpenOptions } from '../core/block-device.js';
import { QcowError, withFile } from '../core/errors.js';
import type { FormatRegistry } from '../core/registry.js';
import type { ByteStore, StoreOpener } from '../storage/types.js';
import { NO_PERMISSIONS, permissionsFor } from '../storage/permissions.js';
import { withCopyOnRead } from './copy-on-read.js';

/** Options of {@link openImage} (exported as `openImageWith`): how an image and its backing chain are opened. */
export interface OpenImageOptions {
  /** The format to open it as; probed from the first bytes when absent. */
  format?: string;
  /** Open the top image read-only (backing images are read-only anyway, see `writableBacking`). */
  readOnly?: boolean;
  /**
   * Backing images are opened read-only, except those this says yes to (by resolved name and
   * depth, 1 = the top image's backing file): commit writes into one of them.
   */
  writableBacking?: (name: string, depth: number) => boolean;
  /** Password for an encrypted image (also tried for encrypted backing images). */
  password?: string;
  /**
   * The password of the image at `depth` of the chain (0 = the top image, 1 = its backing file),
   * when that image has one of its own (QEMU's `backing.encrypt.key-secret`); undefined: `password`.
   */
  passwordAt?: (depth: number) => string | undefined;
  /**
   * Reads copy what the backing chain supplies into the top image (QEMU's copy-on-read=on; see
   * {@link withCopyOnRead}). The image must be opened writable.
   */
  copyOnRead?: boolean;
  /** Open an internal snapshot (qcow2), read-only. */
  snapshot?: string;
  /** Open the top image's backing file as this format, whatever the image records (qemu's `backing.driver`). */
  backingFormat?: string;
  /**
   * Open this file as the top image's backing file, whatever the image records (QEMU's
   * `backing.file.filename`), named as the user named it (not against the image).
   */
  backingFile?: string;
  /** The top image's backing file, a raw one: see OpenOptions.rawWindow (QEMU's `backing.offset`, `backing.size`). */
  backingRawWindow?: OpenOptions['rawWindow'];
  /** Do not open backing files: unallocated ranges read as zeros (qemu-img's -u / `backing: null`). */
  noBacking?: boolean;
  /** Longest chain accepted, counting the top image. */
  maxDepth?: number;
  /** Refuse backing and data files outside the folder of the image that names them. */
  confineToFolder?: boolean;
  /**
   * When an image does not record its backing file's format (always so in qcow v1), QEMU probes
   * it, and so do we by default. Set this for untrusted images: such backing files are then opened
   * as raw, so bytes a guest wrote can never be taken for an image header that names other files.
   */
  rawUnnamedBackingFormats?: boolean;
  /** Budget in bytes for each image's cached metadata (L2 tables, refcount blocks). */
  cacheBytes?: number;
  /** qcow2 persistent bitmaps' memory limits (see OpenOptions). */
  bitmapLimits?: OpenOptions['bitmapLimits'];
  /**
   * Open to look at the metadata (as `info`, `map` and `snapshot` do): an encrypted image then
   * opens without its password, and reading its data fails with QCOW_NEED_PASSWORD.
   */
  inspectOnly?: boolean;
  /** Every image of the chain: see OpenOptions.skipDataFile. */
  skipDataFile?: boolean;
  /**
   * The top image's external data file, named as the user named it (not against the image):
   * QEMU's `data-file` open option, which also serves an image whose header records no name.
   */
  dataFile?: string;
  /** Every qcow2 image of the chain: see OpenOptions.refuseMalformedBitmaps. */
  refuseMalformedBitmaps?: boolean;
  /** The top image only: see OpenOptions.lazyRefcounts. */
  lazyRefcounts?: boolean;
  /** The top image only: see OpenOptions.discardPassthrough. */
  discardPassthrough?: OpenOptions['discardPassthrough'];
  /** The top image only: see OpenOptions.overlapCheck. */
  overlapCheck?: OpenOptions['overlapCheck'];
  /** The top image only (a raw one): see OpenOptions.rawWindow. */
  rawWindow?: OpenOptions['rawWindow'];
  /** Every image opened read-write: see OpenOptions.onRepair. */
  onRepair?: OpenOptions['onRepair'];
  /** Every image of the chain: see OpenOptions.onWarning. */
  onWarning?: OpenOptions['onWarning'];
  /**
   * Told the name of each image opened writable whose format was probed as raw (none given):
   * block 0 of such an image takes no write that would make it look like another format (see
   * OpenOptions.probedHeader). QEMU warns here; the programs say so in their own words.
   */
  onProbedRaw?: (name: string) => void;
  /** The top image only: see OpenOptions.onCorruption. */
  onCorruption?: OpenOptions['onCorruption'];
  /**
   * qemu-img -U: read-only images (and backing and data files) lock out no writer, and are opened
   * even while one writes. Without it, every file takes the locks QEMU would (storage/permissions.ts).
   */
  forceShare?: boolean;
  /** The image is exported at a fixed size (qcow serve): others may not resize it (as qemu-nbd). */
  fixedSize?: boolean;
  /**
   * Backing file names that are not file names (a front end's own kinds, such as QEMU's
   * `json:{...}` names): returns the opened image, chain and all, or undefined to open the name
   * the usual way (resolved against the image naming it, through `opener`).
   */
  openBackingName?: (name: string, options: { format: string | undefined; readOnly: boolean }) => Promise<BlockDevice> | undefined;
  /** Opens the files (or URLs) by name and resolves backing file names: where the bytes come from. */
  opener: StoreOpener;
  /** The formats that may be opened and probed (usually {@link builtinFormats}). */
  formats: FormatRegistry;
}

export const DEFAULT_MAX_CHAIN_DEPTH = 64;

/**
 * Open an image and its backing chain through any {@link StoreOpener}: the format is probed
 * unless given, each backing name is resolved against the image naming it, loops and chains
 * deeper than `maxDepth` are refused. Exported as `openImageWith`; `qcow/node` has an
 * `openImage` that fills in the file opener and the built-in formats.
 *
 * @example
 * ```ts
 * import { openImageWith, builtinFormats, MemoryStore, type StoreOpener } from 'qcow';
 *
 * const files = new Map<string, Uint8Array>([['disk.img', new Uint8Array(1 << 20)]]);
 * const opener: StoreOpener = {
 *   open: async (name, { readOnly }) => new MemoryStore(files.get(name), { name, readOnly }),
 *   resolve: (name) => name,
 * };
 * const dev = await openImageWith('disk.img', { opener, formats: builtinFormats(), readOnly: true });
 * console.log(dev.format, dev.size); // raw 1048576
 * await dev.close();
 * ```
 */
export async function openImage(name: string, options: OpenImageOptions): Promise<BlockDevice> {
  const dev = await openLayer(name, options, options.format, 0, new Set());
  if (!options.copyOnRead) return dev;
  try {
    return withCopyOnRead(dev);
  } catch (e) {
    await dev.close();
    throw e;
  }
}

async function openLayer(name: string, options: OpenImageOptions, format: string | undefined, depth: number, seen: Set<string>): Promise<BlockDevice> {
  const maxDepth = options.maxDepth ?? DEFAULT_MAX_CHAIN_DEPTH;
  if (depth >= maxDepth) throw new QcowError('QCOW_UNSUPPORTED', `backing chain is deeper than ${maxDepth} images`, { file: name });
  const key = normalizeName(name);
  if (seen.has(key)) throw new QcowError('QCOW_CORRUPT', 'backing chain loops back to this image', { file: name });
  seen.add(key);
  const readOnly =
    (depth > 0 ? !(options.writableBacking?.(name, depth) ?? false) : (options.readOnly ?? false)) || options.snapshot !== undefined;
  const role = depth > 0 ? 'backing' : 'image';
  const { forceShare, fixedSize } = options;
  // The locks depend on the format (raw shares what an image's metadata file does not): with the
  // format unknown, none are taken until the probe (a read of the header) has named it, as in QEMU.
  const store = await options.opener.open(name, {
    readOnly,
    permissions: format !== undefined ? permissionsFor({ writable: !readOnly, format, role, forceShare, fixedSize }) : NO_PERMISSIONS,
  });
  try {
    const fmt = format !== undefined ? options.formats.get(format) : await probeFormat(store, options, depth);
    if (format === undefined) store.setPermissions?.(permissionsFor({ writable: !readOnly, format: fmt.name, role, forceShare, fixedSize }));
    const probedRaw = format === undefined && fmt.name === 'raw' && !readOnly;
    const openOptions: OpenOptions = {
      readOnly,
      password: options.passwordAt?.(depth) ?? options.password,
      snapshot: depth === 0 ? options.snapshot : undefined,
      cacheBytes: options.cacheBytes,
      bitmapLimits: options.bitmapLimits,
      inspectOnly: options.inspectOnly,
      refuseMalformedBitmaps: options.refuseMalformedBitmaps,
      lazyRefcounts: depth === 0 ? options.lazyRefcounts : undefined,
      discardPassthrough: depth === 0 ? options.discardPassthrough : undefined,
      overlapCheck: depth === 0 ? options.overlapCheck : undefined,
      rawWindow: depth === 0 ? options.rawWindow : depth === 1 ? options.backingRawWindow : undefined,
      onRepair: options.onRepair,
      onWarning: options.onWarning,
      onCorruption: depth === 0 ? options.onCorruption : undefined,
      skipDataFile: options.skipDataFile,
      probedHeader: probedRaw ? (head) => probedOther(options.formats, head) : undefined,
      openFile: (fileName, o) =>
        options.opener.open(resolveNamed(fileName, name, options), { ...o, permissions: permissionsFor({ writable: !o.readOnly, format: 'raw', role: 'data', forceShare }) }).catch((e) => {
          throw dataFileError(e, name, fileName);
        }),
    };
    const { dataFile } = options;
    if (depth === 0 && dataFile !== undefined) {
      openOptions.openDataFile = (o) =>
        options.opener.open(dataFile, { ...o, permissions: permissionsFor({ writable: !o.readOnly, format: 'raw', role: 'data', forceShare }) }).catch((e) => {
          throw dataFileError(e, name, dataFile);
        });
    }
    if (!options.noBacking) {
      const { backingFile } = options;
      openOptions.openBacking = (backingName, backingFormat) => {
        const format = depth === 0 ? (options.backingFormat ?? backingFormat) : backingFormat;
        const own = options.openBackingName?.(backingName, { format, readOnly: !(options.writableBacking?.(backingName, depth + 1) ?? false) });
        if (own) return own;
        return openLayer(depth === 0 && backingFile !== undefined ? backingFile : resolveNamed(backingName, name, options), options, format, depth + 1, seen).catch((e) => {
          throw backingError(e, name, backingName);
        });
      };
    }
    const dev = await fmt.open(store, openOptions);
    if (probedRaw) options.onProbedRaw?.(name);
    return dev;
  } catch (e) {
    await store.close().catch(() => undefined);
    throw withFile(e, name);
  }
}

async function probeFormat(store: ByteStore, options: OpenImageOptions, depth: number) {
  const head = new Uint8Array(512);
  await store.read(0, head);
  const fmt = options.formats.probe(head);
  // A backing file with no recorded format could be a raw disk whose guest wrote an image header;
  // taking it for an image would let the guest make us open any file it names.
  if (depth > 0 && fmt.name !== 'raw' && options.rawUnnamedBackingFormats) return options.formats.get('raw');
  return fmt;
}

/** The format other than raw that a first sector of `head` would be probed as, if any. */
function probedOther(formats: OpenImageOptions['formats'], head: Uint8Array): string | undefined {
  const name = formats.probe(head).name;
  return name === 'raw' ? undefined : name;
}

/** "a/./b" and "a/x/../b" are "a/b": one image, however the chain spells it. */
export function normalizeName(name: string): string {
  // Both cases spelt out rather than the `i` flag, which V8 compiles with ICU's case tables
  // (see isHttpUrl in storage/url.ts).
  const scheme = /^[a-zA-Z][a-zA-Z0-9+.-]*:\/\/[^/]*/.exec(name)?.[0] ?? '';
  const parts: string[] = [];
  for (const part of name.slice(scheme.length).split('/')) {
    if (part === '.' || (part === '' && parts.length > 0)) continue;
    if (part === '..' && parts.length > 0 && parts[parts.length - 1] !== '..' && parts[parts.length - 1] !== '') parts.pop();
    else parts.push(part);
  }
  return scheme + parts.join('/');
}

function resolveNamed(name: string, relativeTo: string, options: OpenImageOptions): string {
  const resolved = options.opener.resolve(name, relativeTo);
  if (options.confineToFolder) {
    const folder = normalizeName(options.opener.resolve('.', relativeTo));
    const prefix = folder.endsWith('/') ? folder : folder + '/';
    if (!normalizeName(resolved).startsWith(prefix)) {
      throw new QcowError('QCOW_UNSUPPORTED', `refusing '${name}': it is outside the image's folder`, { file: relativeTo });
    }
  }
  return resolved;
}

function backingError(e: unknown, image: string, backingName: string): unknown {
  if (e instanceof QcowError && e.code === 'QCOW_NOT_FOUND') {
    return new QcowError('QCOW_NOT_FOUND', `Could not open backing file '${backingName}': No such file or directory`, { file: image, cause: e });
  }
  return e;
}

/** A data file that is missing, named as the image (or the user) names it, as QEMU names it. */
function dataFileError(e: unknown, image: string, dataName: string): unknown {
  if (e instanceof QcowError && e.code === 'QCOW_NOT_FOUND') {
    return new QcowError('QCOW_NOT_FOUND', `Could not open data file '${dataName}': No such file or directory`, { file: image, cause: e });
  }
  return e;
}

/** The devices of a chain, top first. */
export function chainOf(dev: BlockDevice): BlockDevice[] {
  const out: BlockDevice[] = [];
  for (let d: BlockDevice | null = dev; d; d = d.backing) out.push(d);
  return out;
}

/** Options of {@link createImage} (exported as `createImageWith`): the new image and where it goes. */
export interface CreateImageOptions extends Omit<CreateOptions, 'backing' | 'openFile'> {
  /** The format of the new image ("qcow2", "qcow", "raw"). */
  format: string;
  /** Creates the file and opens the backing file (resolved against the new image's name). */
  opener: StoreOpener;
  /** The formats known (usually {@link builtinFormats}); `format` must be one of them. */
  formats: FormatRegistry;
  /** Do not open the backing file to check it (qemu-img create -u); the size must then be given. */
  unsafe?: boolean;
  /** Size may be 0 here when a backing file gives it. */
}

/** Create an empty image; with a backing file, check that it opens and take its size when none is given. */
export async function createImage(name: string, options: CreateImageOptions): Promise<void> {
  const fmt = options.formats.get(options.format);
  let backing: BlockDevice | undefined;
  try {
    if (options.backingFile && !options.unsafe) {
      if (!options.backingFormat) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Backing file specified without backing format (use -F)');
      backing = await openImage(options.opener.resolve(options.backingFile, name), {
        format: options.backingFormat,
        readOnly: true,
        opener: options.opener,
        formats: options.formats,
        // Only its size is wanted: like QEMU (which opens it without I/O), no key is needed for an
        // encrypted backing file, whose password may well differ from the new image's.
        inspectOnly: true,
        // Nor does it take the backing file from anyone (QEMU's create shares it too): an overlay
        // may be made over the image a VM is running on, to become that VM's new top.
        forceShare: true,
      }).catch((e) => {
        throw new QcowError('QCOW_NOT_FOUND', `Could not open backing image '${options.backingFile}': ${(e as Error).message}`, { cause: e });
      });
    }
    const size = options.size > 0 || !backing ? options.size : backing.size;
    const existed = (await options.opener.exists?.(name)) ?? true;
    const store = await options.opener.open(name, { readOnly: false, create: true });
    try {
      await fmt.create(store, {
        ...options,
        size,
        backing,
        openFile: (fileName, o) =>
          options.opener.open(options.opener.resolve(fileName, name), { ...o, permissions: permissionsFor({ writable: !o.readOnly, format: 'raw', role: 'data' }) }),
      });
      await store.flush();
    } catch (e) {
      await store.close().catch(() => undefined);
      // Do not leave a half-made image behind (but never delete a file that was there before).
      if (!existed) await options.opener.remove?.(name).catch(() => undefined);
      throw e;
    }
    await store.close();
  } catch (e) {
    throw withFile(e, name);
  } finally {
    await backing?.close();
  }
}
