/**
 * qcow amend (qcow2): the options qemu-img amend changes in place, checked against qemu-img on the
 * same input (qemu-img check clean, guest SHA-256 unchanged, qemu-img info shows the new options),
 * and what qemu refuses, refused.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { needs, qcow, qcowOk, qemuGuestSha256, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

async function info(file: string): Promise<Record<string, unknown>> {
  const r = await qemuImg(['info', '--output=json', file]);
  return (JSON.parse(r.stdout) as { 'format-specific': { data: Record<string, unknown> } })['format-specific'].data;
}

async function clean(file: string): Promise<void> {
  const c = await run('qemu-img', ['check', file]);
  assert.equal(c.code, 0, c.stdout + c.stderr);
}

/** A v3 image over a raw base with every kind of zero cluster, data and a compressed cluster. */
async function zeroKinds(dir: string, name: string, snapshot: boolean): Promise<string> {
  const base = join(dir, 'base.raw');
  await qemuImg(['create', '-q', '-f', 'raw', base, '4M']);
  await qemuIo(['-f', 'raw', '-c', 'write -P 0x11 0 4M', base]);
  const f = join(dir, name);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', f]);
  await qemuIo(['-c', 'write -P 0x22 0 192k', '-c', 'write -z 0 64k', '-c', 'write -z 256k 64k', '-c', 'write -c -P 0x44 1M 64k', f]);
  if (snapshot) {
    await qemuImg(['snapshot', '-c', 's1', f]);
    await qemuIo(['-c', 'write -z 64k 64k', '-c', 'write -z -u 512k 64k', f]);
  }
  return f;
}

test('compat=0.10 turns zero clusters into v2 clusters as qemu-img amend does (same content, same info)', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const ours = await zeroKinds(dir, 'ours.qcow2', false);
  const theirs = join(dir, 'theirs.qcow2');
  await copyFile(ours, theirs);
  const before = await qemuGuestSha256(['-f', 'qcow2', ours]);
  await qcowOk(['amend', '-f', 'qcow2', '-o', 'compat=0.10', ours]);
  await qemuImg(['amend', '-f', 'qcow2', '-o', 'compat=0.10', theirs]);
  await clean(ours);
  assert.equal(await qemuGuestSha256(['-f', 'qcow2', ours]), before);
  assert.deepEqual(await info(ours), await info(theirs));
  assert.equal((await info(ours)).compat, '0.10');
  // The same clusters are allocated where qemu allocates them.
  const map = async (f: string) => (JSON.parse((await qemuImg(['map', '--output=json', f])).stdout) as Array<{ start: number; depth: number; offset?: number }>).map((e) => [e.depth, e.offset]);
  assert.deepEqual(new Set((await map(ours)).map(String)), new Set((await map(theirs)).map(String)));
});

test('compat=0.10 with an internal snapshot sharing a zero cluster keeps the snapshot intact', needs('qemu-img', 'qemu-io'), async (t) => {
  // qemu 7.2 writes zeros over the shared cluster here (its snapshot then reads zeros and its check
  // reports OFLAG_COPIED errors); we give the active image its own cluster instead.
  const dir = await scratch(t);
  const f = await zeroKinds(dir, 'snap.qcow2', true);
  const active = await qemuGuestSha256(['-f', 'qcow2', f]);
  const snap = await qemuGuestSha256(['-f', 'qcow2', '-l', 's1', f]);
  await qcowOk(['amend', '-o', 'compat=0.10', f]);
  await clean(f);
  assert.equal(await qemuGuestSha256(['-f', 'qcow2', f]), active);
  assert.equal(await qemuGuestSha256(['-f', 'qcow2', '-l', 's1', f]), snap);
});

test('refcount_bits, lazy_refcounts and compat=1.1 change in place; content and check stay clean', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const f = join(dir, 'r.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4k', f, '8M']);
  await qemuIo(['-c', 'write -P 5 0 3M', '-c', 'write -c -P 6 4M 4k', f]);
  await qemuImg(['snapshot', '-c', 's', f]);
  const sha = await qemuGuestSha256(['-f', 'qcow2', f]);
  await qcowOk(['amend', '-o', 'compat=1.1', f]);
  assert.equal((await info(f)).compat, '1.1');
  for (const bits of [64, 2, 8, 16]) {
    await qcowOk(['amend', '-o', `refcount_bits=${bits}`, f]);
    await clean(f);
    assert.equal((await info(f))['refcount-bits'], bits);
    assert.equal(await qemuGuestSha256(['-f', 'qcow2', f]), sha);
  }
  // The snapshot shares every cluster (refcount 2): one bit cannot hold that.
  const r = await qcow(['amend', '-o', 'refcount_bits=1', f]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /Cannot decrease refcount entry width to 1 bits/);
  await qcowOk(['amend', '-o', 'lazy_refcounts=on', f]);
  assert.equal((await info(f))['lazy-refcounts'], true);
  await qemuIo(['-c', 'write -P 7 5M 64k', f]);
  await qcowOk(['amend', '-o', 'lazy_refcounts=off', f]);
  assert.equal((await info(f))['lazy-refcounts'], false);
  await clean(f);
  // Our amended image stays writable by qemu and by us.
  await qcowOk(['io', '-c', 'write -P 8 6M 8k', f]);
  await clean(f);
});

