import type { BlockDevice } from '../../core/block-device.js';
import { QcowError } from '../../core/errors.js';
import { parseSize } from '../../core/size.js';
import { createImage, openImage } from '../../node.js';
import { convert } from '../../ops/convert.js';
import { openForCli, parseOptionList, progressBar, readPasswordFile } from '../common.js';

interface Flags {
  format?: string;
  outputFormat: string;
  options?: string[];
  backing?: string;
  backingFormat?: string;
  compress?: boolean;
  create: boolean;
  sparseSize: string;
  snapshot?: string;
  progress?: boolean;
  quiet?: boolean;
  parallel: string;
  passwordFile?: string;
  targetPasswordFile?: string;
}

/** `-l NAME`, `-l snapshot.name=NAME` or `-l snapshot.id=ID`. */
function snapshotName(text: string | undefined): string | undefined {
  if (text === undefined) return undefined;
  const m = /^snapshot\.(name|id)=(.*)$/.exec(text);
  return m ? m[2] : text;
}

export async function run(files: string[], flags: Flags): Promise<void> {
  if (files.length < 2) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Expecting one or more source images and a target (convert SRC... DST)');
  const target = files[files.length - 1]!;
  const sourceNames = files.slice(0, -1);
  const parallel = Number(flags.parallel);
  if (!Number.isInteger(parallel) || parallel < 1 || parallel > 64) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Invalid number of in-flight chunks (-m 1..64)');
  const sparseSize = parseSize(flags.sparseSize, 'sparse size');
  if (flags.backing && !flags.create) throw new QcowError('QCOW_INVALID_ARGUMENT', '-B cannot be used with -n');
  const snapshot = snapshotName(flags.snapshot);
  if (snapshot !== undefined && sourceNames.length > 1) throw new QcowError('QCOW_INVALID_ARGUMENT', 'No support for concatenating multiple snapshot');

  const sources: BlockDevice[] = [];
  let dst: BlockDevice | undefined;
  const abort = new AbortController();
  const onSignal = () => abort.abort(new Error('interrupted'));
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    for (const name of sourceNames) sources.push(await openForCli(name, flags, { readOnly: true, snapshot }));
    const total = sources.reduce((n, s) => n + s.size, 0);
    const options = parseOptionList(flags.options);
    const targetPassword = await readPasswordFile(flags.targetPasswordFile ?? flags.passwordFile);
    if (flags.create) {
      const backingFormat = flags.backingFormat ?? options.backing_fmt;
      if (flags.backing && !backingFormat) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Backing file specified without backing format (use -F FMT)');
      await createImage(target, {
        format: flags.outputFormat,
        size: total,
        backingFile: flags.backing,
        backingFormat,
        options,
        password: targetPassword,
      });
    }
    dst = await openImage(target, { format: flags.create ? flags.outputFormat : flags.outputFormat, password: targetPassword });
    const bar = progressBar(!!flags.progress && !flags.quiet);
    await convert(sources, dst, {
      compress: flags.compress,
      sparseSize,
      targetIsZero: flags.create,
      parallel,
      signal: abort.signal,
      onProgress: bar,
    });
    await dst.flush();
    bar.finish();
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    // Closing writes back cached metadata, so an interrupted target is still a consistent image.
    await dst?.close();
    for (const s of sources) await s.close();
  }
}
