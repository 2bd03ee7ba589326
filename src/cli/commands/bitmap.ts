/**
 * `qcow bitmap (--add [-g SIZE] [--disabled] | --remove | --clear | --enable | --disable |
 * --merge SOURCE [-b FILE [-F FMT]])... [-f FMT] FILE BITMAP`, as qemu-img bitmap: the actions
 * run in the order given, on one open of the image; the first that fails stops the rest and is
 * reported as qemu-img reports it ("Operation add on bitmap b failed: ...").
 */
import { QcowError, invalidArgument, parseSize, type DirtyBitmaps } from '../../node.js';
import { openForCli } from '../common.js';

interface Flags {
  format?: string;
  granularity?: string;
  disabled?: boolean;
  sourceFile?: string;
  sourceFormat?: string;
  actions: Array<{ op: string; source?: string }>;
}

export async function run(file: string, name: string, flags: Flags): Promise<void> {
  const { actions } = flags;
  if (actions.length === 0) throw invalidArgument('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  if (flags.granularity !== undefined && !actions.some((a) => a.op === 'add')) throw invalidArgument('granularity only supported with --add');
  if (flags.sourceFormat !== undefined && flags.sourceFile === undefined) throw invalidArgument('-F only supported with -b');
  if (flags.sourceFile !== undefined && !actions.some((a) => a.op === 'merge')) throw invalidArgument('Merge bitmap source file only supported with --merge');
  const granularity = flags.granularity === undefined ? undefined : parseSize(flags.granularity, 'granularity');

  const dev = await openForCli(file, flags, { noBacking: true });
  try {
    if (!dev.editBitmaps) throw new QcowError('QCOW_UNSUPPORTED', `Format driver '${dev.format}' does not support persistent bitmaps`);
    for (const a of actions) {
      try {
        await dev.editBitmaps((bitmaps) => apply(bitmaps, a, name, { ...flags, granularity }));
      } catch (e) {
        if (e instanceof QcowError) e.message = `Operation ${a.op} on bitmap ${name} failed: ${e.message}`;
        throw e;
      }
    }
  } finally {
    await dev.close();
  }
}

async function apply(bitmaps: DirtyBitmaps, a: { op: string; source?: string }, name: string, flags: Omit<Flags, 'granularity'> & { granularity?: number }): Promise<void> {
  switch (a.op) {
    case 'add':
      return bitmaps.add(name, { granularity: flags.granularity, disabled: flags.disabled });
    case 'remove':
      return bitmaps.remove(name);
    case 'clear':
      return bitmaps.clear(name);
    case 'enable':
      return bitmaps.enable(name);
    case 'disable':
      return bitmaps.disable(name);
    default:
      return merge(bitmaps, name, a.source!, flags);
  }
}

/** --merge: the source bitmap from this image, or from the -b image (opened read-only). */
async function merge(bitmaps: DirtyBitmaps, dest: string, source: string, flags: Pick<Flags, 'sourceFile' | 'sourceFormat'>): Promise<void> {
  if (flags.sourceFile === undefined) return bitmaps.merge(dest, source);
  const src = await openForCli(flags.sourceFile, { format: flags.sourceFormat }, { noBacking: true, readOnly: true });
  try {
    // A format without bitmaps holds none of that name (qemu-img's answer too).
    if (!src.persistentBitmaps) throw new QcowError('QCOW_INVALID_ARGUMENT', `Dirty bitmap '${source}' not found`);
    await bitmaps.merge(dest, source, await src.persistentBitmaps());
  } finally {
    await src.close();
  }
}
