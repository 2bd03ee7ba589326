/**
 * Persistent bitmaps through the other qemu-img commands (snapshot, resize, amend, commit, rebase,
 * convert), as QEMU 7.2 treats them: each scenario runs the same steps once with the real qemu-img
 * and once with ours (compat/qemu-img, which runs the qcow commands), each in its own directory
 * on identical images, and compares exit codes and messages step by step, then the resulting
 * bitmaps (`qemu-img info`: names, granularity, flags), their contents (`qemu-nbd -B` mapped with
 * `nbdinfo --map`) and `qemu-img check` on every image. The one place we differ on purpose, the
 * downgrade to compat=0.10, is tested in amend.test.ts.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, open, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openImage } from '#src/node.js';
import type { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { QCOW_BIN, needs, qemuImg, qemuIo, run, runOk, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

/** A step: `img ARGS` runs the qemu-img under test; `io ARGS` runs the real qemu-io on both sides. */
type Step = ['img' | 'io', ...string[]];

interface Scenario {
  name: string;
  /** Made with the real tools, the same in both directories. */
  setup: (dir: string) => Promise<void>;
  steps: Step[];
  /** The images whose bitmaps, contents and check are compared at the end. */
  images: string[];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `file` with persistent bitmaps `[name, ...qemu-img bitmap --add options]` and qemu-io commands. */
async function image(dir: string, file: string, size: string, bitmaps: string[][], writes: string[] = [], createOpts: string[] = []): Promise<void> {
  const f = join(dir, file);
  await qemuImg(['create', '-q', '-f', 'qcow2', ...createOpts, f, size]);
  for (const [name, ...opts] of bitmaps) await qemuImg(['bitmap', '--add', ...opts, f, name!]);
  if (writes.length > 0) await qemuIo(writes.flatMap((w) => ['-c', w]).concat([f]));
}

/** Flag the first bitmap in_use, as a crash of its writer leaves it. */
async function markFirstInUse(file: string): Promise<void> {
  const dev = (await openImage(file, { readOnly: true })) as Qcow2Device;
  const at = dev.header.bitmaps!.directoryOffset + 12;
  await dev.close();
  const fh = await open(file, 'r+');
  try {
    const b = Buffer.alloc(4);
    await fh.read(b, 0, 4, at);
    b.writeUInt32BE(b.readUInt32BE(0) | 1, 0);
    await fh.write(b, 0, 4, at);
  } finally {
    await fh.close();
  }
}

interface Bitmap {
  name: string;
  flags: string[];
  granularity: number;
}

async function bitmapsOf(file: string): Promise<Bitmap[]> {
  const info = JSON.parse((await qemuImg(['info', '--output=json', '-f', 'qcow2', file])).stdout);
  return (info['format-specific']?.data?.bitmaps ?? []) as Bitmap[];
}

/** Every extent of bitmap `name`, dirty or clean, as QEMU exports it. */
async function qemuMap(t: TestContext, file: string, name: string): Promise<string> {
  const sock = `${file}-${Math.random().toString(36).slice(2)}.sock`;
  const pidFile = `${sock}.pid`;
  const child = spawn('qemu-nbd', ['-r', '-B', name, '-f', 'qcow2', '-k', sock, '--pid-file', pidFile, file], { stdio: 'ignore' });
  t.after(() => void child.kill('SIGTERM'));
  for (let i = 0; i < 400 && !(await stat(pidFile).catch(() => undefined)); i++) await sleep(25);
  try {
    return (await runOk('nbdinfo', [`--map=qemu:dirty-bitmap:${name}`, `nbd+unix:///?socket=${sock}`])).stdout;
  } finally {
    child.kill('SIGTERM');
  }
}

/** What the scenario leaves: per step its exit code and messages, then each image's state. */
async function play(t: TestContext, dir: string, tool: string, s: Scenario): Promise<{ steps: string[]; images: Map<string, { bitmaps: Bitmap[]; maps: string[] }> }> {
  await mkdir(dir, { recursive: true });
  await s.setup(dir);
  const steps: string[] = [];
  for (const [kind, ...args] of s.steps) {
    if (kind === 'io') {
      await runOk('qemu-io', args, { cwd: dir });
      continue;
    }
    const r = await run(tool, args, { cwd: dir });
    steps.push(`${args.join(' ')} -> ${r.code}\n${r.stdout}${r.stderr}`);
  }
  const images = new Map<string, { bitmaps: Bitmap[]; maps: string[] }>();
  for (const name of s.images) {
    const file = join(dir, name);
    const check = await run('qemu-img', ['check', '-f', 'qcow2', file]);
    assert.equal(check.code, 0, `${s.name}: ${tool}: check ${name}\n${check.stdout}${check.stderr}`);
    const bitmaps = await bitmapsOf(file);
    const maps: string[] = [];
    for (const b of bitmaps) if (!b.flags.includes('in-use')) maps.push(`${b.name}:\n${await qemuMap(t, file, b.name)}`);
    images.set(name, { bitmaps, maps });
  }
  return { steps, images };
}

const SCENARIOS: Scenario[] = [
  {
    name: 'snapshot: create and delete keep the bitmaps; apply is refused while any bitmap exists',
    setup: async (d) => {
      await image(d, 'a.qcow2', '4M', [['b1']], ['write 0 64k']);
      await image(d, 'off.qcow2', '4M', [['b1', '--disable']], ['write 0 64k']);
    },
    steps: [
      ['img', 'snapshot', '-c', 's1', 'a.qcow2'],
      ['io', '-c', 'write 1M 64k', 'a.qcow2'],
      ['img', 'snapshot', '-a', 's1', 'a.qcow2'],
      ['img', 'snapshot', '-d', 's1', 'a.qcow2'],
      // A disabled bitmap blocks a revert all the same (QEMU counts every loaded bitmap).
      ['img', 'snapshot', '-c', 's1', 'off.qcow2'],
      ['img', 'snapshot', '-a', 's1', 'off.qcow2'],
      // Checked before the snapshot is looked up.
      ['img', 'snapshot', '-a', 'nosuch', 'off.qcow2'],
    ],
    images: ['a.qcow2', 'off.qcow2'],
  },
  {
    name: 'resize: bitmaps grow clean, shrink with the disk, and keep a partial last granule',
    setup: async (d) => {
      await image(d, 'r.qcow2', '4M', [['b1'], ['b2', '-g', '512k', '--disable']], ['write 3M 1M']);
      await qemuImg(['bitmap', '--merge', 'b1', join(d, 'r.qcow2'), 'b2']);
    },
    steps: [
      ['img', 'resize', 'r.qcow2', '8M'],
      ['io', '-c', 'write 7M 64k', 'r.qcow2'],
      ['img', 'resize', '--shrink', 'r.qcow2', '3500K'],
      ['img', 'resize', 'r.qcow2', '4M'],
    ],
    images: ['r.qcow2'],
  },
  {
    name: 'resize, snapshot, amend and convert --bitmaps with an inconsistent (in use) bitmap',
    setup: async (d) => {
      await image(d, 'i.qcow2', '4M', [['b1'], ['ok', '--disable']], ['write 0 64k']);
      await markFirstInUse(join(d, 'i.qcow2'));
    },
    steps: [
      ['img', 'resize', 'i.qcow2', '8M'],
      ['img', 'resize', '--shrink', 'i.qcow2', '2M'],
      ['img', 'snapshot', '-c', 's1', 'i.qcow2'],
      ['img', 'amend', '-o', 'refcount_bits=64', 'i.qcow2'],
      ['img', 'convert', '--bitmaps', '-O', 'qcow2', 'i.qcow2', 'x.qcow2'],
      ['img', 'convert', '--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', 'i.qcow2', 'y.qcow2'],
    ],
    images: ['i.qcow2', 'y.qcow2'],
  },
  {
    name: 'amend refcount_bits and size: the bitmaps are carried, and resized with the disk',
    setup: (d) => image(d, 'm.qcow2', '4M', [['b1'], ['b2', '-g', '128k', '--disable']], ['write 64k 64k']),
    steps: [
      ['img', 'amend', '-o', 'refcount_bits=8', 'm.qcow2'],
      ['io', '-c', 'write 2M 64k', 'm.qcow2'],
      ['img', 'amend', '-o', 'refcount_bits=64', 'm.qcow2'],
      // amend's size= resizes as resize does, shrinking included.
      ['img', 'amend', '-o', 'size=8M', 'm.qcow2'],
      ['img', 'amend', '-o', 'size=1500K', 'm.qcow2'],
    ],
    images: ['m.qcow2'],
  },
  {
    name: "commit: the base's enabled bitmaps record the committed ranges; the overlay's stay as they were",
    setup: async (d) => {
      await image(d, 'base.qcow2', '4M', [['bb'], ['off', '--disable']], ['write 0 64k']);
      await image(d, 'top.qcow2', '4M', [], [], ['-b', 'base.qcow2', '-F', 'qcow2']);
      await qemuImg(['bitmap', '--add', join(d, 'top.qcow2'), 'bo']);
      await qemuIo(['-c', 'write 2M 64k', '-c', 'write -z 3M 128k', join(d, 'top.qcow2')]);
      await image(d, 'base2.qcow2', '4M', [['be']]);
      await image(d, 'top2.qcow2', '4M', [], ['write 1M 128k'], ['-b', 'base2.qcow2', '-F', 'qcow2']);
    },
    steps: [
      ['img', 'commit', 'top.qcow2'],
      ['img', 'commit', '-d', 'top2.qcow2'],
    ],
    images: ['base.qcow2', 'top.qcow2', 'base2.qcow2', 'top2.qcow2'],
  },
  {
    name: "rebase: a safe rebase's writes are recorded in the overlay's bitmaps; an unsafe one changes nothing",
    setup: async (d) => {
      await image(d, 'b0.qcow2', '4M', [], ['write -P 1 0 1M']);
      await image(d, 'b1.qcow2', '4M', [], ['write -P 2 0 64k']);
      await image(d, 'o.qcow2', '4M', [], [], ['-b', 'b0.qcow2', '-F', 'qcow2']);
      await qemuImg(['bitmap', '--add', join(d, 'o.qcow2'), 'bo']);
      await qemuImg(['bitmap', '--add', '--disable', join(d, 'o.qcow2'), 'off']);
    },
    steps: [
      ['img', 'rebase', '-b', 'b1.qcow2', '-F', 'qcow2', 'o.qcow2'],
      ['img', 'rebase', '-u', '-b', 'b0.qcow2', '-F', 'qcow2', 'o.qcow2'],
      ['img', 'rebase', '-b', '', 'o.qcow2'],
    ],
    images: ['o.qcow2'],
  },
  {
    name: 'convert: bitmaps dropped without --bitmaps, copied with it, refused where the target cannot hold them',
    setup: async (d) => {
      await image(d, 'c.qcow2', '4M', [['b1'], ['b2', '-g', '128k', '--disable']], ['write 512k 64k']);
      await qemuImg(['bitmap', '--merge', 'b1', join(d, 'c.qcow2'), 'b2']);
    },
    steps: [
      ['img', 'convert', '-O', 'qcow2', 'c.qcow2', 'plain.qcow2'],
      ['img', 'convert', '--bitmaps', '-O', 'qcow2', 'c.qcow2', 'copy.qcow2'],
      ['img', 'convert', '--bitmaps', '-O', 'raw', 'c.qcow2', 'x.raw'],
      ['img', 'convert', '--bitmaps', '-O', 'qcow2', '-o', 'compat=0.10', 'c.qcow2', 'v2.qcow2'],
    ],
    images: ['plain.qcow2', 'copy.qcow2'],
  },
];

for (const s of SCENARIOS) {
  test(`bitmaps vs qemu-img: ${s.name}`, needs('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo'), async (t) => {
    const dir = await scratch(t);
    const theirs = await play(t, join(dir, 'qemu'), 'qemu-img', s).catch((e: unknown) => {
      throw new Error(`QEMU itself: ${(e as Error).message}`);
    });
    const ours = await play(t, join(dir, 'ours'), COMPAT_QEMU_IMG, s);
    assert.deepEqual(ours.steps, theirs.steps);
    assert.deepEqual(ours.images, theirs.images);
  });
}

test("qcow's own commands refuse the same steps in one line of their own words, and change nothing", needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await image(dir, 'a.qcow2', '4M', [['b1'], ['b2', '--disable']], ['write 0 64k']);
  await qemuImg(['snapshot', '-c', 's1', join(dir, 'a.qcow2')]);
  await markFirstInUse(join(dir, 'a.qcow2'));
  // The allocation may change (a writable open stores the disabled bitmap again at close, as
  // QEMU's refused resize does too): what the image says must not.
  const infoNow = async () => (await qemuImg(['info', '--output=json', 'a.qcow2'], dir)).stdout.replace(/\n\s*"actual-size": \d+,/, '');
  const before = await infoNow();
  const refusals: Array<[string[], RegExp]> = [
    [['snapshot', '-a', 's1', 'a.qcow2'], /^qcow: .*Could not apply snapshot 's1': the image has persistent dirty bitmaps \('b1', 'b2'\); remove them first$/],
    [['resize', 'a.qcow2', '8M'], /^qcow: .*Bitmap 'b1' is inconsistent and cannot be used: cannot resize the image \(remove the bitmap first\)$/],
    [['convert', '--bitmaps', '-O', 'qcow2', 'a.qcow2', 'x.qcow2'], /^qcow: a\.qcow2: Cannot copy inconsistent bitmap 'b1'\. Try --skip-broken-bitmaps/],
  ];
  for (const [args, message] of refusals) {
    const r = await run(QCOW_BIN, args, { cwd: dir });
    assert.equal(r.code, 1, `${args.join(' ')}: ${r.stderr}`);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr.trim(), message);
  }
  assert.equal(await infoNow(), before);
});
