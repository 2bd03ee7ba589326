/**
 * compat/qemu-io's blkdebug node under a qcow2 image, against qemu-io: each case runs the same
 * commands on the same image through both programs and expects the same output (timings left
 * out), exit code and image afterwards. Rules come from a config file (`blkdebug:CONF:IMG`) or
 * from a json: name's options; the events are those qcow's qcow2 driver tells its file.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

/** qemu-io's output without its timing lines. */
const untimed = (s: string) => s.split('\n').filter((l) => !/ ops; /.test(l)).join('\n');

interface Case {
  /** The config file's text ('' for none). */
  config: string;
  /** What to open, given the image and the config file. */
  target: (img: string, conf: string) => string[];
  commands: string[] | ((img: string, conf: string) => string[]);
  /** qemu-img options of the image. */
  create?: string;
  /** Commands run on the plain image first (qemu-io's). */
  setup?: string[];
}

async function both(t: { after(fn: () => Promise<void>): void }, c: Case): Promise<void> {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', ...(c.create ? ['-o', c.create] : []), base, '16M']);
  if (c.setup) await run('qemu-io', [...c.setup.flatMap((x) => ['-c', x]), base]);
  const results = [];
  for (const [i, prog] of [COMPAT_QEMU_IO, 'qemu-io'].entries()) {
    const img = join(dir, `img${i}.qcow2`);
    const conf = join(dir, `blkdebug${i}.conf`);
    await copyFile(base, img);
    if (c.config) await writeFile(conf, c.config);
    const commands = typeof c.commands === 'function' ? c.commands(img, conf) : c.commands;
    // The iotests' cache mode (qemu-io's own default is writethrough).
    const r = await run(prog, ['-t', 'writeback', ...commands.flatMap((x) => ['-c', x]), ...c.target(img, conf)]);
    const check = await run('qemu-img', ['check', img]);
    results.push({ code: r.code, out: untimed(r.stdout).replaceAll(img, 'IMG'), err: r.stderr.replaceAll(img, 'IMG'), check: check.stdout.replaceAll(img, 'IMG') });
  }
  assert.deepEqual(results[0], results[1]);
  assert.equal((await run('qemu-img', ['compare', join(dir, 'img0.qcow2'), join(dir, 'img1.qcow2')])).code, 0);
}

const plain = (img: string, conf: string) => [`blkdebug:${conf}:${img}`];

test('blkdebug: an l2_load rule from a json: name fails the read that loads the table', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    config: '',
    setup: ['write -P 42 0x38000 512'],
    target: (img) => [`json:{"driver": "qcow2", "file": {"driver": "blkdebug", "inject-error": [{"event": "l2_load"}], "image.filename": "${img}"}}`],
    commands: ['read -P 42 0x38000 512'],
  });
});

test('blkdebug: read_aio with once=off fails every data read; reads of unallocated clusters go on', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    config: '[inject-error]\nevent = "read_aio"\nerrno = "5"\nonce ="off"\n',
    setup: ['write -P 7 0 64k'],
    target: plain,
    commands: ['read -P 0 1M 4k', 'read -P 7 0 4k', 'read -P 7 4k 4k', 'read -P 0 2M 4k'],
  });
});

test('blkdebug: once=on fails one request only, and errno picks the error', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    config: '[inject-error]\nevent = "read_aio"\nerrno = "28"\nonce = "on"\n',
    setup: ['write -P 7 0 64k'],
    target: plain,
    commands: ['read -P 7 0 4k', 'read -P 7 0 4k'],
  });
});

test('blkdebug: an l2_update rule leaves alone writes that change no L2 entry', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    config: '[inject-error]\nevent = "l2_update"\nerrno = "5"\nimmediately = "on"\nonce = "off"\n',
    setup: ['write -z 1M 2M'],
    target: plain,
    commands: ['write -z 1M 1M', 'write -z -u 2M 1M', 'write -z 1536k 64k'],
  });
});

test('blkdebug: caches that cannot be written back at close are told, as qemu-io tells them', needs('qemu-io', 'qemu-img'), async (t) => {
  for (const errno of ['5', '28']) {
    await both(t, {
      config: `[inject-error]\nevent = "l2_update"\nerrno = "${errno}"\nonce = "off"\n`,
      setup: ['write 0 512'],
      target: plain,
      commands: ['write -P 3 8M 64k'],
    });
  }
});

test('blkdebug: set-state moves the state, and a rule with a state acts only in it', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    config: '[set-state]\nevent = "l2_load"\nnew_state = "2"\n\n[inject-error]\nevent = "read_aio"\nstate = "2"\n',
    setup: ['write -P 9 0 64k'],
    target: plain,
    commands: ['read -P 9 0 512', 'read -P 9 512 512'],
  });
});

test('blkdebug: a rule on the open event (none) with a sector fails only requests covering it', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    // 64 KiB clusters: header, refcount table and block, L1, L2, then the first data cluster at 0x50000.
    config: '[inject-error]\nevent = "none"\nsector = "641"\niotype = "read"\n',
    setup: ['write -P 5 0 128k'],
    target: plain,
    commands: ['read -P 5 0 512', 'read -P 5 512 512', 'read -P 5 0 64k', 'read -P 5 64k 64k'],
  });
});

test('blkdebug: file.align larger than the cluster size keeps writes whole', needs('qemu-io', 'qemu-img'), async (t) => {
  await both(t, {
    config: '',
    create: 'cluster_size=2k',
    target: () => [],
    commands: (img) => [`open -o driver=qcow2,file.align=4k blkdebug::${img}`, 'write -P 1 0 512', 'write -P 2 3k 3k', 'read -P 1 0 512', 'read -P 0 512 2560', 'read -P 2 3k 3k'],
  });
});

test('blkdebug: a data file given as raw over blkdebug fails the data write; the image stays clean', needs('qemu-io', 'qemu-img'), async (t) => {
  const dir = await scratch(t);
  const outs = [];
  for (const [i, prog] of [COMPAT_QEMU_IO, 'qemu-io'].entries()) {
    const img = join(dir, `img${i}.qcow2`);
    const conf = join(dir, `blkdebug${i}.conf`);
    await writeFile(conf, '[inject-error]\nevent = "write_aio"\nerrno = "5"\nonce = "on"\n');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${img}.data`, img, '64k']);
    const json = `json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': '${img}'}, 'data-file': {'driver': 'raw', 'file': {'driver': 'blkdebug', 'config': '${conf}', 'image': {'driver': 'file', 'filename': '${img}.data'}}}}`;
    const r = await run(prog, ['-c', 'write 0 64k', '-c', 'write -P 1 0 64k', '-c', 'read -P 1 0 64k', json]);
    const check = await run('qemu-img', ['check', img]);
    outs.push({ code: r.code, out: untimed(r.stdout), err: r.stderr, check: check.stdout.replaceAll(img, 'IMG'), checkCode: check.code });
  }
  assert.deepEqual(outs[0], outs[1]);
});
