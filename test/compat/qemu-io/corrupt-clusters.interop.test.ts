/**
 * Corrupt metadata met while an image is in use, through the drop-in qemu-io and qemu-img against
 * QEMU's own (the cases of iotest 060, and neighbours of them): images are broken by poking bytes
 * into them, then each program runs the same commands on its own copy. What the programs print
 * (the "Marking image as corrupt" and "Image is corrupt" lines included), their exit statuses, the
 * corrupt bit they leave and what `qemu-img check` then finds must all be the same.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { open, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';
import { firstL2Offset, headerOf } from '../../support/qcow2-edit.js';
import type { Qcow2Header } from '#src/formats/qcow2/header.js';

const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));
const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

/** Where a poke goes: the image's own structures, found from its header. */
interface Layout {
  header: Qcow2Header;
  /** The first L1 entry's L2 table. */
  l2: number;
  /** The first refcount block. */
  refblock: number;
}

interface Case {
  label: string;
  /** qemu-img create options beyond the size (64M). */
  create?: string[];
  /** qemu-io commands run by QEMU's qemu-io before the poke. */
  setup?: string[];
  /** [offset, bytes] to write, from the layout. */
  poke: (l: Layout) => Array<[number, number[]]>;
  /** The commands each side runs: [program, arguments]; 'io' and 'img' are that side's own. */
  steps: Array<['io' | 'img' | 'qemu-img', string[]]>;
  /**
   * The file's size is left out of the comparison: QEMU's shrink makes an L2 table for the range it
   * discards when the image has none there (its discard allocates missing tables), ours does not,
   * so the files differ by that cluster (a difference of every shrink, not of these cases).
   */
  shrinks?: boolean;
}

const be64 = (v: bigint): number[] => Array.from({ length: 8 }, (_, i) => Number((v >> BigInt(56 - 8 * i)) & 0xffn));

