/**
 * `qcow io`: qemu-io's command language (the same engine as compat/qemu-io, so every command and
 * output line is qemu-io's) on an image opened the qcow way (--password-file, --confine, ...).
 * Opening failures are qcow's one-line errors; a failing command makes the exit status 1.
 */
import type { BlockDevice } from '../../node.js';
import { QemuIo, type Opener } from '../../compat/qemu-io/engine.js';
import { openForCli, writeOut } from '../common.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  cmd?: string[];
  readOnly?: boolean;
}

/** Runs every command in order, as qemu-io does; exits non-zero if any failed. */
export async function run(file: string, flags: Flags): Promise<number> {
  let first: BlockDevice | null = await openForCli(file, flags, { readOnly: !!flags.readOnly });
  const opener: Opener = {
    // The image opened above, then (open, reopen) whatever the commands ask for.
    async open(req) {
      if (first) {
        const dev = first;
        first = null;
        return dev;
      }
      return openForCli(req.name ?? file, { ...flags, format: req.options.driver ?? flags.format }, { readOnly: req.readOnly });
    },
    close: (dev) => dev.close(),
  };
  const io = new QemuIo({ out: writeOut, err: (t) => void process.stderr.write(t), flush: () => undefined }, opener, false, 'qcow');
  await io.openImage({ name: file, options: {}, readOnly: !!flags.readOnly, snapshot: false, forceShare: false });
  let failed = false;
  try {
    for (const line of flags.cmd ?? []) {
      if (io.quit) break;
      if ((await io.command(line)) < 0) failed = true;
    }
  } finally {
    await io.closeImage();
  }
  return failed ? 1 : 0;
}
