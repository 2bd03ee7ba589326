import { QcowError, defaultOpener, openImage, rebase, type BlockDevice } from '../../node.js';
import { openForCli, readPasswordFile, withProgress } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  backing?: string;
  backingFormat?: string;
  unsafe?: boolean;
  progress?: boolean;
  quiet?: boolean;
}

/**
 * `qcow rebase [-u] -b NEW [-F FMT] FILE`. The new backing name is resolved against the image's
 * folder, as it will be when the image is opened later; `-b ""` removes the backing file.
 * Safe mode opens the image with its old chain and the new chain read-only and copies what
 * differs; -u opens neither chain and only rewrites the header.
 */
export async function run(file: string, flags: Flags): Promise<void> {
  if (flags.backing === undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', 'Expecting a backing file name (-b NEW, or -b "" to remove it)');
  const name = flags.backing === '' ? null : flags.backing;
  const format = name === null ? null : (flags.backingFormat ?? null);
  // As qemu-img: the new backing format is never guessed.
  if (name !== null && format === null) throw new QcowError('QCOW_INVALID_ARGUMENT', `Could not change the backing file to '${name}': backing format must be specified`, { file });
  const password = await readPasswordFile(flags.passwordFile);
  let newBacking: BlockDevice | null = null;
  const image = await openForCli(file, flags, { noBacking: !!flags.unsafe });
  try {
    await withProgress(flags, async (signal, onProgress) => {
      if (name !== null && !flags.unsafe) {
        const path = defaultOpener.resolve(name, file);
        newBacking = await openImage(path, { format: format!, readOnly: true, password }).catch((e: unknown) => {
          throw new QcowError('QCOW_NOT_FOUND', `Could not open new backing file '${name}': ${(e as Error).message}`, { file, cause: e });
        });
      }
      await rebase(image, { newBacking, backingName: name, backingFormat: format, unsafe: flags.unsafe, signal, onProgress });
    });
  } finally {
    await (newBacking as BlockDevice | null)?.close();
    await image.close();
  }
}
