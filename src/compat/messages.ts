/**
 * Our errors in QEMU's words, for the compat front ends (compat/qemu-img, compat/qemu-io). The
 * formats and the `qcow` command keep their own wording; this table is the one place that turns a
 * QcowError (its code, what it is about, and where the front end met it) into the sentence QEMU's
 * programs print for the same failure. The first matching row wins; add rows, not special cases.
 */
import { QcowError } from '../node.js';

/** Where the front end met the error. */
export type ErrorContext =
  /** opening the image a command works on (`file`) */
  | 'open'
  /** create: opening the backing file (`file` is the new image, `backing` the resolved name) */
  | 'create-backing'
  /** anything else a command does once its images are open */
  | 'run'
  /** qemu-io opening its device: the driver's own words, after `can't open device X: ` */
  | 'device'
  /** create, dd: making the new image's file (`file`) */
  | 'create-file';

export interface MessageContext {
  op: ErrorContext;
  /** The image the command was given. */
  file?: string;
  /** create: the backing file name as resolved against the new image. */
  backing?: string;
}

interface Row {
  code?: QcowError['code'] | 'ANY';
  /** Where the row applies (default: 'open' and 'run', the qemu-img contexts). */
  op?: ErrorContext | ErrorContext[];
  /** A pattern on our own message, for codes that cover several failures. */
  match?: RegExp;
  /** The first line is printed as QEMU prints it with fprintf: without the program's name. */
  bare?: boolean;
  /** QEMU's text, possibly several lines (the first gets the program prefix unless `bare`). */
  text: (e: QcowError, ctx: MessageContext, m: RegExpExecArray | null) => string;
}

