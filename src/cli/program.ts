/**
 * `qcow`: a qemu-img-like command line. Each command's code is imported only when it runs, so
 * start-up stays light. Every failure ends as one line on stderr and a non-zero exit status.
 * entry.ts picks between it and the QEMU personas; main.ts runs that, and bin/qcow.cjs runs the
 * same code from one bundled file (see there).
 */
import { Command, CommanderError, Option } from 'commander';
import { collect, errorLine, failureStyle, jsonStyle, exitCodeFor, openPolicy, writeOut } from './common.js';
import { codecKinds, lockingKind } from '../node.js';
import { helpExamples } from './help-examples.js';

/** A command's module: `run` takes commander's action arguments (operands, then the flags). */
type CommandModule = { run: (...a: never[]) => Promise<number | void> };

/** Each command's module, imported when the command runs (listed, so bundlers see every one). */
const COMMANDS: Record<string, () => Promise<CommandModule>> = {
  amend: () => import('./commands/amend.js'),
  backup: () => import('./commands/backup.js'),
  bench: () => import('./commands/bench.js'),
  bitmap: () => import('./commands/bitmap.js'),
  check: () => import('./commands/check.js'),
  commit: () => import('./commands/commit.js'),
  compare: () => import('./commands/compare.js'),
  convert: () => import('./commands/convert.js'),
  create: () => import('./commands/create.js'),
  dd: () => import('./commands/dd.js'),
  info: () => import('./commands/info.js'),
  io: () => import('./commands/io.js'),
  map: () => import('./commands/map.js'),
  measure: () => import('./commands/measure.js'),
  rebase: () => import('./commands/rebase.js'),
  resize: () => import('./commands/resize.js'),
  serve: () => import('./commands/serve.js'),
  snapshot: () => import('./commands/snapshot.js'),
};

const VERSION = process.env.npm_package_version ?? '0.1.0';