const CASES: Case[] = [
  {
    label: 'a read of a data cluster at an unaligned offset marks the image',
    setup: ['write 0 64k'],
    poke: (l) => [[l.l2, be64(0x8000000000052a00n)]],
    steps: [['io', ['-c', 'read 0 64k', '-c', 'read 0 64k']]],
  },
  {
    label: 'read-only, the event is told once and the image is left alone',
    setup: ['write 0 128k'],
    poke: (l) => [[l.l2 + 8, be64(0x8000000000062a00n)]],
    steps: [['io', ['-r', '-c', 'read 64k 64k', '-c', 'read 64k 64k', '-c', 'read 0 64k']]],
  },
  {
    label: 'a discard of an unaligned cluster leaks it (non-fatal) and goes on; a read of another then marks the image',
    setup: ['write 0 128k'],
    poke: (l) => [
      [l.l2, be64(0x8000000000052a00n)],
      [l.l2 + 8, be64(0x8000000000062a00n)],
    ],
    steps: [['io', ['-c', 'discard 0 64k', '-c', 'read 64k 64k']]],
  },
  {
    label: 'a zero write with unmap frees like a discard',
    setup: ['write 0 64k'],
    poke: (l) => [[l.l2, be64(0x8000000000052a00n)]],
    steps: [['io', ['-c', 'write -z -u 0 64k', '-c', 'read -P 0 0 64k']]],
  },
  {
    label: 'a write into a preallocated zero cluster at an unaligned offset',
    setup: ['write 0 64k', 'discard 0 64k'],
    poke: (l) => [[l.l2, be64(0x8000000000002a01n)]],
    steps: [['io', ['-c', 'write 0 64k']]],
  },
  {
    label: 'a write into a data cluster at an unaligned offset',
    setup: ['write 0 128k'],
    poke: (l) => [[l.l2 + 8, be64(0x8000000000062a00n)]],
    steps: [['io', ['-c', 'write 64k 4k', '-c', 'read 0 4k']]],
  },
  {
    label: 'amend to compat=0.10 over an unaligned L2 table',
    setup: ['write 0 64k'],
    poke: (l) => [[l.header.l1TableOffset, be64(0x8000000000042a00n)]],
    steps: [['img', ['amend', '-o', 'compat=0.10', 'a.qcow2']]],
  },
  {
    label: 'amend to compat=0.10 over an unaligned preallocated zero cluster',
    setup: ['write 0 128k'],
    poke: (l) => [[l.l2 + 8, be64(0x8000000000062a01n)]],
    steps: [['img', ['amend', '-o', 'compat=0.10', 'a.qcow2']]],
  },
  {
    label: 'a missing refcount block for a new allocation is refused where it would overlap the refcount table',
    poke: (l) => [[l.header.refcountTableOffset, be64(0n)]],
    steps: [['io', ['-c', 'write 0 64k']]],
  },
  {
    label: 'a write continuing an in-place cluster allocates right after it, and a refcount block at offset 0 is refused',
    setup: ['write 0 64k'],
    poke: (l) => [[l.header.refcountTableOffset, be64(0n)]],
    steps: [['io', ['-c', 'write 0 128k']]],
  },
  {
    label: 'a refcount table at offset 0 (the header read as one)',
    poke: () => [[48, be64(0n)]],
    steps: [['io', ['-c', 'write 0 64k']]],
  },
  {
    label: 'an image without a refcount table does not open',
    poke: () => [[56, [0, 0, 0, 0]]],
    steps: [
      ['io', ['-c', 'read 0 512']],
      ['img', ['info', 'a.qcow2']],
    ],
  },
  {
    label: 'a discard that cannot free: the event, the warning, then the partial tail finds the image given up',
    setup: ['write 0 128k'],
    poke: (l) => [[l.header.refcountTableOffset, be64(0x2a00n)]],
    // What `check -r all` then does differs on purpose: see the test at the end.
    steps: [['io', ['-c', 'discard 0 65537']]],
  },
  {
    label: 'a shrink that meets a refcount block no block covers fails before the size changes',
    shrinks: true,
    poke: (l) => [[l.header.refcountTableOffset + 8, be64(0x00ffffff00000000n)]],
    steps: [
      ['img', ['resize', '--shrink', 'a.qcow2', '32M']],
      ['qemu-img', ['info', 'a.qcow2']],
      ['img', ['check', '-r', 'all', 'a.qcow2']],
      ['img', ['resize', '--shrink', 'a.qcow2', '32M']],
    ],
  },
  {
    label: 'a shrink that meets an unaligned refcount block',
    shrinks: true,
    create: ['-o', 'refcount_bits=1'],
    poke: (l) => [[l.header.refcountTableOffset + 16, be64(0x200n)]],
    steps: [
      ['img', ['resize', '--shrink', 'a.qcow2', '32M']],
      ['qemu-img', ['info', 'a.qcow2']],
    ],
  },
];

async function layoutOf(fh: FileHandle): Promise<Layout> {
  const { header } = await headerOf(fh);
  const rb = new Uint8Array(8);
  await fh.read(rb, 0, 8, header.refcountTableOffset);
  return { header, l2: await firstL2Offset(fh), refblock: Number(new DataView(rb.buffer).getBigUint64(0)) };
}

