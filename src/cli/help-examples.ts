/**
 * The examples `qcow help COMMAND` (and `qcow COMMAND --help`) prints after the options: two or
 * three command lines per command, each the way people most often need it, with a word on what
 * it does. Kept in one table so the help and the README's command reference are checked together.
 */

/** Examples per command name: [command line, what it does]. */
export const HELP_EXAMPLES: Readonly<Record<string, readonly (readonly [string, string])[]>> = {
  info: [
    ['qcow info disk.qcow2', 'format, sizes, cluster size, backing file, snapshots'],
    ['qcow info --backing-chain --output=json top.qcow2', 'every image of the chain, as qemu-img JSON'],
    ['qcow info https://example.com/images/disk.qcow2', 'an image over HTTP (only its header is fetched)'],
  ],
  create: [
    ['qcow create -f qcow2 disk.qcow2 20G', 'an empty, sparse 20 GiB image'],
    ['qcow create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2', 'an overlay whose unwritten ranges read from base.qcow2'],
    ['qcow create -f qcow2 -o encrypt.format=luks --password-file pw.txt secret.qcow2 1G', 'a LUKS-encrypted image'],
  ],
  convert: [
    ['qcow convert -O raw disk.qcow2 disk.raw', 'guest content as a raw (sparse) file'],
    ['qcow convert -c -O qcow2 -o compression_type=zstd disk.raw small.qcow2', 'a compressed qcow2'],
    ['qcow convert -O qcow2 -B base.qcow2 -F qcow2 new.raw diff.qcow2', 'only what differs from base.qcow2'],
    ["qcow convert -c -O qcow2 disk.raw - | ssh host 'cat > disk.qcow2'", 'a qcow2 written front to back into a pipe (no temporary image)'],
    ['qcow convert -C -O raw disk.qcow2 copy.raw', 'copy offload: on XFS or Btrfs the kernel shares the blocks'],
  ],
  dd: [
    ['qcow dd if=disk.qcow2 of=head.raw bs=1M count=64', 'the first 64 MiB of the guest disk as a raw image'],
    ['qcow dd -O qcow2 bs=4k skip=256 if=disk.raw of=tail.qcow2', 'everything after the first MiB, into a new qcow2'],
  ],
  compare: [
    ['qcow compare a.qcow2 b.raw', 'exit 0 when the guest sees the same bytes, 1 (with the offset) when not'],
    ['qcow compare -s a.qcow2 b.qcow2', 'strict: sizes and allocation must match too'],
  ],
  map: [
    ['qcow map --output=json disk.qcow2', "allocation of the chain, as qemu-img map's JSON"],
    ['qcow map --output=svg top.qcow2 > layout.svg', 'a picture of every layer and of what the guest reads'],
    ['qcow map --output=html --cells 1024 top.qcow2 > layout.html', 'the picture with a legend and byte totals'],
  ],
  io: [
    ["qcow io -c 'write -P 0xab 0 1M' disk.qcow2", "write a pattern (qemu-io's commands and output)"],
    ["qcow io -r -c 'read -P 0xab 0 1M' -c 'map' disk.qcow2", 'verify it read-only, then show the allocation'],
  ],
  snapshot: [
    ['qcow snapshot -c before-upgrade disk.qcow2', 'take an internal snapshot'],
    ['qcow snapshot -l disk.qcow2', 'list them'],
    ['qcow snapshot -a before-upgrade disk.qcow2', 'go back to it'],
  ],
  serve: [
    ['qcow serve -r -k /tmp/disk.sock disk.qcow2', 'export read-only on a Unix socket (nbdinfo "nbd+unix:///?socket=/tmp/disk.sock")'],
    ['qcow serve -p 10810 -e 4 -t top.qcow2', 'writable on TCP 127.0.0.1:10810, up to 4 clients, kept running'],
    ['qcow serve -r -A -k /tmp/top.sock top.qcow2', 'with qemu:allocation-depth (nbdinfo --map=qemu:allocation-depth)'],
    ['qcow serve -r -B nightly -k /tmp/disk.sock disk.qcow2', 'with qemu:dirty-bitmap:nightly, what changed since the bitmap was added'],
  ],
  check: [
    ['qcow check disk.qcow2', "qemu-img check's report and exit code (0 clean, 2 corrupt, 3 leaks)"],
    ['qcow check -r all disk.qcow2', 'repair leaks and corruptions'],
  ],
  resize: [
    ['qcow resize disk.qcow2 +10G', 'grow the virtual size'],
    ['qcow resize --shrink disk.qcow2 8G', 'shrink it (data past the new end is dropped)'],
  ],
  amend: [
    ['qcow amend -o compat=0.10 disk.qcow2', 'downgrade to qcow2 v2 for old QEMUs'],
    ['qcow amend -o lazy_refcounts=on disk.qcow2', 'change a feature in place'],
  ],
  commit: [
    ['qcow commit top.qcow2', "write the overlay's data into its backing file and empty the overlay"],
    ['qcow commit -b base.qcow2 top.qcow2', 'into an image further down the chain'],
  ],
  rebase: [
    ['qcow rebase -b new-base.qcow2 -F qcow2 top.qcow2', 'change the backing file; the guest sees no change'],
    ['qcow rebase -u -b moved/base.qcow2 -F qcow2 top.qcow2', 'only rewrite the name (the file moved)'],
    ['qcow rebase -b "" top.qcow2', 'flatten: copy the backing data in and drop the backing file'],
  ],
  measure: [
    ['qcow measure -O qcow2 disk.raw', 'bytes a qcow2 copy needs, and fully allocated'],
    ['qcow measure -O qcow2 --size 100G', 'for a new, empty image'],
  ],
  bitmap: [
    ['qcow bitmap --add -g 64k disk.qcow2 nightly', 'a persistent dirty bitmap that records every write from now on'],
    ['qcow bitmap --clear --disable disk.qcow2 nightly', 'several actions in one call, in order'],
    ['qcow bitmap --merge old -b other.qcow2 -F qcow2 disk.qcow2 nightly', "add another image's bitmap 'old' into 'nightly'"],
  ],
  backup: [
    ['qcow backup -B chk disk.qcow2 full.qcow2', 'a full backup; bitmap chk records changes from now on'],
    ['qcow backup -B chk -b full.qcow2 disk.qcow2 inc1.qcow2', 'only what changed since, as an overlay of full.qcow2'],
  ],
  bench: [
    ['qcow bench -c 10000 -d 32 disk.qcow2', "qemu-img bench's read workload, 32 requests in flight"],
    ['qcow bench -w -s 64k -c 2000 disk.qcow2', 'writes of 64 KiB'],
  ],
};

/** The examples of `command` as help text, or '' when it has none. */
export function helpExamples(command: string): string {
  const examples = Object.hasOwn(HELP_EXAMPLES, command) ? HELP_EXAMPLES[command]! : [];
  if (examples.length === 0) return '';
  return `\nExamples:\n${examples.map(([line, what]) => `  ${line}\n      ${what}`).join('\n')}\n`;
}
