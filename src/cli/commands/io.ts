import { errorMessage, openForCli, writeOut } from '../common.js';
import { runIoCommand } from '../io-commands.js';

interface Flags {
  format?: string;
  passwordFile?: string;
  cmd?: string[];
  readOnly?: boolean;
}

/** Runs every command in order, as qemu-io does; exits non-zero if any failed. */
export async function run(file: string, flags: Flags): Promise<number> {
  const dev = await openForCli(file, flags, { readOnly: !!flags.readOnly });
  let failed = false;
  try {
    for (const line of flags.cmd ?? []) {
      try {
        const r = await runIoCommand(dev, line);
        writeOut(r.output);
        if (!r.ok) failed = true;
      } catch (e) {
        process.stderr.write(`qcow: ${file}: ${line.trim().split(/\s+/)[0]} failed: ${errorMessage(e)}\n`);
        failed = true;
      }
    }
  } finally {
    await dev.close();
  }
  return failed ? 1 : 0;
}