/** One side's run of a case: what each step printed and returned, then what the image is left as. */
async function runCase(c: Case, dir: string, io: string, img: string): Promise<string> {
  const file = join(dir, 'a.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', ...(c.create ?? []), 'a.qcow2', '64M'], dir);
  if (c.setup) await qemuIo(['-f', 'qcow2', ...c.setup.flatMap((s) => ['-c', s]), 'a.qcow2'], dir);
  const fh = await open(file, 'r+');
  try {
    const pokes = c.poke(await layoutOf(fh));
    for (const [at, bytes] of pokes) await fh.write(new Uint8Array(bytes), 0, bytes.length, at);
  } finally {
    await fh.close();
  }
  const out: string[] = [];
  for (const [tool, args] of c.steps) {
    const prog = tool === 'io' ? io : tool === 'img' ? img : 'qemu-img';
    const r = await run(prog, tool === 'io' ? ['-f', 'qcow2', ...args, 'a.qcow2'] : args, { cwd: dir });
    out.push(`$ ${tool} ${args.join(' ')} -> ${r.code}\n${r.stdout.replace(/^\d.*ops\/sec\)\n/gm, '')}${r.stderr}`);
  }
  const info = await run('qemu-img', ['info', '-U', 'a.qcow2'], { cwd: dir });
  const check = await run('qemu-img', ['check', '-U', 'a.qcow2'], { cwd: dir });
  out.push(`corrupt: ${/corrupt: true/.test(info.stdout)}`, `check -> ${check.code}\n${check.stdout}${check.stderr}`);
  const text = out.join('\n');
  return c.shrinks ? text.replace(/^(disk size|Image end offset): .*\n/gm, '') : text;
}

test('corrupt metadata met in use: the same events, failures and leftovers as QEMU (iotest 060)', needs('qemu-img', 'qemu-io'), async (t) => {
  for (const c of CASES) {
    await t.test(c.label, async () => {
      const dir = await scratch(t);
      const want = await runCase(c, dir, 'qemu-io', 'qemu-img');
      const got = await runCase(c, dir, COMPAT_IO, COMPAT_IMG);
      assert.equal(got, want);
    });
  }
});

/**
 * Where qcow repairs on purpose and QEMU does not (docs/compatibility.md): a repair that meets a
 * refcount block at an unaligned offset. QEMU's check, with the image open read-write, marks the
 * image corrupt there and fails the repair part way ("No medium found"), leaving the old
 * structure's clusters leaked and the corrupt bit for a second `check -r all`; a dirty image whose
 * repair at open meets such a block does not open. Ours rebuilds the refcounts in one pass: the
 * image is clean for qemu-img's check, not marked, and reads as before.
 */
test('a repair that meets an unaligned refcount block rebuilds the refcounts in one pass (QEMU fails it)', needs('qemu-img', 'qemu-io'), async (t) => {
  const cases: Array<{ what: string; dirty: boolean; repair: (dir: string) => Promise<{ code: number | null; stderr: string }> }> = [
    { what: 'check -r all', dirty: false, repair: (dir) => run(COMPAT_IMG, ['check', '-q', '-r', 'all', 'a.qcow2'], { cwd: dir }) },
    { what: 'the repair of a dirty image at open', dirty: true, repair: (dir) => run(COMPAT_IO, ['-f', 'qcow2', '-c', 'close', 'a.qcow2'], { cwd: dir }) },
  ];
  for (const c of cases) {
    await t.test(c.what, async () => {
      const dir = await scratch(t);
      await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '64M'], dir);
      await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x5c 0 128k', 'a.qcow2'], dir);
      const fh = await open(join(dir, 'a.qcow2'), 'r+');
      try {
        const l = await layoutOf(fh);
        await fh.write(new Uint8Array(be64(BigInt(l.refblock + 0x200))), 0, 8, l.header.refcountTableOffset);
        if (c.dirty) await fh.write(new Uint8Array(be64(1n)), 0, 8, 72);
      } finally {
        await fh.close();
      }
      const r = await c.repair(dir);
      assert.equal(r.code, 0, r.stderr);
      const check = await run('qemu-img', ['check', 'a.qcow2'], { cwd: dir });
      assert.equal(check.code, 0, check.stdout + check.stderr);
      const info = await run('qemu-img', ['info', 'a.qcow2'], { cwd: dir });
      assert.match(info.stdout, /corrupt: false/);
      await qemuIo(['-f', 'qcow2', '-c', 'read -P 0x5c 0 128k', '-c', 'read -P 0 128k 64k', 'a.qcow2'], dir);
    });
  }
});
