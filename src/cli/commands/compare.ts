import { compareImages, QcowError, type BlockDevice } from '../../node.js';
import { failureText, openForCli, progressBar, writeOut } from '../common.js';

interface Flags {
  format?: string;
  secondFormat?: string;
  strict?: boolean;
  progress?: boolean;
  quiet?: boolean;
  passwordFile?: string;
  secondPasswordFile?: string;
  /** -U: both images are read sharing them with writers (qemu-img compare -U). */
  forceShare?: boolean;
}

/** Exit 0: identical; 1: different; 2: error; 4: an image could not be read (qemu-img's codes). */
export async function run(a: string, b: string, flags: Flags): Promise<number> {
  let failed: { image: 'a' | 'b'; offset: number } | undefined;
  let da: BlockDevice | undefined;
  let db: BlockDevice | undefined;
  try {
    da = await openForCli(a, { format: flags.format, passwordFile: flags.passwordFile, forceShare: flags.forceShare }, { readOnly: true });
    db = await openForCli(b, { format: flags.secondFormat, passwordFile: flags.secondPasswordFile ?? flags.passwordFile, forceShare: flags.forceShare }, { readOnly: true });
    const bar = progressBar(!!flags.progress && !flags.quiet);
    failed = undefined;
    const r = await compareImages(da, db, { strict: flags.strict, onProgress: bar, onReadFailure: (image, offset) => (failed ??= { image, offset }) });
    bar.finish();
    const say = (s: string) => {
      if (!flags.quiet) writeOut(s + '\n');
    };
    if (r.identical) {
      if (r.sizeMismatch) say('Warning: Image size mismatch!');
      say('Images are identical.');
      return 0;
    }
    if (r.reason === 'size') say('Strict mode: Image size mismatch!');
    else {
      // As qemu-img: the warning comes when the comparison reaches the part only one image has,
      // so a difference in the part both have is reported alone.
      if (r.sizeMismatch && r.offset !== undefined && r.offset >= Math.min(da.size, db.size)) say('Warning: Image size mismatch!');
      say(r.reason === 'allocation' ? `Strict mode: Offset ${r.offset} block status mismatch!` : `Content mismatch at offset ${r.offset}!`);
    }
    return 1;
  } catch (e) {
    if (!failed || !da || !db) {
      process.stderr.write(failureText(e));
      return 2;
    }
    // qemu-img's words, and its exit code for a read that failed.
    const why = e instanceof QcowError ? e : new QcowError('QCOW_IO', e instanceof Error ? e.message : String(e), { cause: e });
    const name = failed.image === 'a' ? a : b;
    process.stderr.write(failureText(new QcowError(why.code, `Error while reading offset ${failed.offset} of ${name}: ${why.message}`, { errno: why.errno, cause: why.cause })));
    // The warning of a size difference came before that read (on standard output, which a pipe
    // gets at exit from qemu-img's buffered stdio: after the error).
    if (!flags.quiet && da.size !== db.size && failed.offset >= Math.min(da.size, db.size)) writeOut('Warning: Image size mismatch!\n');
    return 4;
  } finally {
    await da?.close();
    await db?.close();
  }
}
