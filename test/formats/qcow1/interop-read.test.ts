/**
 * Images made by qemu-img and qemu-io (the recipes of docs/notes/commands.md §2) read by us: guest
 * content with the SHA-256 qemu gives, `qcow info` and `qcow map` as qemu-img prints them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { openImage } from '#src/node.js';
import { deviceSha256, needs, qcow, qcowOk, qemuGuestSha256, qemuImg, runOk, scratch, sha256 } from '../../support/qemu.js';
import { readFile } from 'node:fs/promises';

const SECRET = ['--object', 'secret,id=sec0,data=hunter2'];
const aesOpts = (f: string) => [...SECRET, '--image-opts', `driver=qcow,file.filename=${f},encrypt.key-secret=sec0`];

const RECIPES = String.raw`
qemu-img create -q -f raw src.raw 4M
qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'write -P 0xcd 2M 64k' src.raw
head -c 1048576 /dev/zero | openssl enc -aes-128-ctr -nosalt -K 000102030405060708090a0b0c0d0e0f -iv 00000000000000000000000000000000 | dd of=src.raw bs=1M seek=3 conv=notrunc status=none
qemu-img create -q -f qcow v1-plain.qcow 4M
qemu-io -f qcow -c 'write -P 0xab 128k 64k' -c 'write -P 0x5a 3M 4k' v1-plain.qcow
qemu-img convert -O qcow src.raw v1-conv.qcow
qemu-img convert -c -O qcow src.raw v1-comp.qcow || true
qemu-img compare -q -f raw -F qcow src.raw v1-comp.qcow
qemu-img create -q -f raw v1-base.raw 2M
qemu-io -f raw -c 'write -P 0x11 0 2M' v1-base.raw
qemu-img create -q -f qcow -b v1-base.raw -F raw v1-back.qcow 4M
qemu-io -f qcow -c 'write -P 0x22 128k 512' -c 'write -P 0x23 1M 64k' -c 'write -c -P 0x24 3M 512' v1-back.qcow
qemu-img create -q -f qcow -b v1-base.raw -F raw v1-chain1.qcow 4M
qemu-io -f qcow -c 'write -P 0x31 256k 256k' v1-chain1.qcow
qemu-img create -q -f qcow -b v1-chain1.qcow -F qcow v1-chain2.qcow
qemu-io -f qcow -c 'write -P 0x32 384k 4k' v1-chain2.qcow
qemu-img create -q -f qcow -b v1-chain2.qcow -F qcow v1-chain3.qcow 6M
qemu-io -f qcow -c 'write -P 0x33 5M 512' v1-chain3.qcow
qemu-img create -q -f qcow --object secret,id=sec0,data=hunter2 -o encrypt.format=aes,encrypt.key-secret=sec0 v1-aes.qcow 4M
qemu-io --object secret,id=sec0,data=hunter2 --image-opts driver=qcow,file.filename=v1-aes.qcow,encrypt.key-secret=sec0 -c 'write -P 0xab 128k 64k' -c 'write -P 0xcd 1536 1024'
qemu-img convert -O qcow --object secret,id=sec0,data=hunter2 -o encrypt.format=aes,encrypt.key-secret=sec0 src.raw v1-aes-conv.qcow
cp v1-aes.qcow v1-aes-comp.qcow
qemu-io --object secret,id=sec0,data=hunter2 --image-opts driver=qcow,file.filename=v1-aes-comp.qcow,encrypt.key-secret=sec0 -c 'write -c -P 0x99 256k 4k'
qemu-img create -q -f qcow --object secret,id=sec0,data=hunter2 -o encryption=on,encrypt.key-secret=sec0 v1-aes-legacyopt.qcow 1M
`;

/** docs/notes/commands.md §6 */
const EXPECTED: Record<string, string> = {
  'v1-plain.qcow': '3449fc8defcdac38d3d064f170e041e25a4c67fd3a238679edb601ae9890a8ee',
  'v1-conv.qcow': '90d40fd268e7c7243a568dc7f395082bc62d0fd19baa692da3a96cef61dd79c2',
  'v1-comp.qcow': '90d40fd268e7c7243a568dc7f395082bc62d0fd19baa692da3a96cef61dd79c2',
  'v1-back.qcow': '895cb6ccaf57352d67f68c7fb6cb6894f3823b82b1eb2e0783da64d7117a7e4f',
  'v1-chain3.qcow': '49493632f377443fdba9e5e4a3f087af6cce4dc5c8439ba32bf2376b847bcfff',
  'v1-aes.qcow': 'ff2e770fa9a5590a5e3aeb4c95f73b5300c2007f4b97ddd8c65fddae077406c5',
  'v1-aes-conv.qcow': '90d40fd268e7c7243a568dc7f395082bc62d0fd19baa692da3a96cef61dd79c2',
  'v1-aes-comp.qcow': 'e913b2ff245c4153d9586b1a209f2cbdd1046ea9b42516fc4a7aba281b4d4967',
};

