/**
 * The command line's entry: `qcow ...`, or one of the QEMU programs qcow stands in for
 * (`--persona=qemu-img`, `--persona=qemu-io`, which compat/qemu-img and compat/qemu-io pass). The
 * personas import the qcow program to run its commands, so the choice between them lives here,
 * above both, rather than in program.ts.
 */
import { adoptHostAddon } from '../node.js';
import { runQcow } from './program.js';

/**
 * QEMU's programs that qcow stands in for (compat/qemu-img, compat/qemu-io): each its own front
 * end with QEMU's options, output and messages, loaded only when asked for.
 */
const PERSONAS: Record<string, () => Promise<{ main: (argv: string[]) => Promise<void> }>> = {
  'qemu-img': () => import('../compat/qemu-img/main.js'),
  'qemu-io': () => import('../compat/qemu-io/main.js'),
};

/** What the launcher (bin/qcow.cjs) has set up before the CLI runs. */
export interface LaunchContext {
  /** The host addon it loaded (to map the bundle), for the library to use rather than load again. */
  hostAddon?: object;
}

/** Run one command line (`argv` as process.argv: node, script, arguments); sets process.exitCode. */
export async function main(argv: string[], launch: LaunchContext = {}): Promise<void> {
  if (launch.hostAddon) adoptHostAddon(launch.hostAddon);
  const persona = argv[2]?.startsWith('--persona=') ? argv[2].slice('--persona='.length) : undefined;
  if (persona !== undefined) {
    const load = Object.hasOwn(PERSONAS, persona) ? PERSONAS[persona] : undefined;
    if (!load) {
      process.stderr.write(`qcow: unknown persona '${persona}'\n`);
      process.exitCode = 1;
      return;
    }
    return (await load()).main([argv[0]!, persona, ...argv.slice(3)]);
  }
  await runQcow(argv);
}

