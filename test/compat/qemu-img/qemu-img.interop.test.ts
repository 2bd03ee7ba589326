/**
 * compat/qemu-img against the real qemu-img: the same command lines give the same standard
 * output, standard error (with the program name and paths as each prints them) and exit code.
 * QEMU's own iotests (test/iotests/run.sh) cover far more; these are the lines people's scripts
 * parse most often, kept in the suite so a change to them fails at once.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { markCorrupt, needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const LAUNCHER = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('compat/qemu-img prints what qemu-img prints', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '8M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 1M', '-c', 'write -z 2M 64k', base]);
  // A file name with a colon, given through the file: protocol (QEMU shows it as ./NAME).
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'file:image:top.qcow2'], dir);
  const v1 = join(dir, 'v1.qcow');
  await qemuImg(['create', '-q', '-f', 'qcow', v1, '1M']);
  // Marked corrupt: read-only commands work, writing ones are refused at open.
  const corrupt = join(dir, 'corrupt.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', corrupt, '1M']);
  await markCorrupt(corrupt);
  // Compressed clusters have no host offset the human map could print.
  await qemuImg(['convert', '-c', '-O', 'qcow2', base, join(dir, 'packed.qcow2')]);
  // Metadata preallocation: data mapped everywhere, holes in the file left out of the human map.
  const prealloc = join(dir, 'prealloc.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=1M', prealloc, '64M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 3 5M 2M', prealloc]);
  const cases: string[][] = [
    ['info', corrupt],
    ['resize', corrupt, '2M'],
    ['snapshot', '-c', 's1', corrupt],
    ['map', join(dir, 'packed.qcow2')],
    ['map', prealloc],
    ['map', '--output=json', prealloc],
    ['info', 'file:image:top.qcow2'],
    ['check', v1],
    ['check', '-f', 'qcow2', v1],
    ['create', '-f', 'qcow2', join(dir, 'new.qcow2'), '1G'],
    ['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', join(dir, 'top.qcow2')],
    ['create', '-f', 'raw', join(dir, 'new.raw'), '1M'],
    ['info', base],
    ['info', '--output=json', base],
    ['map', '--output=json', base],
    ['map', base],
    ['check', base],
    ['check', '--output=json', base],
    ['map', '--output=svg', base],
    ['info', join(dir, 'missing.qcow2')],
    ['frobnicate', base],
    ['resize', base, '+1M'],
    ['compare', base, base],
    ['compare', join(dir, 'missing.qcow2'), base],
    ['amend', '-f', 'raw', '-o', 'size=2M', join(dir, 'new.raw')],
    ['resize', base, '2M'],
    ['snapshot', '-a', 'nope', base],
    ['snapshot', '-d', 'nope', base],
  ];
  for (const args of cases) {
    const ours = await run(LAUNCHER, args, { cwd: dir });
    // The reference runs on a fresh copy of whatever the command creates.
    const created = args[0] === 'create' ? args.find((a) => a.startsWith(dir) && a !== base) : undefined;
    if (created) await run('rm', ['-f', created]);
    const theirs = await run('qemu-img', args, { cwd: dir });
    assert.deepEqual({ code: ours.code, stdout: ours.stdout, stderr: ours.stderr }, { code: theirs.code, stdout: theirs.stdout, stderr: theirs.stderr }, args.join(' '));
  }
});

test('compat/qemu-img bitmap: the same actions in order, the same messages, the same image afterwards', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const steps: string[][] = [
    ['--add'],
    ['--add', '-g', '128k', '--disable'],
    ['--add', '--merge', 'b0'],
    ['--clear', '--enable'],
    ['--remove'],
    [],
    ['--remove'],
    ['--add', '-g', '1k'],
  ];
  const names = ['b0', 'b1', 'b2', 'b1', 'b0', 'b1', 'gone', 'b3'];
  const info = async (img: string) => JSON.parse((await qemuImg(['info', '--output=json', img])).stdout)['format-specific'];
  const results: Record<string, unknown[]> = {};
  for (const [who, prog] of [['qemu', 'qemu-img'], ['ours', LAUNCHER]] as const) {
    const img = join(dir, `${who}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']);
    results[who] = [];
    for (let i = 0; i < steps.length; i++) {
      const r = await run(prog, ['bitmap', ...steps[i]!, img, names[i]!], { cwd: dir });
      results[who]!.push({ code: r.code, stdout: r.stdout, stderr: r.stderr.replaceAll(`${who}.qcow2`, 'IMG') });
    }
    results[who]!.push(await info(img));
    // Each program's own info, as text: bitmaps with empty and non-empty flag lists.
    const text = await run(prog, ['info', '--output=json', img], { cwd: dir });
    results[who]!.push(text.stdout.replaceAll(`${who}.qcow2`, 'IMG').replace(/\n *"actual-size": \d+,/, ''));
  }
  assert.deepEqual(results.ours, results.qemu);
});
