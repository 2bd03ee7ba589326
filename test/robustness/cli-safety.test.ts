/**
 * The two safety rules for untrusted images, through the command line:
 *  --confine           backing and data files outside the folder of the image naming them are refused;
 *  --no-probe-backing  a backing file whose format the image does not record is opened as raw, so a
 *                      guest that wrote an image header into its raw disk cannot make us open a file
 *                      that header names (by default we probe, as QEMU does: qcow v1 chains need it).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { needs, qcow, qcowOk, qemuImg, randomBytes, scratch } from '../support/qemu.js';

/** Every command that opens an image and follows its backing chain, with arguments to run it on `img`. */
function chainCommands(img: string, dir: string): [string, string[]][] {
  return [
    ['info', ['info', '--backing-chain', img]],
    ['map', ['map', img]],
    ['convert', ['convert', '-O', 'raw', img, join(dir, 'out.raw')]],
    ['compare', ['compare', img, img]],
    ['io', ['io', '-r', '-c', 'read 0 4k', img]],
    ['measure', ['measure', '-O', 'qcow2', img]],
    ['bench', ['bench', '-c', '16', img]],
  ];
}

test('--confine: a backing file outside the image folder is refused by every command; without it QEMU\'s rule applies', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await mkdir(join(dir, 'inner'));
  const outside = join(dir, 'outside.raw');
  await writeFile(outside, randomBytes(1 << 20, 7));
  const byDotDot = join(dir, 'inner', 'dotdot.qcow2');
  const byAbsolute = join(dir, 'inner', 'absolute.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', '../outside.raw', '-F', 'raw', byDotDot]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', outside, '-F', 'raw', byAbsolute]);
  for (const img of [byDotDot, byAbsolute]) {
    const before = await readFile(img);
    for (const [name, args] of chainCommands(img, dir)) {
      const r = await qcow([...args.slice(0, 1), '--confine', ...args.slice(1)]);
      assert.notEqual(r.code, 0, `${name} --confine must refuse ${img}`);
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, `${name}: one line: ${r.stderr}`);
      assert.match(lines[0]!, /^qcow: .*outside the image's folder/, name);
      // Followed without --confine, as QEMU follows it.
      const ok = await qcow(args);
      assert.equal(ok.code, 0, `${name} without --confine: ${ok.stderr}`);
    }
    assert.deepEqual(await readFile(img), before, 'the image is unchanged');
  }
  // Commands that write refuse before writing anything.
  for (const args of [['commit'], ['rebase', '-b', '', '-F', 'raw']]) {
    const before = await readFile(byAbsolute);
    const r = await qcow([args[0]!, '--confine', ...args.slice(1), byAbsolute]);
    assert.notEqual(r.code, 0, `${args[0]} --confine must refuse`);
    assert.match(r.stderr, /^qcow: .*outside the image's folder\n$/, args[0]);
    assert.deepEqual(await readFile(byAbsolute), before, `${args[0]}: the image is unchanged`);
  }
  // What lies inside the folder is still followed with --confine, also through "..".
  const base = join(dir, 'inner', 'base.raw');
  await writeFile(base, randomBytes(1 << 20, 8));
  const inside = join(dir, 'inner', 'inside.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', '../inner/base.raw', '-F', 'raw', inside]);
  await qcowOk(['convert', '--confine', '-O', 'raw', inside, join(dir, 'in.raw')]);
  assert.deepEqual(await readFile(join(dir, 'in.raw')), await readFile(base));
});

test('--confine also refuses an external data file outside the folder', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await mkdir(join(dir, 'inner'));
  const img = join(dir, 'inner', 'ext.qcow2');
  // The image names its data file by an absolute path in the folder above its own.
  await writeFile(join(dir, 'data.raw'), new Uint8Array(1 << 20));
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, 'data.raw')}`, img, '1M']);
  const r = await qcow(['convert', '--confine', '-O', 'raw', img, join(dir, 'out.raw')]);
  assert.notEqual(r.code, 0);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /^qcow: .*outside the image's folder/);
  await qcowOk(['convert', '-O', 'raw', img, join(dir, 'out.raw')]);
});

test('--no-probe-backing: a raw backing file holding a qcow2 header is read as raw, not followed to the file it names', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  // A "guest" wrote a qcow2 header into its raw disk; the header names /etc/hostname as backing file.
  const evil = join(dir, 'disk.raw');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/hostname', '-F', 'raw', evil, '64k']);
  const evilBytes = await readFile(evil);
  // qcow v1 records no backing format: QEMU (and we, by default) probe the backing file.
  const top = join(dir, 'top.qcow');
  await qemuImg(['create', '-q', '-f', 'qcow', '-b', 'disk.raw', '-F', 'raw', top, '64k']);
  const hostname = await readFile('/etc/hostname').catch(() => undefined);

  // Default (probing): the backing file is taken for qcow2 and the chain reaches /etc/hostname.
  const probed = await qcowOk(['info', '--backing-chain', '--output=json', top]);
  const chain = JSON.parse(probed.stdout) as { filename: string; format: string }[];
  assert.deepEqual(chain.map((c) => c.format), ['qcow', 'qcow2', 'raw']);
  assert.equal(chain[2]!.filename, '/etc/hostname');
  if (hostname) {
    await qcowOk(['convert', '-O', 'raw', top, join(dir, 'probed.raw')]);
    const out = await readFile(join(dir, 'probed.raw'));
    assert.deepEqual(out.subarray(0, hostname.length), hostname, 'probing follows the header to /etc/hostname');
  }

  // --no-probe-backing: the backing file is raw, its guest sees the header bytes, nothing else is opened.
  const safe = await qcowOk(['info', '--no-probe-backing', '--backing-chain', '--output=json', top]);
  const safeChain = JSON.parse(safe.stdout) as { filename: string; format: string }[];
  assert.deepEqual(safeChain.map((c) => c.format), ['qcow', 'raw']);
  assert.ok(!safe.stdout.includes('/etc/hostname'));
  await qcowOk(['convert', '--no-probe-backing', '-O', 'raw', top, join(dir, 'safe.raw')]);
  const out = await readFile(join(dir, 'safe.raw'));
  assert.equal(out.length, 64 * 1024);
  assert.deepEqual(out, evilBytes.subarray(0, out.length), 'the guest sees the raw bytes it wrote');
  for (const [name, args] of [
    ['map', ['map', '--no-probe-backing', '--output=json', top]],
    ['compare', ['compare', '--no-probe-backing', '-F', 'raw', top, join(dir, 'safe.raw')]],
    ['io', ['io', '--no-probe-backing', '-r', '-c', 'read -P 0x51 0 1', top]],
  ] as [string, string[]][]) {
    const r = await qcow(args);
    assert.equal(r.code, 0, `${name}: ${r.stderr}${r.stdout}`);
    assert.ok(!r.stdout.includes('/etc/hostname'), name);
  }
});

test('a backing format recorded in the image is used as given, never probed, with or without --no-probe-backing', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const evil = join(dir, 'disk.raw');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/hostname', '-F', 'raw', evil, '64k']);
  const top = join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'disk.raw', '-F', 'raw', top, '64k']);
  for (const flags of [[], ['--no-probe-backing']]) {
    const r = await qcowOk(['info', ...flags, '--backing-chain', '--output=json', top]);
    assert.deepEqual((JSON.parse(r.stdout) as { format: string }[]).map((c) => c.format), ['qcow2', 'raw']);
  }
});
