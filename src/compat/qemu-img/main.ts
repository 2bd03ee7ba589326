/**
 * `qemu-img` as qcow (compat/qemu-img): QEMU's options, output, messages and exit codes.
 * For now the qcow program under QEMU's name; the compatible front end grows here.
 */
import { runQcow } from '../../cli/program.js';

export async function main(argv: string[]): Promise<void> {
  await runQcow(argv);
}
