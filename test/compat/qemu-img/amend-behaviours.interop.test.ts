/**
 * qemu-img amend (and the opens around it) through compat/qemu-img and compat/qemu-io, side by
 * side with QEMU's programs on copies of one image: the same output, exit status and bytes.
 *   - data_file= renames or drops the external data file name; data_file_raw=off clears the bit,
 *     =on is refused; info then shows the header (the data file is not opened), while map, check
 *     and qemu-io fail to open it, in QEMU's words; --image-opts data-file.filename= supplies it.
 *   - a v2 image with snapshots cannot be resized; a downgrade is refused when a snapshot has
 *     another size than the image (after the amend's own resize).
 *   - refusals after the open are not "Could not open" failures; QEMU's hint lines are lines.
 *   - an upgrade to v3 writes the feature-name table only where qemu-img does (clusters > 4 KiB).
 *   - a dirty lazy-refcounts image opened read-write by qemu-img prints its repair.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

type Step = ['img' | 'io', string[]];

/** Run `steps` in `dir` with one pair of programs; each step's exit status and output, joined. */
async function transcript(dir: string, img: string, io: string, steps: Step[]): Promise<string> {
  const out: string[] = [];
  for (const [which, args] of steps) {
    const r = await run(which === 'img' ? img : io, args, { cwd: dir });
    // Timings, rates, snapshot dates and disk usage differ from run to run.
    const text = (r.stdout + r.stderr)
      .replace(/\d+ ops; .*$/gm, 'OPS')
      .replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE')
      .replace(/^disk size: .*$/gm, 'disk size: N');
    out.push(`$ ${which} ${args.join(' ')}\n${text}rc=${r.code}`);
  }
  return out.join('\n');
}

/** `setup` makes the image in two folders; `steps` run in each, by QEMU's programs and by ours. */
async function sideBySide(t: Parameters<typeof scratch>[0], setup: (dir: string) => Promise<void>, steps: Step[]): Promise<{ dirs: [string, string] }> {
  const dirs: [string, string] = [await scratch(t), await scratch(t)];
  for (const d of dirs) await setup(d);
  const theirs = await transcript(dirs[0], 'qemu-img', 'qemu-io', steps);
  const ours = await transcript(dirs[1], COMPAT_QEMU_IMG, COMPAT_QEMU_IO, steps);
  assert.equal(ours, theirs);
  return { dirs };
}

const imageOpts = (data: string) => `driver=qcow2,data-file.filename=${data},file.filename=t.qcow2`;

test('amend data_file and data_file_raw, and opening an image whose data file is missing or unnamed', needs('qemu-img', 'qemu-io'), async (t) => {
  const { dirs } = await sideBySide(
    t,
    async (d) => {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'data_file=t.data,data_file_raw=on', 't.qcow2', '1M'], d);
      await qemuIo(['-c', 'write -P 7 0 64k', 't.qcow2'], d);
    },
    [
      ['img', ['amend', '-o', 'data_file=foo', 't.qcow2']],
      ['img', ['info', 't.qcow2']],
      ['img', ['info', '--output=json', 't.qcow2']],
      ['img', ['map', 't.qcow2']],
      ['img', ['check', 't.qcow2']],
      ['io', ['-c', 'read -P 7 0 64k', 't.qcow2']],
      ['io', ['-c', 'read -P 7 0 64k', '--image-opts', imageOpts('t.data')]],
      ['img', ['amend', '-o', 'data_file=', '--image-opts', imageOpts('t.data')]],
      ['img', ['info', 't.qcow2']],
      ['img', ['check', 't.qcow2']],
      ['io', ['-c', 'read 0 512', 't.qcow2']],
      ['img', ['amend', '-o', 'data_file_raw=off', '--image-opts', imageOpts('t.data')]],
      ['img', ['amend', '-o', 'data_file_raw=on', '--image-opts', imageOpts('t.data')]],
      ['img', ['amend', '-o', 'data_file=t.data', '--image-opts', imageOpts('t.data')]],
      ['img', ['info', 't.qcow2']],
      ['img', ['check', 't.qcow2']],
    ],
  );
  // And the headers those steps leave are the same bytes.
  assert.deepEqual(await readFile(join(dirs[1], 't.qcow2')), await readFile(join(dirs[0], 't.qcow2')));
});

test('resize and downgrade with internal snapshots, and refusals worded as qemu-img words them', needs('qemu-img', 'qemu-io'), async (t) => {
  await sideBySide(
    t,
    async (d) => {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 't.qcow2', '32M'], d);
      await qemuIo(['-c', 'write -P 0x2a 24M 64k', 't.qcow2'], d);
      await qemuImg(['snapshot', '-c', 'foo', 't.qcow2'], d);
    },
    [
      ['img', ['resize', 't.qcow2', '64M']],
      ['img', ['amend', '-o', 'compat=1.1,size=128M', 't.qcow2']],
      ['img', ['snapshot', '-c', 'bar', 't.qcow2']],
      ['img', ['resize', '--shrink', 't.qcow2', '64M']],
      ['img', ['amend', '-o', 'compat=0.10,size=32M', 't.qcow2']],
      ['img', ['info', 't.qcow2']],
      ['img', ['snapshot', '-d', 'bar', 't.qcow2']],
      ['img', ['amend', '-o', 'compat=0.10,size=32M', 't.qcow2']],
      ['img', ['amend', '-o', 'backing_file=x', 't.qcow2']],
      ['img', ['amend', '-o', 'cluster_size=4k', 't.qcow2']],
      ['img', ['amend', '-o', 'compat=1.1', 't.qcow2']],
      ['img', ['amend', '-o', 'data_file=x', 't.qcow2']],
      ['img', ['info', 't.qcow2']],
    ],
  );
});

test('amend to v3 writes the feature-name table as qemu-img does, with a refcount width change too', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  for (const cs of ['512', '4k', '8k']) {
    for (const o of ['compat=1.1', 'compat=1.1,refcount_bits=8']) {
      const [a, b] = [join(dir, 'a.qcow2'), join(dir, 'b.qcow2')];
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `compat=0.10,cluster_size=${cs}`, a, '64M']);
      await copyFile(a, b);
      await qemuImg(['amend', '-o', o, a]);
      const r = await run(COMPAT_QEMU_IMG, ['amend', '-o', o, b]);
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(await readFile(b), await readFile(a), `cluster_size=${cs} ${o}`);
    }
  }
});

test('qemu-img opening a dirty lazy-refcounts image read-write prints the repair, as qemu-img', needs('qemu-img', 'qemu-io'), async (t) => {
  await sideBySide(
    t,
    async (d) => {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=1.1,lazy_refcounts=on', 't.qcow2', '64M'], d);
      // qemu-io dies with the image dirty (its refcounts not written).
      await run('qemu-io', ['-c', 'write -P 0x2a 0 128k', '-c', 'flush', '-c', 'sigraise 9', 't.qcow2'], { cwd: d });
    },
    [
      ['img', ['amend', '-o', 'compat=0.10', 't.qcow2']],
      ['img', ['check', 't.qcow2']],
      ['io', ['-c', 'read -P 0x2a 0 128k', 't.qcow2']],
    ],
  );
});