const withoutActualSize = (text: string) => {
  const parse = (v: unknown): unknown => (Array.isArray(v) ? v.map(parse) : v && typeof v === 'object' ? { ...(v as object), 'actual-size': undefined } : v);
  return parse(JSON.parse(text));
};

test('images made by qemu read by us', needs('qemu-img', 'qemu-io', 'openssl'), async (t) => {
  const dir = await scratch(t);
  await runOk('bash', ['-e', '-c', RECIPES], { cwd: dir });
  await writeFile(join(dir, 'pw'), 'hunter2\n');

  await t.test('guest content has the SHA-256 qemu gives (library, whole chain)', async () => {
    for (const [name, hash] of Object.entries(EXPECTED)) {
      const dev = await openImage(join(dir, name), { readOnly: true, password: name.includes('aes') ? 'hunter2' : undefined });
      try {
        assert.equal(dev.format, 'qcow', name);
        assert.equal(await deviceSha256(dev), hash, name);
      } finally {
        await dev.close();
      }
    }
  });

  await t.test('qcow convert -O raw gives the same bytes as qemu-img convert (CLI, --password-file)', async () => {
    for (const name of ['v1-back.qcow', 'v1-chain3.qcow', 'v1-comp.qcow', 'v1-aes-comp.qcow']) {
      const out = join(dir, `${name}.raw`);
      await qcowOk(['convert', ...(name.includes('aes') ? ['--password-file', 'pw'] : []), '-O', 'raw', name, out], { cwd: dir });
      assert.equal(sha256(await readFile(out)), EXPECTED[name], name);
    }
  });

  await t.test('a wrong password reads the same garbage qemu reads (there is no key check)', async () => {
    const dev = await openImage(join(dir, 'v1-aes.qcow'), { readOnly: true, password: 'hunter3' });
    const ours = await deviceSha256(dev);
    await dev.close();
    const theirs = await qemuGuestSha256(['--object', 'secret,id=sec0,data=hunter3', '--image-opts', 'driver=qcow,file.filename=v1-aes.qcow,encrypt.key-secret=sec0'], dir);
    assert.equal(ours, theirs);
    assert.notEqual(ours, EXPECTED['v1-aes.qcow']);
  });

  await t.test('a missing password is one clear line and exit status 4 (info without it is tested below)', async () => {
    const r = await qcow(['convert', '-O', 'raw', 'v1-aes.qcow', 'x.raw'], { cwd: dir });
    assert.equal(r.code, 4);
    assert.match(r.stderr, /^qcow: .*v1-aes\.qcow: image is encrypted \(AES\): a password is needed/);
    assert.equal(r.stderr.trim().split('\n').length, 1);
  });

  await t.test('qcow info --output=json matches qemu-img info (except actual-size)', async () => {
    for (const name of ['v1-plain.qcow', 'v1-comp.qcow', 'v1-aes.qcow', 'v1-aes-legacyopt.qcow']) {
      const ours = (await qcowOk(['info', '--output=json', name], { cwd: dir })).stdout;
      const theirs = (await qemuImg(['info', '--output=json', name], dir)).stdout;
      assert.deepEqual(withoutActualSize(ours), withoutActualSize(theirs), name);
    }
    // Images with a backing file, layer by layer down the chain.
    for (const name of ['v1-back.qcow', 'v1-chain3.qcow']) {
      const ours = (await qcowOk(['info', '--backing-chain', '--output=json', name], { cwd: dir })).stdout;
      const theirs = (await qemuImg(['info', '--backing-chain', '--output=json', name], dir)).stdout;
      assert.deepEqual(withoutActualSize(ours), withoutActualSize(theirs), name);
    }
  });

  await t.test('qcow map --output=json matches qemu-img map', async () => {
    for (const name of ['v1-plain.qcow', 'v1-conv.qcow', 'v1-comp.qcow', 'v1-back.qcow', 'v1-chain3.qcow']) {
      const ours = (await qcowOk(['map', '--output=json', name], { cwd: dir })).stdout;
      const theirs = (await qemuImg(['map', '--output=json', name], dir)).stdout;
      assert.deepEqual(JSON.parse(ours), JSON.parse(theirs), name);
    }
    // Encrypted: data without host offsets.
    const ours = (await qcowOk(['map', '--output=json', '--password-file', 'pw', 'v1-aes-comp.qcow'], { cwd: dir })).stdout;
    const theirs = (await qemuImg(['map', '--output=json', ...aesOpts('v1-aes-comp.qcow')], dir)).stdout;
    assert.deepEqual(JSON.parse(ours), JSON.parse(theirs));
  });
});
