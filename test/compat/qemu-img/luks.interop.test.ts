/**
 * Encrypted images through compat/qemu-img and compat/qemu-io, against QEMU's own programs: the
 * luks format, per-layer key secrets of an encrypted chain, the key secret of a convert target,
 * and LUKS key slot management with amend.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));
const SECRETS = ['--object', 'secret,id=sec0,data=astrochicken', '--object', 'secret,id=sec1,data=furby', '--object', 'secret,id=sec2,data=platypus'];

async function ok(prog: string, args: string[]): Promise<string> {
  const r = await run(prog, args);
  assert.equal(r.code, 0, `${prog} ${args.join(' ')}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** qemu-io's output for one command on an --image-opts image (exit code ignored: qemu-io exits 0 on a failed open too). */
async function io(prog: string, opts: string, cmd: string): Promise<string> {
  const r = await run(prog, [...SECRETS, '--image-opts', opts, '-c', cmd]);
  return (r.stdout + r.stderr).replace(/\n[^\n]*ops\/sec\)/g, '');
}

test('luks format: qemu-img create -f luks makes a volume QEMU opens, and the reverse', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const [maker, user] of [
    [COMPAT_QEMU_IMG, 'qemu-io'],
    ['qemu-img', COMPAT_QEMU_IO],
  ] as const) {
    const file = join(dir, `${maker === 'qemu-img' ? 'qemu' : 'ours'}.luks`);
    const made = await ok(maker, ['create', '-f', 'luks', ...SECRETS, '-o', 'key-secret=sec0,iter-time=10', file, '1M']);
    assert.equal(made, `Formatting '${file}', fmt=luks size=1048576 key-secret=sec0 iter-time=10\n`);
    const opts = `driver=luks,key-secret=sec0,file.filename=${file}`;
    // Written by one side, read back by the other, unaligned on purpose.
    const writer = user === 'qemu-io' ? COMPAT_QEMU_IO : 'qemu-io';
    assert.match(await io(writer, opts, 'write -P 0x5a 100 3000'), /wrote 3000\/3000 bytes at offset 100/);
    assert.match(await io(user, opts, 'read -P 0x5a 100 3000'), /read 3000\/3000 bytes at offset 100/);
    assert.match(await io(user, `driver=luks,key-secret=sec1,file.filename=${file}`, 'read 0 512'), /Invalid password, cannot unlock any keyslot/);
    // info matches but for the random uuid and the calibrated iteration counts.
    const norm = (s: string) => s.replace(/uuid: \S+/, 'uuid: U').replace(/iters: \d+/g, 'iters: N').replace(/disk size: .*\n/, '');
    assert.equal(norm(await ok(COMPAT_QEMU_IMG, ['info', file])), norm(await ok('qemu-img', ['info', file])));
  }
  const r = await run(COMPAT_QEMU_IMG, ['create', '-f', 'luks', join(dir, 'x.luks'), '1M']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /Parameter 'key-secret' is required for cipher/);
});

test('an encrypted chain: create over an encrypted backing file needs no key, each layer opens with its own secret', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await ok('qemu-img', ['create', '-f', 'qcow2', ...SECRETS, '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', base, '16M']);
  await ok('qemu-io', [...SECRETS, '--image-opts', `driver=qcow2,file.filename=${base},encrypt.key-secret=sec0`, '-c', 'write -P 0xa 0 1M']);
  // The overlay's secret (sec1) does not open the backing file: create must not try it.
  await ok(COMPAT_QEMU_IMG, ['create', '-f', 'qcow2', ...SECRETS, '-o', 'encrypt.format=luks,encrypt.key-secret=sec1,encrypt.iter-time=10', '-b', base, '-F', 'qcow2', top]);
  const chain = `driver=qcow2,file.filename=${top},encrypt.key-secret=sec1,backing.driver=qcow2,backing.file.filename=${base},backing.encrypt.key-secret=sec0`;
  assert.match(await io(COMPAT_QEMU_IO, chain, 'write -P 0xe 0 1024'), /wrote 1024\/1024/);
  assert.match(await io('qemu-io', chain, 'read -P 0xe 0 1024'), /read 1024\/1024/);
  assert.match(await io('qemu-io', chain, 'read -P 0xa 1024 64512'), /read 64512\/64512/);
  // commit through compat/qemu-img, checked by QEMU; info shows the image by QEMU's json: name.
  assert.equal(await ok(COMPAT_QEMU_IMG, ['commit', ...SECRETS, '--image-opts', chain]), 'Image committed.\n');
  assert.match(await io('qemu-io', `driver=qcow2,file.filename=${base},encrypt.key-secret=sec0`, 'read -P 0xe 0 1024'), /read 1024\/1024/);
  const info = await ok(COMPAT_QEMU_IMG, ['info', '--image-opts', `driver=qcow2,file.filename=${base},encrypt.key-secret=sec0`]);
  assert.equal(info.split('\n')[0], `image: json:{"encrypt.key-secret": "sec0", "driver": "qcow2", "file": {"driver": "file", "filename": "${base}"}}`);
});

test('convert to an encrypted, preallocated target writes the zeros (it does not read as zeros)', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const src = join(dir, 'src.qcow2');
  const dst = join(dir, 'dst.qcow2');
  await ok('qemu-img', ['create', '-f', 'qcow2', src, '4M']);
  await ok(COMPAT_QEMU_IMG, ['convert', '-O', 'qcow2', ...SECRETS, '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,preallocation=metadata', src, dst]);
  assert.equal(await ok('qemu-img', ['compare', ...SECRETS, '--image-opts', `driver=qcow2,file.filename=${src}`, `driver=qcow2,encrypt.key-secret=sec0,file.filename=${dst}`]), 'Images are identical.\n');
});

