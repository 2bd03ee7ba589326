/**
 * `qemu-io` as qcow (compat/qemu-io): QEMU's options, command language, output and exit codes.
 * For now `qcow io` with qemu-io's cache and AIO options dropped; the compatible front end grows here.
 */
import { runQcow } from '../../cli/program.js';

export async function main(argv: string[]): Promise<void> {
  const rest: string[] = [];
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--cache' || a === '-t' || a === '--aio' || a === '-i') i++;
    else if (!a.startsWith('--cache=') && !a.startsWith('--aio=')) rest.push(a);
  }
  await runQcow([argv[0]!, argv[1]!, 'io', ...rest]);
}