/** The command-line program for `argv`; a fresh one per run (commander keeps parsed options on it). */
export function buildProgram(argv: string[]): Command {
  const program = new Command();
  program
    .name('qcow')
    .description('QCOW/QCOW2 disk image tool: a TypeScript qemu-img and qemu-nbd')
    // The version lines also say which image locking and which codecs are in use (loading the
    // host addon, zlib and libzstd to tell).
    .version(argv.includes('-V') || argv.includes('--version') ? `${VERSION}\nimage locking: ${lockingKind()}\ncodecs: ${codecKinds()}` : VERSION)
    .showHelpAfterError(false)
    .exitOverride()
    .configureOutput({ outputError: () => undefined, writeOut });

  const lazy =
    (mod: string) =>
    async (...args: unknown[]): Promise<void> => {
      const m = await COMMANDS[mod]!();
      const code = await (m.run as (...a: unknown[]) => Promise<number | void>)(...args);
      if (typeof code === 'number') process.exitCode = code;
    };

  const fmt = () => new Option('-f, --format <fmt>', 'image format (probed when not given)');
  const pw = () => new Option('--password-file <file>', 'file holding the password of an encrypted image');
  const out = () => new Option('--output <fmt>', 'output format: human or json').default('human');

  // Only the command being run is defined: commander builds every option of every command it
  // is given, which is start-up time. Help, and a name that is no command, define them all.
  const definers: Record<string, () => void> = {
    info: () => {
      program
        .command('info')
        .description('show what an image is')
        .addOption(fmt())
        .addOption(pw())
        .addOption(out())
        .option('--backing-chain', 'show every image of the backing chain')
        .option('-U, --force-share', 'accepted for qemu-img compatibility')
        .argument('<file>')
        .action(lazy('info'));
    },
    create: () => {
      program
        .command('create')
        .description('create an image')
        .requiredOption('-f, --format <fmt>', 'image format')
        .option('-o, --options <list>', 'format options, key=value[,key=value...]', collect)
        .option('-b, --backing <file>', 'backing file')
        .option('-F, --backing-format <fmt>', 'backing file format (required with -b)')
        .option('-u, --unsafe', 'do not open the backing file (the size must be given)')
        .option('-q, --quiet', 'print nothing')
        .addOption(pw())
        .argument('<file>')
        .argument('[size]')
        .action(lazy('create'));
    },
    convert: () => {
      program
        .command('convert')
        .description('convert images to another format (several sources are concatenated)')
        .addOption(fmt())
        .option('-O, --output-format <fmt>', 'target format', 'raw')
        .option('-o, --options <list>', 'target format options', collect)
        .option('-B, --backing <file>', 'target backing file: write only what differs from it')
        .option('-F, --backing-format <fmt>', 'format of the target backing file')
        .option('-c, --compress', 'compress the target clusters')
        .option('-n, --no-create', 'write into an existing target')
        .option('-S, --sparse-size <size>', 'shortest run of zeros kept sparse (0: allocate everything; default 4k)')
        .option('-l, --snapshot <name>', 'read an internal snapshot of the source (NAME or snapshot.name=NAME)')
        .option('-p, --progress', 'show progress')
        .option('-q, --quiet', 'print nothing')
        .option('-m, --parallel <n>', 'chunks in flight at once', '8')
        .option('-W', 'let writes complete out of order (the target layout may then differ run to run)')
        .option('--stream-buffer <size>', "reading a stream ('-' or a server without Range): bytes held in memory until the tables that name them arrive (default 64M)")
        .option('--stream-spill <dir>', 'reading a stream: where held clusters go once the buffer is full (a temporary file there)')
        .option('--stream-spill-size <size>', 'reading a stream: most bytes the spill may take (default 4G)')
        .option('-C', 'copy offload: data stored as plain file bytes is copied file to file by the kernel (copy_file_range); zero blocks inside data are not searched for')
        .option('-t, --cache <mode>', 'target cache mode: unsafe (default, as qemu-img convert: no flushes), writeback, none, ...', 'unsafe')
        .option('--bitmaps', 'copy the persistent dirty bitmaps of the source (qcow2 to qcow2)')
        .option('--skip-broken-bitmaps', 'with --bitmaps: leave inconsistent bitmaps behind instead of failing')
        .option('--salvage', 'go on past read errors of the source: warn, and write unreadable sectors as zeros')
        .option('-U, --force-share', 'accepted for qemu-img compatibility')
        .addOption(pw())
        .option('--target-password-file <file>', 'password for an encrypted target')
        .argument('<files...>', 'sources, then the target')
        .action(lazy('convert'));
    },
    dd: () => {
      program
        .command('dd')
        .description('copy an image (or part of it) into a new image, as qemu-img dd')
        .addOption(fmt())
        .option('-O, --output-format <fmt>', 'format of the image created', 'raw')
        .option('-U, --force-share', 'accepted for qemu-img compatibility')
        .addOption(pw())
        .argument('<operands...>', 'if=INPUT of=OUTPUT [bs=BYTES] [count=BLOCKS] [skip=BLOCKS]')
        .action(lazy('dd'));
    },
    compare: () => {
      program
        .command('compare')
        .description('compare the guest content of two images (exit 0 same, 1 different, 2 error)')
        .option('-f, --format <fmt>', 'format of the first image')
        .option('-F, --second-format <fmt>', 'format of the second image')
        .option('-s, --strict', 'fail on size or allocation differences')
        .option('-p, --progress', 'show progress')
        .option('-q, --quiet', 'print nothing')
        .option('-U, --force-share', 'read-only: share the image with a writer such as a running VM (as qemu-img -U)')
        .addOption(pw())
        .option('--second-password-file <file>', 'password of the second image')
        .argument('<a>')
        .argument('<b>')
        .action(lazy('compare'));
    },
    map: () => {
      program
        .command('map')
        .description('show the allocation of an image and its backing chain')
        .addOption(fmt())
        .addOption(pw())
        .addOption(new Option('--output <fmt>', 'output format: human, json, svg or html').default('human'))
        .option('--start-offset <offset>', 'first byte to map')
        .option('--max-length <len>', 'bytes to map')
        .option('--cells <n>', 'with --output=svg or html: cells per row (default 512)')
        .option('-U, --force-share', 'accepted for qemu-img compatibility')
        .argument('<file>')
        .addHelpText('after', '\n--output=svg draws the layout of every layer of the chain (data, compressed, zero, unallocated) and\nwhat the guest reads; --output=html adds a legend and byte totals.')
        .action(lazy('map'));
    },
    io: () => {
      program
        .command('io')
        .description('run qemu-io commands on an image (read, write, aio_write, discard, alloc, map, ...; -c help lists them)')
        .addOption(fmt())
        .addOption(pw())
        .option('-c, --cmd <command>', 'a command (repeatable, run in order)', collect)
        .option('-r, --read-only', 'open read-only')
        .option('-U, --force-share', 'accepted for qemu-io compatibility')
        .argument('<file>')
        .action(lazy('io'));
    },
    snapshot: () => {
      program
        .command('snapshot')
        .description('list, create, apply or delete the internal snapshots of an image (qcow2)')
        .addOption(fmt())
        .addOption(pw())
        .option('-l, --list', 'list the snapshots (the default)')
        .option('-c, --create <name>', 'create a snapshot of the current state')
        .option('-a, --apply <name>', 'revert the image to a snapshot')
        .option('-d, --delete <name>', 'delete a snapshot')
        .option('-q, --quiet', 'print nothing')
        .option('-U, --force-share', 'accepted for qemu-img compatibility')
        .argument('<file>')
        .action(lazy('snapshot'));
    },
    serve: () => {
      program
        .command('serve')
        .description('export an image over NBD, as qemu-nbd (TCP 127.0.0.1:10809 unless told otherwise)')
        .addOption(fmt())
        .addOption(pw())
        .option('-p, --port <port>', 'TCP port (default 10809)')
        .option('-b, --bind <addr>', 'address to listen on (default 127.0.0.1)')
        .option('-k, --socket <path>', 'listen on a Unix socket instead of TCP')
        .option('-r, --read-only', 'export read-only')
        .option('-C, --copy-on-read', "copy what clients read from the backing chain into the image (a slow or remote base is read once); not with -r")
        .option('-x, --export-name <name>', "export name (default '')")
        .option('-D, --description <text>', 'export description shown to clients')
        .option('-B, --bitmap <name>', 'also export persistent dirty bitmap NAME as the qemu:dirty-bitmap:NAME context')
        .option('-t, --persistent', "keep serving after the last client disconnects")
        .option('-e, --shared <n>', 'clients served at once (default 1)')
        .option('--pid-file <file>', 'write the process id here once listening')
        .option('-A, --allocation-depth', 'also offer the qemu:allocation-depth metadata context (which layer of the chain holds each range)')
        .argument('<file>')
        .action(lazy('serve'));
    },
    check: () => {
      program
        .command('check')
        .description('check an image for leaks and corruption (qcow2), optionally repairing it')
        .addOption(fmt())
        .addOption(out())
        .option('-r, --repair <what>', 'repair leaks, or all problems: leaks | all')
        .option('-q, --quiet', 'print nothing')
        .option('-U, --force-share', 'read-only: share the image with a writer such as a running VM (as qemu-img -U)')
        .argument('<file>')
        .action(lazy('check'));
    },
    resize: () => {
      program
        .command('resize')
        .description('change the virtual size of an image ([+|-]SIZE)')
        .addOption(fmt())
        .addOption(pw())
        .option('--shrink', 'allow making the image smaller')
        .option('--preallocation <mode>', 'reserve the added range: off, metadata (qcow2), falloc or full')
        .option('-q, --quiet', 'print nothing')
        .argument('<file>')
        .argument('<size>')
        .action(lazy('resize'));
    },
    bitmap: () => {
      // The actions run in the order given, so they are collected as commander meets them.
      const actions: Array<{ op: string; source?: string }> = [];
      const cmd = program
        .command('bitmap')
        .description('add, remove, clear, enable, disable or merge persistent dirty bitmaps (qcow2), in the order given')
        .addOption(fmt())
        .option('--add', 'add BITMAP (enabled unless --disabled)')
        .option('--remove', 'remove BITMAP')
        .option('--clear', 'clear BITMAP')
        .option('--enable', 'enable BITMAP')
        .option('--disable', 'disable BITMAP')
        .option('--merge <source>', 'merge bitmap SOURCE into BITMAP')
        .option('-g, --granularity <size>', 'granularity of a bitmap --add creates')
        .option('--disabled', 'with --add: create it disabled (qemu-img spells it --add --disable)')
        .option('-b, --source-file <file>', 'with --merge: the image that holds SOURCE')
        .option('-F, --source-format <fmt>', 'format of the -b image')
        .argument('<file>')
        .argument('<bitmap>');
      for (const op of ['add', 'remove', 'clear', 'enable', 'disable']) cmd.on(`option:${op}`, () => actions.push({ op }));
      cmd.on('option:merge', (source: string) => actions.push({ op: 'merge', source }));
      cmd.action((file: string, bitmap: string, flags: object) => lazy('bitmap')(file, bitmap, { ...flags, actions }));
    },
    backup: () => {
      program
        .command('backup')
        .description('full or incremental backup of a qcow2 disk through persistent dirty bitmap NAME, then rotate NAME')
        .addOption(fmt())
        .requiredOption('-B, --bitmap <name>', 'the bitmap recording changes between backups')
        .option('-b, --previous <file>', 'the previous backup: write only what changed since, as an overlay of it')
        .option('-F, --previous-format <fmt>', 'format of the previous backup (default qcow2)')
        .option('--keep-bitmap', 'leave the bitmap as it is (no rotation)')
        .option('-p, --progress', 'show progress')
        .option('-q, --quiet', 'print nothing')
        .argument('<source>')
        .argument('<target>')
        .action(lazy('backup'));
    },
    amend: () => {
      program
        .command('amend')
        .description('change options of an existing image in place (qcow2: compat, lazy_refcounts, refcount_bits, size; LUKS key slots)')
        .addOption(fmt())
        .addOption(pw())
        .option('-o, --options <list>', 'options to change, key=value[,key=value...] (-o help lists them)', collect)
        .option('--force', 'do what may lose data: overwrite an active LUKS key slot, erase the last one')
        .option('-q, --quiet', 'print nothing')
        .option('-p, --progress', 'show progress')
        .argument('<file>')
        .action(lazy('amend'));
    },
    commit: () => {
      program
        .command('commit')
        .description("write an overlay's data into its backing file (or BASE further down) and empty the overlay")
        .addOption(fmt())
        .addOption(pw())
        .option('-b, --base <base>', 'the image of the backing chain to commit into (implies -d)')
        .option('-d, --drop', 'do not empty the overlay afterwards')
        .option('-p, --progress', 'show progress')
        .option('-q, --quiet', 'print nothing')
        .option('-t, --cache <mode>', 'accepted for qemu-img compatibility')
        .argument('<file>')
        .action(lazy('commit'));
    },
    rebase: () => {
      program
        .command('rebase')
        .description('change the backing file of an image (safe mode keeps the guest content unchanged)')
        .addOption(fmt())
        .addOption(pw())
        .option('-b, --backing <file>', 'the new backing file ("" for none)')
        .option('-F, --backing-format <fmt>', 'format of the new backing file')
        .option('-u, --unsafe', 'only rewrite the backing file name; copy nothing')
        .option('-p, --progress', 'show progress')
        .option('-q, --quiet', 'print nothing')
        .option('-t, --cache <mode>', 'accepted for qemu-img compatibility')
        .option('-U, --force-share', 'accepted for qemu-img compatibility')
        .argument('<file>')
        .action(lazy('rebase'));
    },
    measure: () => {
      program
        .command('measure')
        .description('how large an image file would be, for a size or for a copy of an image')
        .addOption(fmt())
        .addOption(pw())
        .addOption(out())
        .option('-O, --output-format <fmt>', 'target format', 'raw')
        .option('-o, --options <list>', 'target format options', collect)
        .option('--size <size>', 'virtual size of the image to measure')
        .option('-l, --snapshot <name>', 'measure an internal snapshot of the source')
        .option('-U, --force-share', 'accepted for qemu-img compatibility')
        .argument('[file]')
        .action(lazy('measure'));
    },
    bench: () => {
      program
        .command('bench')
        .description('run a simple I/O benchmark on an image, as qemu-img bench')
        .addOption(fmt())
        .addOption(pw())
        .option('-c, --count <n>', 'number of requests (default 75000)')
        .option('-d, --depth <n>', 'requests in flight at once (default 64)')
        .option('-s, --size <bytes>', 'bytes per request (default 4096)')
        .option('-S, --step <bytes>', 'distance between request offsets (default: the request size)')
        .option('-o, --offset <offset>', 'offset of the first request')
        .option('-w, --write', 'write instead of read')
        .option('--pattern <byte>', 'byte written by write requests (default 0)')
        .option('--flush-interval <n>', 'flush after every N requests (write tests)')
        .option('--no-drain', 'do not wait for requests in flight before a flush')
        .option('-q, --quiet', 'accepted for qemu-img compatibility (bench always reports)')
        .option('-n, --nocache', 'accepted for qemu-img compatibility')
        .option('-t, --cache <mode>', 'accepted for qemu-img compatibility')
        .option('-i, --aio <mode>', 'accepted for qemu-img compatibility')
        .option('-U, --force-share', 'accepted for qemu-img compatibility')
        .argument('<file>')
        .action(lazy('bench'));
    },
  };
  const only = Object.hasOwn(definers, argv[2] ?? '') ? definers[argv[2]!] : undefined;
  if (only) only();
  else for (const define of Object.values(definers)) define();

  /**
   * Safety options for untrusted images, on every command that opens images (create only opens the
   * backing file it is given, with its format): --confine refuses backing and data files outside
   * the folder of the image naming them; --no-probe-backing opens backing files whose format the
   * image does not record as raw instead of probing them (QEMU probes, and so do we by default).
   */
  const NO_SAFETY_OPTIONS = new Set(['create']);
  for (const cmd of program.commands) {
    const examples = helpExamples(cmd.name());
    if (examples) cmd.addHelpText('after', examples);
    if (NO_SAFETY_OPTIONS.has(cmd.name())) continue;
    cmd
      .option('--confine', "refuse backing/data files outside the folder of the image that names them")
      .option('--no-probe-backing', 'open backing files of unrecorded format as raw (safe for untrusted images)');
  }
  program.hook('preAction', (_program, action) => {
    const o = action.opts<{ confine?: boolean; probeBacking?: boolean }>();
    openPolicy.confine = o.confine === true;
    openPolicy.probeBacking = o.probeBacking !== false;
  });

  return program;
}

