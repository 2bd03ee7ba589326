/**
 * Hostile qcow2 header fields: compat/qemu-io and compat/qemu-img refuse each image with the words
 * QEMU uses, and where several checks could fire, the one QEMU makes first wins (a header length
 * past the cluster before its alignment; a backing file offset past the cluster before the
 * extensions it bounds).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

/** Header field pokes: [byte offset, big-endian bytes as hex]. */
type Poke = [number, string];

async function poke(file: string, pokes: Poke[]): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    for (const [at, hex] of pokes) await fh.write(Buffer.from(hex, 'hex'), 0, hex.length / 2, at);
  } finally {
    await fh.close();
  }
}

const CASES: [string, Poke[]][] = [
  ['header length far past the cluster (and not a multiple of 8)', [[100, 'fffffff1']]],
  ['header length just past the cluster', [[100, '00010004']]],
  ['backing file offset past 2^53, with a huge extension', [[8, 'ffffffffffffffff'], [112, '1234567800ffffff']]],
  ['backing file offset past the cluster', [[8, '0000000000020000']]],
  ['extension header crossing the backing file name', [[8, '0000000000000074'], [112, '12345678']]],
  ['extension longer than the cluster', [[112, '1234567800100000']]],
  ['refcount table of too many clusters', [[56, '10000000']]],
  ['misaligned refcount table', [[48, '0000000000012345']]],
  ['misaligned L1 table', [[40, '0000000000012345']]],
  ['refcount table offset past 2^53', [[48, 'fff0000000000000']]],
  ['too many snapshots', [[60, '00100000']]],
  ['snapshot table offset past 2^53', [[64, 'fff0000000000000']]],
  ['L1 table too large', [[36, '10000000']]],
  ['L1 table offset past 2^53', [[40, 'fff0000000000000']]],
  ['L1 table too small for the size', [[36, '00000000']]],
  ['backing file name too long', [[8, '0000000000001000'], [16, '00010000']]],
];

/** Each case poked into a fresh image of `format`: qemu-io's read and qemu-img's info fail as QEMU's do. */
async function refusesLikeQemu(dir: string, format: 'qcow2' | 'qcow', cases: [string, Poke[]][]): Promise<void> {
  const img = join(dir, `t.${format}`);
  for (const [what, pokes] of cases) {
    await qemuImg(['create', '-q', '-f', format, img, '64M']);
    await poke(img, pokes);
    for (const [ours, theirs, args] of [
      [COMPAT_QEMU_IO, 'qemu-io', ['-c', 'read 0 512', img]],
      [COMPAT_QEMU_IMG, 'qemu-img', ['info', img]],
    ] as const) {
      const a = await run(ours, [...args]);
      const b = await run(theirs, [...args]);
      assert.deepEqual({ code: a.code, stderr: a.stderr }, { code: b.code, stderr: b.stderr }, `${theirs}: ${what}`);
      assert.notEqual(b.code, 0, `${theirs}: ${what}`);
    }
  }
}

test('compat/qemu-io and compat/qemu-img refuse hostile qcow2 headers in QEMU words', needs('qemu-img', 'qemu-io'), async (t) => {
  await refusesLikeQemu(await scratch(t), 'qcow2', CASES);
});

test('compat/qemu-img refuses a snapshot L1 table QEMU will not load, in its words per command', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 't.qcow2');
  // The first snapshot table entry starts with the L1 offset (8 bytes), then its size (4).
  const broken: [string, (entry: number) => Poke[]][] = [
    ['misaligned', (entry) => [[entry, '0000000000400200']]],
    ['too large', (entry) => [[entry + 8, '10000000']]],
  ];
  for (const [what, pokes] of broken) {
    for (const args of [['amend', '-o', 'compat=0.10'], ['snapshot', '-a', 'snap'], ['snapshot', '-d', 'snap'], ['convert', '-l', 'snap', '-O', 'raw']]) {
      const results = [];
      for (const prog of [COMPAT_QEMU_IMG, 'qemu-img']) {
        await qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']);
        await run('qemu-io', ['-c', 'write 0 512', img]);
        await qemuImg(['snapshot', '-c', 'snap', img]);
        const head = Buffer.alloc(72);
        const fh = await open(img, 'r');
        await fh.read(head, 0, 72, 0);
        await fh.close();
        await poke(img, pokes(Number(head.readBigUInt64BE(64))));
        const r = await run(prog, [...args, img, ...(args[0] === 'convert' ? [join(dir, 'out.raw')] : [])]);
        results.push({ code: r.code, stderr: r.stderr });
      }
      assert.deepEqual(results[0], results[1], `${what}: ${args.join(' ')}`);
    }
  }
});

// qcow (version 1): backing_file_offset at byte 8, backing_file_size at 16, size at 24,
// cluster_bits at 32, l2_bits at 33.
const QCOW1_CASES: [string, Poke[]][] = [
  ['cluster bits far out of range', [[32, 'ff']]],
  ['cluster bits just past 64k', [[32, '11']]],
  ['cluster bits below 512', [[32, '08']]],
  ['L2 bits far out of range', [[33, 'ff']]],
  ['L2 bits below 512 bytes of table', [[33, '05']]],
  ['L2 bits past 64k of table', [[33, '0e']]],
  ['a size no L1 table can cover', [[24, '7fffffffffffffff']]],
  ['a huge backing file name', [[8, '0000000000000100'], [16, 'ffffffff']]],
];

test('compat/qemu-io and compat/qemu-img refuse hostile qcow headers in QEMU words', needs('qemu-img', 'qemu-io'), async (t) => {
  await refusesLikeQemu(await scratch(t), 'qcow', QCOW1_CASES);
});
