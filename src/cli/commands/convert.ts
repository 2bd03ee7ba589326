import { QcowError, parseSize, createImage, defaultOpener, openImage, FileStore, permissionsFor, convert, isHttpUrl, type BlockDevice, type ByteStore, type StoreOpener, type Spill, type StagedTarget, type StreamSource } from '../../node.js';
import { fstatSync, type Stats } from 'node:fs';
import { createOptionsSecret, failureStyle, openForCli, parseOptionList, readPasswordFile, removeCreated, withProgress } from '../common.js';

interface Flags {
  format?: string;
  outputFormat: string;
  options?: string[];
  backing?: string;
  backingFormat?: string;
  compress?: boolean;
  create: boolean;
  /** Absent: qemu-img's default, 4 KiB (told apart from an explicit -S, which -C refuses). */
  sparseSize?: string;
  C?: boolean;
  /** Bytes held while reading a stream whose tables come later (qemu-img's size syntax). */
  streamBuffer?: string;
  /** A folder for what does not fit in the stream buffer, and how much it may take. */
  streamSpill?: string;
  streamSpillSize?: string;
  snapshot?: string;
  progress?: boolean;
  quiet?: boolean;
  parallel: string;
  W?: boolean;
  cache: string;
  passwordFile?: string;
  targetPasswordFile?: string;
  bitmaps?: boolean;
  skipBrokenBitmaps?: boolean;
  salvage?: boolean;
}

/** `-l NAME`, `-l snapshot.name=NAME` or `-l snapshot.id=ID`. */
function snapshotName(text: string | undefined): string | undefined {
  if (text === undefined) return undefined;
  const m = /^snapshot\.(name|id)=(.*)$/.exec(text);
  return m ? m[2] : text;
}

/** qemu-img's -S: a multiple of 512 up to 16 MiB; 0 turns sparse detection off. */
function sparseSize(text: string): number {
  const v = parseSize(text, 'buffer size for sparse output');
  if (v % 512 !== 0 || v > 16 * 1024 * 1024) {
    throw new QcowError(
      'QCOW_INVALID_ARGUMENT',
      'Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).',
    );
  }
  return v;
}

/**
 * qemu-img convert writes its target with cache=unsafe unless told otherwise: flushes are skipped
 * (the data reaches the disk when the kernel writes it back). Our default is the same; the other
 * modes make every flush real.
 */
function targetOpener(cache: string, inlineWrites = false): StoreOpener {
  const modes = ['unsafe', 'writeback', 'writethrough', 'none', 'directsync'];
  if (!modes.includes(cache)) throw new QcowError('QCOW_INVALID_ARGUMENT', `Invalid cache option: ${cache}`);
  // The target is written once, front to back: write-behind (storage/file.node.ts) keeps a large
  // output from filling the page cache with memory the process never touched before.
  // From a stream, every write is synchronous (FileStore.writeInline: the reads of the stream are).
  // writethrough and directsync: every write is on stable storage when it completes, as in
  // qemu-img (which flushes after each request); write-behind has nothing left to start then.
  const syncEach = cache === 'writethrough' || cache === 'directsync';
  const behind = (s: ByteStore): ByteStore => {
    if (s instanceof FileStore) {
      if (syncEach) s.writeThrough();
      else s.writeBehind();
      if (inlineWrites) s.writeInline();
    }
    return s;
  };
  if (cache !== 'unsafe') return { ...defaultOpener, open: async (name, options) => behind(await defaultOpener.open(name, options)) };
  // A local file keeps its own store (its host calls: copy offload, holes); other stores (an
  // object store someday) get a wrapper without flushes.
  const noSync = (s: ByteStore): ByteStore => {
    if (s instanceof FileStore) {
      s.skipFlushes();
      s.writeBehind();
      if (inlineWrites) s.writeInline();
      return s;
    }
    return {
      name: s.name,
      readOnly: s.readOnly,
      size: () => s.size(),
      read: (offset, into) => s.read(offset, into),
      write: (offset, data) => s.write(offset, data),
      truncate: (size) => s.truncate(size),
      flush: async () => undefined,
      allocatedSize: s.allocatedSize ? () => s.allocatedSize!() : undefined,
      close: () => s.close(),
    };
  };
  return { ...defaultOpener, open: async (name, options) => noSync(await defaultOpener.open(name, options)) };
}