test('amend manages LUKS key slots as qemu-img does, refusals included', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 't.qcow2');
  const opts = (sec: string) => `driver=qcow2,file.filename=${file},encrypt.key-secret=${sec}`;
  const amend = (sec: string, o: string, ...extra: string[]) => run(COMPAT_QEMU_IMG, ['amend', ...SECRETS, '--image-opts', opts(sec), '-o', o, ...extra]);
  await ok('qemu-img', ['create', '-f', 'qcow2', ...SECRETS, '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', file, '1M']);
  assert.equal((await amend('sec0', 'encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10,encrypt.keyslot=4')).code, 0);
  assert.equal((await amend('sec1', 'encrypt.state=active,encrypt.new-secret=sec2,encrypt.iter-time=10')).code, 0);
  for (const sec of ['sec0', 'sec1', 'sec2']) assert.match(await io('qemu-io', opts(sec), 'read 0 4096'), /read 4096\/4096/, sec);
  const slots = await ok('qemu-img', ['info', file]);
  assert.match(slots, /\[1\]:\n\s+active: true/);
  assert.match(slots, /\[4\]:\n\s+active: true/);
  const refusals: [string, string[], RegExp][] = [
    ['encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=0', [], /Refusing to overwrite active keyslot 0 - please erase it first/],
    ['encrypt.state=inactive,encrypt.keyslot=2', [], /Given keyslot 2 is already erased \(inactive\)/],
    ['encrypt.state=inactive,encrypt.old-secret=sec5', ['--force'], /No secret with id 'sec5'/],
    ['encrypt.keyslot=1', [], /Parameter 'state' is missing/],
    ['encrypt.state=inactive', [], /either explicit keyslot index or the password/],
  ];
  for (const [o, extra, message] of refusals) {
    const r = await amend('sec0', o, ...extra);
    assert.equal(r.code, 1, o);
    assert.match(r.stderr, message, o);
  }
  // Erase by password, then by slot; the last slot only goes with --force.
  assert.equal((await amend('sec1', 'encrypt.state=inactive,encrypt.old-secret=sec0')).code, 0);
  assert.match(await io('qemu-io', opts('sec0'), 'read 0 4096'), /Invalid password, cannot unlock any keyslot/);
  assert.equal((await amend('sec1', 'encrypt.state=inactive,encrypt.keyslot=1')).code, 0);
  assert.match(await io('qemu-io', opts('sec2'), 'read 0 4096'), /Invalid password, cannot unlock any keyslot/);
  const last = await amend('sec1', 'encrypt.state=inactive,encrypt.old-secret=sec1');
  assert.match(last.stderr, /All the active keyslots match the \(old\) password that was given and erasing them will erase all the data/);
  assert.equal((await amend('sec1', 'encrypt.state=inactive,encrypt.keyslot=4', '--force')).code, 0);
  assert.match(await io('qemu-io', opts('sec1'), 'read 0 4096'), /Invalid password, cannot unlock any keyslot/);
});

test('a LUKS mode string naming md5 after plain64 (cbc-plain64:md5, as QEMU makes it on request) opens both ways; the name is kept', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'md5.qcow2');
  const enc = 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.ivgen-hash-alg=md5,encrypt.hash-alg=sha1,encrypt.iter-time=10';
  await ok('qemu-img', ['create', '-q', '-f', 'qcow2', ...SECRETS, '-o', enc, img, '4M']);
  const opts = `driver=qcow2,file.filename=${img},encrypt.key-secret=sec0`;
  // QEMU writes, we read; we write, QEMU reads.
  assert.match(await io('qemu-io', opts, 'write -P 0x3c 4096 8192'), /wrote 8192\/8192 bytes at offset 4096/);
  assert.match(await io(COMPAT_QEMU_IO, opts, 'read -P 0x3c 4096 8192'), /read 8192\/8192 bytes at offset 4096/);
  assert.match(await io(COMPAT_QEMU_IO, opts, 'write -P 0x7e 65536 4096'), /wrote 4096\/4096 bytes at offset 65536/);
  assert.match(await io('qemu-io', opts, 'read -P 0x7e 65536 4096'), /read 4096\/4096 bytes at offset 65536/);
  const norm = (s: string) => s.replace(/uuid: \S+/, 'uuid: U').replace(/iters: \d+/g, 'iters: N').replace(/disk size: .*\n/, '');
  assert.equal(norm(await ok(COMPAT_QEMU_IMG, ['info', img])), norm(await ok('qemu-img', ['info', img])));
  // A key slot added by our amend rewrites the header: the mode string stays as QEMU wrote it.
  const modeAt = async () => (await import('node:fs/promises')).readFile(img).then((b) => b.subarray(b.indexOf('LUKS\xba\xbe', 0, 'latin1') + 40, b.indexOf('LUKS\xba\xbe', 0, 'latin1') + 72).toString('latin1').replace(/\0+$/, ''));
  assert.equal(await modeAt(), 'cbc-plain64:md5');
  await ok(COMPAT_QEMU_IMG, ['amend', ...SECRETS, '--image-opts', opts, '-o', 'encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10']);
  assert.equal(await modeAt(), 'cbc-plain64:md5');
  assert.match(await io('qemu-io', `driver=qcow2,file.filename=${img},encrypt.key-secret=sec1`, 'read -P 0x3c 4096 8192'), /read 8192\/8192 bytes at offset 4096/);
  const checked = await run('qemu-img', ['check', ...SECRETS, '--image-opts', opts]);
  assert.equal(checked.code, 0, checked.stdout + checked.stderr);
});
