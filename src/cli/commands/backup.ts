/**
 * `qcow backup -B NAME [-b PREVIOUS [-F FMT]] [--keep-bitmap] SOURCE TARGET`: a full backup of
 * SOURCE (without -b) or an incremental one holding only what bitmap NAME marks as changed, as
 * a qcow2 overlay of PREVIOUS; then NAME is cleared (added on a first full backup) so that it
 * records the changes since this backup. See ops/backup.ts.
 */
import { QcowError, createImage, openImage, backup } from '../../node.js';
import { openForCli, withProgress, writeOut } from '../common.js';

interface Flags {
  format?: string;
  bitmap: string;
  previous?: string;
  previousFormat?: string;
  keepBitmap?: boolean;
  progress?: boolean;
  quiet?: boolean;
}

export async function run(source: string, target: string, flags: Flags): Promise<void> {
  if (flags.previousFormat !== undefined && flags.previous === undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', '-F only supported with -b');
  const dev = await openForCli(source, flags, { noBacking: false });
  try {
    const r = await withProgress(flags, (signal, onProgress) =>
      backup(dev, {
        bitmap: flags.bitmap,
        previous: flags.previous === undefined ? undefined : { file: flags.previous, format: flags.previousFormat ?? 'qcow2' },
        keepBitmap: flags.keepBitmap,
        signal,
        onProgress,
        createTarget: async (size, backing) => {
          await createImage(target, { format: 'qcow2', size, backingFile: backing?.file, backingFormat: backing?.format });
          return openImage(target, { format: 'qcow2' });
        },
      }),
    );
    if (!flags.quiet) writeOut(`${r.kind === 'full' ? 'Full' : 'Incremental'} backup written: ${r.bytes} bytes copied.\n`);
  } finally {
    await dev.close();
  }
}