/** Our message when a qcow2 image marked corrupt is opened for writing. */
export const OPEN_REFUSED = /^the image is marked corrupt and cannot be opened read\/write/;
/** An image name (a json: one's options, a protocol's filename, a raw window off the file) that names no node QEMU can open. */
const NAME_REFUSED = /^(?:A block device must be specified for "file"|The only allowed filename for this driver is '[^']*'|Offset \(\d+\) cannot be greater than size of the containing file \(\d+\)|The sum of offset \(\d+\) and size \(\d+\) has to be smaller or equal to the {2}actual size of the containing file \(\d+\)|Specified size is not multiple of 512|Block format '[^']*' does not support the option '[^']*'|Block protocol '[^']*' doesn't support the option '[^']*')$/;

/** Whether an error comes from the operating system (an errno code on it or its cause). */
const hasErrno = (e: QcowError): boolean => [e, e.cause].some((x) => /^E[A-Z]+$/.test(String((x as NodeJS.ErrnoException | undefined)?.code ?? '')));

/** Our messages when opening refuses a qcow2 snapshot table past qemu's limits (as qemu's open does). */
export const SNAPSHOT_TABLE_REFUSED = /^(?:Too much extra metadata in snapshot table entry \d+ \(check -r all drops it\)|Snapshot table is too big \(check -r all drops the \d+ overhanging snapshots\)|Snapshot table too large)$/;

const noFile = (msg: string) => msg.replace(/^(?:file|cannot open|could not open)[^:]*:\s*/i, '');

/**
 * Our refusals of a qcow2 or qcow header at open, and QEMU's words for each. A refusal that is
 * not a corruption of ours (an image too large for QEMU's limits) names its code.
 */
const HEADER_REFUSALS: [RegExp, string, QcowError['code']?][] = [
  [/^qcow2 header: header_length \d+ is larger than the first cluster/, 'qcow2 header exceeds cluster size'],
  [/^(?:qcow2 header: )?backing_file_offset 0x[0-9a-f]+ (?:is too large|lies past the first cluster)$/, 'Invalid backing file offset'],
  [/^qcow2 header extension (?:0x[0-9a-f]+ )?at 0x[0-9a-f]+(?::.*)? runs past the header area$/, 'Header extension too large'],
  [/^refcount table of \d+ clusters is too large$/, 'Reference count table too large'],
  [/^the image has no refcount table \(refcount_table_clusters is 0\)/, 'Image does not contain a reference count table'],
  [/^(?:refcount_table_offset 0x[0-9a-f]+ is too large|refcount table offset 0x[0-9a-f]+ is not cluster aligned)$/, 'Reference count table offset invalid'],
  [/^snapshot table: \d+ snapshots is more than the limit/, 'Snapshot table too large'],
  [/^snapshots_offset 0x[0-9a-f]+ is too large$/, 'Snapshot table offset invalid'],
  [/^L1 table: \d+ entries is more than qemu's limit/, 'Active L1 table too large'],
  [/^(?:l1_table_offset 0x[0-9a-f]+ is too large|L1 table offset 0x[0-9a-f]+ is not cluster aligned)$/, 'Active L1 table offset invalid'],
  [/^L1 table is too small\b/, 'L1 table is too small'],
  [/^could not repair the dirty image: /, 'Could not repair dirty image: Input/output error'],
  [/^qcow2 header: backing file name is too long/, 'Backing file name too long'],
  // qcow (version 1): QEMU's qcow driver checks the same fields in its own words.
  [/^header cluster_bits \d+ is out of range\b/, 'Cluster size must be between 512 and 64k'],
  [/^header l2_bits \d+ is out of range\b/, 'L2 table size must be between 512 and 64k'],
  [/^header size \d+: image too large\b/, 'Image too large', 'QCOW_UNSUPPORTED'],
  [/^header backing_file_size \d+: backing file name too long\b/, 'Backing file name too long'],
];

const ROWS: Row[] = [
  // check, a snapshot table it cannot read, or a snapshot L1 table past what a file can hold:
  // qemu-img prints the error, a hint where -r all helps, then why the check failed.
  {
    code: 'QCOW_CORRUPT',
    match: /^ERROR snapshot table too large \(\d+ entries; check -r all drops the (\d+) overhanging snapshots\)$/,
    text: (_e, _c, m) => `ERROR snapshot table too large\nYou can force-remove all ${m![1]} overhanging snapshots with qemu-img check -r all\nqemu-img: Check failed: File too large`,
  },
  { code: 'QCOW_CORRUPT', match: /^ERROR snapshot table offset invalid$/, text: (e) => `${e.message}\nqemu-img: Check failed: Invalid argument` },
  {
    code: 'QCOW_CORRUPT',
    match: /^(ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry \d+) \(check -r all drops it\)$/,
    text: (_e, _c, m) => `${m![1]}\nYou can force-remove this extra metadata with qemu-img check -r all\nqemu-img: Check failed: File too large`,
  },
  {
    code: 'QCOW_CORRUPT',
    match: /^(ERROR failed to read the snapshot table: Snapshot table is too big) \(check -r all drops the (\d+) overhanging snapshots\)$/,
    text: (_e, _c, m) => `${m![1]}\nYou can force-remove all ${m![2]} overhanging snapshots with qemu-img check -r all\nqemu-img: Check failed: File too large`,
  },
  { code: 'QCOW_CORRUPT', match: /^ERROR failed to update snapshot table: (.*)$/, text: (e) => `${e.message}\nqemu-img: Check failed` },
  // qemu-img first counts the table's own bytes (and says they lie past the end of the file), then
  // fails reading it; both ERROR lines are its fprintf, without the program's name.
  {
    code: 'QCOW_IO',
    match: /^(ERROR: I\/O error in check_refcounts_l1) \(a snapshot L1 table of (\d+) bytes at 0x([0-9a-f]+) /,
    bare: true,
    text: (_e, _c, m) =>
      `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${m![3]} size 0x${Number(m![2]).toString(16)}\n${m![1]}\nqemu-img: Check failed: Input/output error`,
  },
  // snapshot -a / -d of a snapshot the image does not have (before the open rows: it is not one).
  {
    code: 'QCOW_NOT_FOUND',
    match: /^Could not (apply|delete) snapshot '(.*)': Can't find snapshot/,
    text: (_e, _c, m) => (m![1] === 'apply' ? `Could not apply snapshot '${m![2]}': Failed to load snapshot: No such file or directory` : `Could not delete snapshot '${m![2]}': snapshot not found`),
  },
  // snapshot -c/-a/-d on a format without snapshots (raw, qcow v1): qemu-img's words for each,
  // from its ENOTSUP, the block layer's refusal, and a delete that finds nothing to delete.
  {
    code: 'QCOW_UNSUPPORTED',
    match: /^Could not (create|apply|delete) snapshot '(.*)': Operation not supported \(format \S+ has no snapshots\)$/,
    text: (_e, _c, m) =>
      `Could not ${m![1]} snapshot '${m![2]}': ${m![1] === 'create' ? '-95 (Operation not supported)' : m![1] === 'apply' ? 'Block driver does not support snapshots' : 'snapshot not found'}`,
  },
  // snapshot -c on an image whose snapshot table is full: qemu-img's words for its EFBIG.
  {
    code: 'QCOW_UNSUPPORTED',
    match: /^Could not create snapshot '(.*)': the image has \d+ snapshots, the most/,
    text: (_e, _c, m) => `Could not create snapshot '${m![1]}': -27 (File too large)`,
  },
  // snapshot -c where a count cannot change: past its width (QEMU's update_refcount: EINVAL), past
  // what a refcount table can hold (EFBIG), or without a refcount block (its EAGAIN, from making one).
  {
    match: /^Could not create snapshot '(.*)': (?:(Refcount overflow on cluster )|(refcount table would exceed 8 MiB)|no refcount block covers cluster )/,
    text: (_e, _c, m) => `Could not create snapshot '${m![1]}': ${m![2] ? '-22 (Invalid argument)' : m![3] ? '-27 (File too large)' : '-11 (Resource temporarily unavailable)'}`,
  },
  // commit: a failure while the data is copied is its block job's (ops/commit.ts).
  { code: 'QCOW_IO', match: /^commit failed: ([^]*)$/, text: (_e, _c, m) => `Block job failed: ${m![1]}` },
  // resize to a smaller size without --shrink: QEMU adds its warning line.
  {
    code: 'QCOW_INVALID_ARGUMENT',
    match: /^Use the --shrink option to perform a shrink operation\.$/,
    text: (e) =>
      `${e.message}\nqemu-img: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.`,
  },
  // qemu-io: a directory opened for writing (the file protocol names it).
  { op: 'device', code: 'QCOW_INVALID_ARGUMENT', match: /^Is a directory$/, text: (e, c) => `Could not open '${e.file ?? c.file}': Is a directory` },
  // A qcow2 image with the corrupt bit, opened for writing (qemu-io prints the driver's words alone).
  {
    op: ['open', 'device'],
    code: 'QCOW_CORRUPT',
    match: OPEN_REFUSED,
    text: (e, c) => `${c.op === 'open' ? `Could not open '${c.file ?? e.file}': ` : ''}qcow2: Image is corrupt; cannot be opened read/write`,
  },
  // A qcow2 header, or a table it places, that QEMU refuses at open: its words for each (ours say
  // what the values were). qemu-io gives the words alone, qemu-img names the image.
  ...HEADER_REFUSALS.map(
    ([match, words, code]): Row => ({
      op: ['open', 'run', 'device'],
      code: code ?? 'QCOW_CORRUPT',
      match,
      text: (e, c) => (c.op === 'device' ? words : `Could not open '${c.file ?? e.file}': ${words}`),
    }),
  ),
  // A snapshot L1 table QEMU refuses to load (too large, misaligned): its words per command, and
  // for a revert and amend the errno the failure ends in.
  {
    code: 'QCOW_CORRUPT',
    match: /^(?:Could not (apply|delete) snapshot '(.*)': |(cannot expand zero clusters: ))?snapshot '.*' L1 table(?::| 0x[0-9a-f]+ is not cluster aligned)(?: \d+ entries is more than)?/,
    text: (e, _c, m) => {
      const tooLarge = / entries is more than /.test(e.message);
      const why = tooLarge ? 'Snapshot L1 table too large' : 'Snapshot L1 table offset invalid';
      const errno = tooLarge ? 'File too large' : 'Invalid argument';
      if (m![1] === 'delete') return `Could not delete snapshot '${m![2]}': ${why}`;
      if (m![1] === 'apply') return `${why}\nqemu-img: Could not apply snapshot '${m![2]}': Failed to load snapshot: ${errno}`;
      if (m![3]) return `${why}\nqemu-img: Failed to turn zero into data clusters: ${errno}`;
      return `Failed to load snapshot: ${why}`;
    },
  },
  // resize --shrink meeting a corrupt refcount table (the image was marked corrupt): QEMU's errno.
  { code: 'QCOW_CORRUPT', match: /^cannot drop unused refcount blocks: /, text: () => 'Failed to discard unused refblocks: Input/output error' },
  // amend to compat=0.10 meeting a corrupt table (the image was marked corrupt): QEMU's errno.
  { code: 'QCOW_CORRUPT', match: /^cannot expand zero clusters: /, text: () => 'Failed to turn zero into data clusters: Input/output error' },
  // amend on a format without it: refused once the image is open, without "Could not open".
  { code: 'QCOW_UNSUPPORTED', match: /does not support option amendment$/, text: (e) => e.message },
  // map, human output: data without a host offset in the file.
  { code: 'QCOW_UNSUPPORTED', match: /^the human map cannot show data/, text: () => 'File contains external, encrypted or compressed clusters.' },
  // A virtual size past what can be addressed.
  { match: /^size 0x[0-9a-f]+ is too large/, text: (e, c) => `Could not open '${c.file ?? e.file}': Image is too big` },
  // A backing chain that comes back to an image it already holds.
  { code: 'QCOW_CORRUPT', match: /loops back/, text: (e, c) => `Backing file '${e.file ?? c.file}' creates an infinite loop.` },
  // The file to create over is in use: QEMU names the lock and hints at the file on a line of its
  // own, which ends the message (create prints it after "FILE: ").
  { op: 'create-file', code: 'QCOW_LOCKED', text: (e, c) => `${lockWhat(e)}\nIs another process using the image [${c.file ?? e.file}]?\n` },
  // The new image's file could not be made (the file protocol names it; our message is the errno's).
  { op: 'create-file', match: /^[^:]*$/, text: (e, c) => (hasErrno(e) ? `Could not create '${c.file ?? e.file}': ${e.message}` : e.message) },
  { op: 'create-file', text: (e) => e.message },
  // create: the backing file could not be opened (QEMU adds a hint line).
  {
    op: 'create-backing',
    code: 'QCOW_NOT_FOUND',
    text: (_e, c) => `${c.file}: Could not open '${c.backing}': No such file or directory\nCould not open backing image.`,
  },
  { op: 'create-backing', text: (e, c) => `${c.file}: Could not open '${c.backing}': ${noFile(e.message)}\nCould not open backing image.` },
  // Persistent bitmaps: a revert with bitmaps present, a resize with an inconsistent one (QEMU adds
  // a hint line to the latter).
  { code: 'QCOW_UNSUPPORTED', match: /^Could not apply snapshot '(.*)': the image has persistent dirty bitmaps/, text: (_e, _c, m) => `Could not apply snapshot '${m![1]}': Device has active dirty bitmaps` },
  {
    code: 'QCOW_UNSUPPORTED',
    match: /^Bitmap '(.*)' is inconsistent and cannot be used: cannot resize/,
    text: (_e, _c, m) => `Bitmap '${m![1]}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`,
  },
  // amend and resize refusing what the open image cannot do (QEMU reports them as the command's
  // failure, not the open's): our words are QEMU's.
  {
    code: 'QCOW_UNSUPPORTED',
    match: /^(?:compat=0\.10 requires refcount_bits=16|Cannot downgrade an image with .*|Internal snapshots prevent downgrade of image|Can't resize a v2 image which has snapshots|Cannot resize fixed-size raw disks|Unsupported preallocation mode: \w+|Image format driver does not support resize)$/,
    text: (e) => e.message,
  },
  // A format name we do not have (QEMU does not list the ones it has).
  { code: 'QCOW_INVALID_ARGUMENT', match: /^(Unknown file format '[^']*') \(known: [^)]*\)$/, text: (_e, _c, m) => m![1]! },
  // amend: the backing file cannot change; QEMU adds a hint line.
  { code: 'QCOW_UNSUPPORTED', match: /^(Cannot amend the backing file)\. (You can use 'qemu-img rebase' instead\.)$/, text: (_e, _c, m) => `${m![1]}\n${m![2]}` },
  // amend: an option only create takes; QEMU's hint is a line of its own.
  { code: 'QCOW_INVALID_ARGUMENT', match: /^(Invalid parameter '.*'): this option is only supported for image creation$/, text: (_e, _c, m) => `${m![1]}\nThis option is only supported for image creation` },
  // convert --bitmaps: a target without bitmaps, an inconsistent source bitmap.
  { code: 'QCOW_UNSUPPORTED', match: /^Format driver '.*' does not support bitmaps$/, text: (e) => e.message },
  {
    code: 'QCOW_UNSUPPORTED',
    match: /^Cannot copy inconsistent bitmap '(.*)'(?:\. Try|$)/,
    text: (_e, _c, m) => `Cannot copy inconsistent bitmap '${m![1]}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it`,
  },
  // A persistent bitmap QEMU cannot load fails the open (OpenOptions.refuseMalformedBitmaps); QEMU
  // does not say why.
  {
    op: ['open', 'device'],
    code: 'QCOW_UNSUPPORTED',
    match: /^(Bitmap '.*' doesn't satisfy the constraints|Bitmap extra data is not supported) \((?:[^)]*|bitmap '.*')\)$/,
    text: (e, c, m) => (c.op === 'open' ? `Could not open '${c.file ?? e.file}': ${m![1]}` : m![1]!),
  },
  // Opening: a snapshot table past qemu's limits; QEMU adds how check -r all repairs it.
  {
    op: 'open',
    code: 'QCOW_CORRUPT',
    match: /^(Too much extra metadata in snapshot table entry \d+) \(check -r all drops it\)$/,
    text: (e, c, m) => `Could not open '${c.file ?? e.file}': ${m![1]}\nYou can force-remove this extra metadata with qemu-img check -r all`,
  },
  {
    op: 'open',
    code: 'QCOW_CORRUPT',
    match: /^(Snapshot table is too big) \(check -r all drops the (\d+) overhanging snapshots\)$/,
    text: (e, c, m) => `Could not open '${c.file ?? e.file}': ${m![1]}\nYou can force-remove all ${m![2]} overhanging snapshots with qemu-img check -r all`,
  },
  // Opening: an external data file that is missing (named as the image names it), or a header
  // that names none (the user must).
  {
    op: 'open',
    code: 'QCOW_NOT_FOUND',
    match: /^Could not open data file '(.*)': (.*)$/,
    text: (_e, c, m) => `Could not open '${c.file}': Could not open '${m![1]}': ${m![2]}`,
  },
  // A file that is not in the format asked for (-f, backing.driver): QEMU's words.
  {
    op: ['open', 'device'],
    code: 'QCOW_BAD_MAGIC',
    match: /^(?:not a (qcow2) image|Image not in (qcow) format) \(bad magic\)$/,
    text: (e, c, m) => `${c.op === 'device' ? '' : `Could not open '${c.file ?? e.file}': `}${m![1] ? `Image is not in ${m![1]} format` : `Image not in ${m![2]} format`}`,
  },
  { op: ['open', 'device'], code: 'QCOW_UNSUPPORTED', match: /^('data-file' is required for this image) \(/, text: (e, c, m) => (c.op === 'device' ? m![1]! : `Could not open '${c.file ?? e.file}': ${m![1]}`) },
  // Opening: a backing file that is missing.
  {
    op: 'open',
    code: 'QCOW_NOT_FOUND',
    match: /^Could not open backing file '(.*)': (.*)$/,
    text: (_e, c, m) => `Could not open '${c.file}': Could not open backing file: Could not open '${m![1]}': ${m![2]}`,
  },
  // The format layer and the file layer below it each name the file.
  { op: 'open', code: 'QCOW_NOT_FOUND', text: (e, c) => `Could not open '${c.file ?? e.file}': Could not open '${c.file ?? e.file}': No such file or directory` },
  // (The luks format's key option is plain key-secret.)
  {
    op: ['open', 'device'],
    code: 'QCOW_NEED_PASSWORD',
    text: (e, c) => `${c.op === 'device' ? '' : `Could not open '${c.file}': `}Parameter '${/^LUKS image/.test(e.message) ? '' : 'encrypt.'}key-secret' is required for cipher`,
  },
  { op: 'open', code: 'QCOW_BAD_PASSWORD', text: (_e, c) => `Could not open '${c.file}': Invalid password, cannot unlock any keyslot` },
  // QEMU's lock error names the permission it could not get, and hints at the file on a line of its own.
  { op: ['open', 'device'], code: 'QCOW_LOCKED', text: (e, c) => `${c.op === 'device' ? '' : `Could not open '${c.file}': `}${lockWhat(e)}\nIs another process using the image [${c.file ?? e.file}]?` },
  { op: 'open', code: 'ANY', text: (e, c) => `Could not open '${c.file ?? e.file}': ${e.message}` },
];

/** Which lock a QCOW_LOCKED error could not get (`Failed to get shared "write" lock`). */
function lockWhat(e: QcowError): string {
  return /^(Failed to get .* lock)/.exec(e.message)?.[1] ?? 'Failed to get "write" lock';
}

/** QEMU's text for `e` (without the program prefix). Errors that are not ours keep their message. */
export function qemuMessage(e: unknown, ctx: MessageContext): string {
  return qemuText(e, ctx).text;
}

function qemuText(e: unknown, ctx: MessageContext): { text: string; bare?: boolean } {
  if (!(e instanceof QcowError)) {
    const err = e as NodeJS.ErrnoException;
    if (err?.code === 'ENOENT' && ctx.file) return { text: `Could not open '${ctx.file}': No such file or directory` };
    return { text: err && typeof err.message === 'string' ? err.message : String(e) };
  }
  for (const row of ROWS) {
    if (!(row.op === undefined ? ctx.op !== 'device' && ctx.op !== 'create-file' : [row.op].flat().includes(ctx.op))) continue;
    if (row.code !== undefined && row.code !== 'ANY' && row.code !== e.code) continue;
    let m: RegExpExecArray | null = null;
    if (row.match) {
      m = row.match.exec(e.message);
      if (!m) continue;
    }
    return { text: row.text(e, ctx, m), bare: row.bare };
  }
  // QEMU's messages after opening rarely name the image; ours that need it say it themselves.
  return { text: e.message };
}

/** Lines for stderr: the program's prefix on the first line only, as QEMU's error_report and hints. */
export function qemuErrorLines(program: string, e: unknown, ctx: MessageContext): string {
  const { text, bare } = qemuText(e, ctx);
  if (bare) return text + '\n';
  const [first, ...rest] = text.split('\n');
  return [`${program}: ${first}`, ...rest].join('\n') + '\n';
}

/** Whether a failure happened while opening the image (QEMU then says "Could not open"): the context qemu-img's commands report it in. */
export function contextOf(e: unknown): ErrorContext {
  if (!(e instanceof QcowError)) return 'run';
  switch (e.code) {
    case 'QCOW_NOT_FOUND':
    case 'QCOW_BAD_MAGIC':
    case 'QCOW_UNSUPPORTED':
    case 'QCOW_NEED_PASSWORD':
    case 'QCOW_BAD_PASSWORD':
    case 'QCOW_LOCKED':
      return 'open';
    case 'QCOW_CORRUPT':
      return OPEN_REFUSED.test(e.message) || SNAPSHOT_TABLE_REFUSED.test(e.message) ? 'open' : 'run';
    case 'QCOW_INVALID_ARGUMENT':
      return NAME_REFUSED.test(e.message) ? 'open' : 'run';
    default:
      return 'run';
  }
}