/**
 * How a front end that runs the qcow commands under another name reports failures (the compat
 * personas put QEMU's wording here); the `qcow` command's own style otherwise.
 */
export interface FailureStyle {
  /** The program name that starts argument-error lines. */
  program: string;
  /** The whole text for a failure (ending in a newline). */
  errorText(e: unknown): string;
  /** JSON output laid out the persona's way. */
  json?: (value: unknown) => string;
  /** The exit status for a failure (default: qcow's own, exitCodeFor). */
  exitCode?: (e: unknown) => number;
}

/** The `qcow` command itself (or a persona running its commands with its own failure style). */
export async function runQcow(argv: string[], style?: FailureStyle): Promise<void> {
  if (style?.json) jsonStyle.stringify = style.json;
  if (style) Object.assign(failureStyle, { program: style.program, errorText: (e: unknown) => style.errorText(e) });
  try {
    await buildProgram(argv).parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') return;
      process.stderr.write(`${style?.program ?? 'qcow'}: ${e.message.replace(/^error: /, '')}\n`);
      process.exitCode = 1;
      return;
    }
    process.stderr.write(style ? style.errorText(e) : errorLine(e) + '\n');
    if (process.env.QCOW_DEBUG) process.stderr.write(String((e as Error)?.stack) + '\n');
    process.exitCode = (style?.exitCode ?? exitCodeFor)(e);
  }
}