export async function run(files: string[], flags: Flags): Promise<void> {
  if (files.length < 2) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Expecting one or more source images and a target (convert SRC... DST)');
  const target = files[files.length - 1]!;
  const sourceNames = files.slice(0, -1);
  const parallel = Number(flags.parallel);
  if (!Number.isInteger(parallel) || parallel < 1 || parallel > 16) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Invalid number of coroutines. Allowed number of coroutines is between 1 and 16');
  const sparse = flags.sparseSize === undefined ? undefined : sparseSize(flags.sparseSize);
  if (flags.C && flags.compress) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Cannot enable copy offloading when -c is used');
  if (flags.C && sparse !== undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Cannot enable copy offloading when -S is used');
  // Creation options mean nothing to an image that already exists.
  if (!flags.create && flags.options?.length) throw new QcowError('QCOW_INVALID_ARGUMENT', '-o has no effect when skipping image creation');
  const snapshot = snapshotName(flags.snapshot);
  if (snapshot !== undefined && sourceNames.length > 1) throw new QcowError('QCOW_INVALID_ARGUMENT', 'No support for concatenating multiple snapshot');
  const options = parseOptionList(flags.options);
  const backingFile = flags.backing ?? options.backing_file;
  const backingFormat = flags.backingFormat ?? options.backing_fmt;
  delete options.backing_file;
  delete options.backing_fmt;
  if (backingFile && sourceNames.length > 1) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Having a backing file for the target makes no sense when concatenating multiple input images');
  // With -n, -B names the backing file the existing target already has: nothing is created.
  if (backingFile && !backingFormat && flags.create) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Use of backing file requires explicit backing format');

  if (flags.skipBrokenBitmaps && !flags.bitmaps) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Use of --skip-broken-bitmaps requires --bitmaps');
  if (target === '-') return runToStream(sourceNames, flags, { options, backingFile, backingFormat, snapshot, parallel });
  if (sourceNames.includes('-')) {
    if (sourceNames.length > 1) throw new QcowError('QCOW_INVALID_ARGUMENT', "standard input ('-') can only be the one source");
    return runFromStream(await stdinStream(), stdinSize(), target, flags, { options, backingFile, backingFormat, snapshot }, 'standard input');
  }
  if (sourceNames.length === 1 && isHttpUrl(sourceNames[0]!) && !flags.compress && !flags.C && !flags.bitmaps && snapshot === undefined) {
    // A server that ignores Range (or gives no length) cannot be read at random: read its body
    // front to back instead of holding all of it.
    const url = sourceNames[0]!;
    const probe = await openForCli(url, flags, { readOnly: true }).then(
      (d) => d.close().then(() => undefined),
      (e: unknown) => e,
    );
    if (probe !== undefined && !rangelessServer(probe)) throw probe;
    if (probe !== undefined) {
      const { nodeFetch, deferredCaAgent } = await import('./convert-deferred.js');
      const res = (await nodeFetch(deferredCaAgent())(url)) as Response & { nodeBody?: AsyncIterable<Uint8Array> };
      if (res.status !== 200) throw new QcowError('QCOW_IO', `HTTP ${res.status} for ${url}`, { file: url });
      const length = Number(res.headers.get('content-length') ?? NaN);
      const body: AsyncIterable<Uint8Array> = res.nodeBody ?? webStreamChunksLazy(res.body!);
      return runFromStream(body, Number.isSafeInteger(length) ? length : undefined, target, flags, { options, backingFile, backingFormat, snapshot }, url);
    }
  }
  const opener = targetOpener(flags.cache);
  const sources: BlockDevice[] = [];
  let dst: BlockDevice | undefined;
  let created = false;
  try {
    await withProgress(flags, async (signal, onProgress) => {
      for (const name of sourceNames) sources.push(await openForCli(name, flags, { readOnly: true, snapshot }));
      const bitmapOps = flags.bitmaps ? await import('./convert-deferred.js') : undefined;
      const bitmapOptions = { skipBroken: !!flags.skipBrokenBitmaps, onSkip: (name: string) => process.stderr.write(`${failureStyle.program}: warning: Skipping inconsistent bitmap '${name}'\n`) };
      if (bitmapOps) await bitmapOps.checkBitmapCopy(sources, bitmapOptions);
      const total = sources.reduce((n, s) => n + s.size, 0);
      const targetPassword = (await readPasswordFile(flags.targetPasswordFile ?? flags.passwordFile)) ?? createOptionsSecret(options);
      if (flags.create) {
        await createImage(target, { format: flags.outputFormat, size: total, backingFile, backingFormat, options, password: targetPassword, opener });
        created = true;
      }
      dst = await openImage(target, { format: flags.outputFormat, password: targetPassword, opener });
      if (flags.compress && !dst.writeCompressed) throw new QcowError('QCOW_UNSUPPORTED', 'Compression not supported for this file format');
      await convert(sources, dst, {
        compress: flags.compress,
        sparseSize: sparse,
        targetIsZero: flags.create && !backingFile && (await readsZerosWhenNew(dst, options)),
        // Only a target made over a backing file (-B) is written as a difference against it; an
        // existing one (-n) gets the source whole, its zeros written as zeros.
        diffAgainstBacking: flags.create || backingFile !== undefined,
        parallel,
        outOfOrder: !!flags.W,
        copyOffload: !!flags.C,
        salvage: !!flags.salvage,
        onWarning: flags.quiet ? undefined : (message) => process.stderr.write(`${failureStyle.program}: warning: ${message}\n`),
        signal,
        // Without a bar to draw, convert need not count the data first.
        onProgress: onProgress.active ? onProgress : undefined,
      });
      if (bitmapOps) await bitmapOps.copyBitmaps(sources[0]!, dst, bitmapOptions);
      await dst.flush();
    });
  } catch (e) {
    // A target we made for a conversion that could not even start is removed, as qemu-img never creates it.
    if (created && dst && !dst.writeCompressed && flags.compress) {
      await dst.close();
      dst = undefined;
      removeCreated(target);
    }
    throw e;
  } finally {
    // Closing writes back cached metadata, so an interrupted target is still a consistent image.
    await dst?.close();
    for (const s of sources) await s.close();
  }
}

/**
 * `convert ... SRC -`: the image goes to standard output, front to back (src/streams). What needs
 * a seekable target is refused up front; nothing but the image is written to standard output.
 */
async function runToStream(
  sourceNames: string[],
  flags: Flags,
  o: { options: Record<string, string>; backingFile?: string; backingFormat?: string; snapshot?: string; parallel: number },
): Promise<void> {
  const refuse = (what: string) => new QcowError('QCOW_INVALID_ARGUMENT', `${what} cannot be used when writing to standard output ('-')`);
  if (!flags.create) throw refuse('-n');
  if (flags.C) throw refuse('-C');
  if (flags.bitmaps) throw refuse('--bitmaps');
  // node:tty loads node:net and its streams (~225 page faults, ~3 ms): only this path needs it.
  const { isatty } = await import('node:tty');
  if (isatty(1)) throw new QcowError('QCOW_INVALID_ARGUMENT', 'standard output is a terminal: redirect it to a file or a pipe to write an image there');
  const { writeImageStream, fdSink, describeSinkErrors, chainOf, fileSpill } = await import('./convert-deferred.js');
  const { resolve } = await import('node:path');
  const sources: BlockDevice[] = [];
  try {
    await withProgress(flags, async (signal, onProgress) => {
      for (const name of sourceNames) sources.push(await openForCli(name, flags, { readOnly: true, snapshot: o.snapshot }));
      let backing: { file: string; format: string; layer?: BlockDevice } | undefined;
      if (o.backingFile !== undefined) {
        // The backing file as the image will name it, relative to where the image is written (the
        // current directory): when it is a layer of the source's chain, that layer is not copied.
        const path = defaultOpener.resolve(o.backingFile, resolve('-'));
        const layer = sources.length === 1 ? chainOf(sources[0]!).find((d) => resolve(d.filename) === resolve(path)) : undefined;
        backing = { file: o.backingFile, format: o.backingFormat!, layer };
      }
      const out = fdSink(1);
      // Compressed clusters wait in a temporary file (TMPDIR) until their tables are out.
      const spill = flags.compress ? await fileSpill() : undefined;
      await writeImageStream(sources, describeSinkErrors(out.sink, 'standard output'), {
        format: flags.outputFormat,
        compress: !!flags.compress,
        spill,
        options: o.options,
        backing,
        parallel: Math.min(o.parallel, 8),
        signal,
        onProgress,
      });
      await out.finish().catch((e: unknown) => describeSinkErrors(() => Promise.reject(e), 'standard output')(new Uint8Array(0)));
    });
  } finally {
    for (const s of sources) await s.close().catch(() => undefined);
  }
}

/** Standard input's length when it is a regular file (`< disk.raw`), else undefined (a pipe). */
function stdinSize(): number | undefined {
  try {
    const st = fstatSync(0);
    return st.isFile() ? st.size : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Standard input to read an image from. A pipe or a file is read with read(2) into the stream
 * reader's reused memory (src/streams/fd-source.node.ts: a third of the CPU of Node's stream,
 * which hands over every 64 KiB in a new buffer); anything else (a terminal, a socket) through
 * `process.stdin`, which also takes over if fd 0 turns out to be non-blocking.
 */
async function stdinStream(): Promise<AsyncIterable<Uint8Array> | StreamSource> {
  let st: Stats | undefined;
  try {
    st = fstatSync(0);
  } catch {
    // No standard input to stat: Node's stream says what is wrong with it.
  }
  if (!st || !(st.isFIFO() || st.isFile())) return process.stdin;
  const { fdSource } = await import('./convert-deferred.js');
  return fdSource(0, () => process.stdin, 'standard input');
}

/** The HTTP store's refusals that mean "this server cannot be read at random": stream it instead. */
function rangelessServer(e: unknown): boolean {
  return e instanceof QcowError && /ignores range requests|neither Content-Range totals nor a Content-Length/.test(e.message);
}

async function* webStreamChunksLazy(body: ReadableStream<Uint8Array>): AsyncGenerator<Uint8Array> {
  const { webStreamChunks } = await import('./convert-deferred.js');
  yield* webStreamChunks(body);
}

/**
 * `convert [-f FMT] - DST` (and a URL from a server without Range): the image arrives front to
 * back (src/streams/read-image.ts). A target this creates is removed when the conversion fails,
 * so nothing half-written looks complete; an existing one (-n) is written through a staging layer
 * (src/streams/staging.node.ts) and left as it was.
 */
async function runFromStream(
  input: AsyncIterable<Uint8Array> | StreamSource,
  size: number | undefined,
  target: string,
  flags: Flags,
  o: { options: Record<string, string>; backingFile?: string; backingFormat?: string; snapshot?: string },
  inputName: string,
): Promise<void> {
  const refuse = (what: string) => new QcowError('QCOW_INVALID_ARGUMENT', `${what} cannot be used when reading from a stream (${inputName})`);
  if (flags.compress) throw refuse('-c');
  if (flags.C) throw refuse('-C');
  if (flags.bitmaps) throw refuse('--bitmaps');
  if (o.snapshot !== undefined) throw refuse('-l');
  if (flags.format !== undefined && !['qcow2', 'qcow', 'raw'].includes(flags.format)) throw new QcowError('QCOW_UNSUPPORTED', `a stream can be read as qcow2, qcow or raw, not ${flags.format}`);
  const bufferBytes = flags.streamBuffer !== undefined ? parseSize(flags.streamBuffer, 'stream buffer') : undefined;
  const { readImageStream } = await import('./convert-deferred.js');
  const { resolve, dirname } = await import('node:path');
  // Standard input (a pipe, a file) is read synchronously: write the target the same way.
  const fromFd = !(Symbol.asyncIterator in input);
  const opener = targetOpener(flags.cache, fromFd);
  let dst: BlockDevice | undefined;
  let created = false;
  let opened: ByteStore | undefined;
  let spill: Spill | undefined;
  let staged: StagedTarget | undefined;
  try {
    await withProgress(flags, async (signal, bar) => {
      const result = await readImageStream(
        input,
        async (info) => {
          if (flags.create) {
            await createImage(target, { format: flags.outputFormat, size: info.size, backingFile: o.backingFile, backingFormat: o.backingFormat, options: o.options, opener });
            created = true;
          }
          dst = await openImage(target, { format: flags.outputFormat, opener });
          if (dst.size < info.size) throw new QcowError('QCOW_INVALID_ARGUMENT', `output file is smaller than input file (${dst.size} < ${info.size} bytes)`);
          if (created) return dst;
          // An existing image (-n) is written only once the whole stream has arrived well.
          const { stageOver } = await import('./convert-deferred.js');
          staged = await stageOver(dst, dirname(resolve(target)));
          dst = staged.device;
          return dst;
        },
        {
          format: flags.format,
          size,
          targetIsZero: flags.create && !o.backingFile,
          // A backing file the streamed image names is found from the current directory.
          openBacking: (name, format) => openForCli(resolve(name), { ...flags, format }, { readOnly: true }),
          bufferBytes,
          spill: flags.streamSpill !== undefined ? { store: (spill = await (await import('./convert-deferred.js')).fileSpill(flags.streamSpill)), limit: parseSize(flags.streamSpillSize ?? '4G', 'stream spill size') } : undefined,
          // A raw stream from a pipe has no size: a new raw target grows with it.
          growingRawTarget:
            flags.create && flags.outputFormat === 'raw'
              ? async () => {
                  const store = await FileStore.open(target, { create: true, permissions: permissionsFor({ writable: true, format: 'raw', role: 'image' }) });
                  if (flags.cache === 'writethrough' || flags.cache === 'directsync') store.writeThrough();
                  else store.writeBehind();
                  if (fromFd) store.writeInline();
                  created = true;
                  opened = store;
                  return store;
                }
              : undefined,
          // Into another format, a new image starts empty and grows ahead of the stream.
          growingTarget:
            flags.create && !o.backingFile
              ? async () => {
                  // 512 bytes, the least every format takes; formats whose images cannot grow refuse after.
                  await createImage(target, { format: flags.outputFormat, size: 512, options: o.options, opener });
                  created = true;
                  return (dst = await openImage(target, { format: flags.outputFormat, opener }));
                }
              : undefined,
          password: await readPasswordFile(flags.passwordFile),
          signal,
          onProgress: size ? (n) => bar(n, size) : undefined,
        },
      );
      dst = result.target;
      if (staged) await staged.apply({ signal });
      await dst.flush();
      if (process.env.QCOW_STREAM_STATS === '1') process.stderr.write(`qcow: stream: ${result.format}, ${result.bytesIn} bytes in, peak buffer ${result.peakBuffered} bytes\n`);
    });
  } catch (e) {
    if (dst) await (dst as BlockDevice).close().catch(() => undefined);
    else if (opened) await (opened as ByteStore).close().catch(() => undefined);
    dst = undefined;
    if (created) removeCreated(target);
    throw e;
  } finally {
    if (dst) await (dst as BlockDevice).close();
    await spill?.close();
    // The rest of the stream is not needed (or the conversion failed): stop reading it.
    (input as { destroy?: () => void }).destroy?.();
  }
}

/**
 * Whether a target just created with these options reads as zeros, so convert may skip writing
 * zeros (QEMU's has_zero_init): not a LUKS volume (its unwritten payload decrypts to noise), nor
 * an encrypted image with preallocated clusters (allocated, but never encrypted zeros).
 */
async function readsZerosWhenNew(dst: BlockDevice, options: Record<string, string>): Promise<boolean> {
  if (dst.format === 'luks') return false;
  const preallocated = options.preallocation !== undefined && options.preallocation !== 'off';
  return !(preallocated && (await dst.describe()).encrypted);
}