test('amend refuses what qemu-img amend refuses, and leaves the image unchanged', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const cases: Array<[string, string, RegExp]> = [
    ['', 'cluster_size=4k', /Invalid parameter 'cluster_size'/],
    ['', 'foo=bar', /Invalid parameter 'foo'/],
    ['', 'compat=0.9', /Unknown compatibility level 0.9/],
    ['', 'lazy_refcounts=maybe', /expects 'on' or 'off'/],
    ['', 'refcount_bits=3', /power of two/],
    ['', 'backing_file=x.raw', /Cannot amend the backing file/],
    ['compat=0.10', 'lazy_refcounts=on', /Lazy refcounts only supported with compatibility level 1.1/],
    ['compat=0.10', 'refcount_bits=8', /Refcount widths other than 16 bits require compatibility level 1.1/],
    ['extended_l2=on', 'compat=0.10', /Cannot downgrade an image with incompatible features 0x10 set/],
    ['refcount_bits=8', 'compat=0.10', /compat=0.10 requires refcount_bits=16/],
  ];
  for (const [create, amend, message] of cases) {
    const f = join(dir, 'x.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', ...(create ? ['-o', create] : []), f, '1M']);
    const q = await run('qemu-img', ['amend', '-o', amend, f]);
    assert.notEqual(q.code, 0, `qemu-img accepted ${amend}`);
    const before = await qemuImg(['info', '--output=json', f]);
    const r = await qcow(['amend', '-o', amend, f]);
    assert.equal(r.code, 1, amend);
    assert.match(r.stderr, message);
    assert.equal((await qemuImg(['info', '--output=json', f])).stdout, before.stdout);
  }
});

test('compat=0.10 with persistent bitmaps: qemu-img 7.2 downgrades too; the bitmaps go with their clusters and check stays clean', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const make = async (name: string) => {
    const f = join(dir, name);
    await qemuImg(['create', '-q', '-f', 'qcow2', f, '4M']);
    await qemuImg(['bitmap', '--add', f, 'b1']);
    await qemuImg(['bitmap', '--add', '-g', '512k', '--disable', f, 'b2']);
    await qemuIo(['-c', 'write -P 0x33 0 1M', f]);
    await qemuImg(['bitmap', '--merge', 'b1', f, 'b2']);
    return f;
  };
  const q = await make('q.qcow2');
  const o = await make('o.qcow2');
  // QEMU does not refuse: it clears the autoclear bit and leaves the extension and clusters behind.
  assert.equal((await run('qemu-img', ['amend', '-o', 'compat=0.10', q])).code, 0);
  const qemuCheck = await run('qemu-img', ['check', q]);
  assert.match(qemuCheck.stderr + qemuCheck.stdout, /leaked clusters/);
  await qcowOk(['amend', '-o', 'compat=0.10', o]);
  const i = await info(o);
  assert.equal(i.compat, '0.10');
  assert.equal(i.bitmaps, undefined);
  // No warning about stale bitmaps (the extension is gone), no leaks (their clusters are free).
  const c = await run('qemu-img', ['check', o]);
  assert.equal(c.code, 0, c.stdout + c.stderr);
  assert.equal(c.stderr, '');
  assert.match(c.stdout, /No errors were found/);
  assert.equal(await qemuGuestSha256([o]), await qemuGuestSha256([q]));
  // Upgrading again gives an image without bitmaps, where new ones can be added.
  await qcowOk(['amend', '-o', 'compat=1.1', o]);
  await qcowOk(['bitmap', '--add', o, 'again']);
  await clean(o);
});

test('raw and qcow v1 images refuse amend and -o help with qemu-img amend\'s line and exit status', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  for (const format of ['raw', 'qcow']) {
    const f = join(dir, `x.${format}`);
    await qemuImg(['create', '-q', '-f', format, f, '1M']);
    for (const args of [['-f', format, '-o', 'size=2M'], ['-o', 'size=2M'], ['-o', 'help']]) {
      const q = await run('qemu-img', ['amend', ...args, f]);
      const r = await qcow(['amend', ...args, f]);
      assert.equal(r.code, q.code, `${format} ${args.join(' ')}`);
      // qemu-img's last line is the refusal; a probed raw image adds its probing warning before it.
      const last = (text: string, program: string) => text.trimEnd().split('\n').at(-1)!.replace(`${program}: `, '');
      assert.equal(last(r.stderr, 'qcow'), last(q.stderr, 'qemu-img'), `${format} ${args.join(' ')}`);
      assert.match(r.stderr, /does not support option amendment\n$/);
      assert.equal(r.stdout, '');
    }
  }
});
