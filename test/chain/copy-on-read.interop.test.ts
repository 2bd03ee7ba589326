/**
 * Copy-on-read (OpenImageOptions.copyOnRead, withCopyOnRead, qemu-io -C and the copy-on-read
 * filter driver of compat/qemu-io): the same reads through qemu-io -C and through ours leave the
 * overlay with the same allocation (whole clusters, zeros as zero clusters, clusters the overlay
 * held already untouched), and the overlay alone then reads as the chain did.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openImage, withCopyOnRead, isQcowError } from '#src/node.js';
import { needs, qemuImg, qemuIo, run, scratch } from '../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../compat/qemu-io', import.meta.url));
const M = 1024 * 1024;

/** base (data at 1M and 3M+64k) under an overlay that holds a zero cluster at 2M. */
async function chain(dir: string, name: string): Promise<string> {
  const base = join(dir, `${name}-base.qcow2`);
  const top = join(dir, `${name}.qcow2`);
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '4M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x55 1M 1k', '-c', 'write -P 0x66 2M 64k', '-c', `write -P 0x77 ${3 * M + 65536} 512`, base]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -z 2M 64k', top]);
  return top;
}

/** `qemu-img map` of the overlay alone (its backing file dropped from view), host offsets left out. */
async function ownMap(top: string): Promise<string> {
  const r = await qemuImg(['map', '--output=json', `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: top } })}`]);
  return r.stdout.replace(/"offset": \d+/g, '"offset": N');
}

const READS: [number, number][] = [
  [1024, M], // rounded out to [0, 1M+64k): zeros, then the base's data at 1M
  [2 * M + 512, 128 * 1024], // the overlay's zero cluster is not rewritten; the next one is copied
  [3 * M + 65536 + 100, 10],
];

test('library copyOnRead copies what qemu-io -C copies', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const theirs = await chain(dir, 'theirs');
  await qemuIo(['-C', '-f', 'qcow2', ...READS.flatMap(([o, n]) => ['-c', `read ${o} ${n}`]), theirs]);
  const ours = await chain(dir, 'ours');
  const want: Uint8Array[] = [];
  {
    const plain = await openImage(ours, { readOnly: true });
    for (const [o, n] of READS) {
      const b = new Uint8Array(n);
      await plain.read(o, b);
      want.push(b);
    }
    await plain.close();
  }
  const dev = await openImage(ours, { copyOnRead: true });
  for (const [i, [o, n]] of READS.entries()) {
    const b = new Uint8Array(n);
    await dev.read(o, b);
    assert.deepEqual(b, want[i], `read ${o} ${n} gives the chain's bytes`);
  }
  await dev.close();
  assert.equal(await ownMap(ours), await ownMap(theirs));
  assert.equal((await run('qemu-img', ['check', ours])).code, 0);
  // The copied ranges read the same from the overlay alone.
  await qemuImg(['rebase', '-u', '-b', '', ours]);
  await qemuImg(['rebase', '-u', '-b', '', theirs]);
  assert.equal((await run('qemu-img', ['compare', ours, theirs])).code, 0);
});

test('copy-on-read refuses a read-only image, with QEMU words', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const top = await chain(dir, 'ro');
  await assert.rejects(
    openImage(top, { readOnly: true, copyOnRead: true }),
    (e) => isQcowError(e) && e.code === 'QCOW_READ_ONLY' && /Can't use copy-on-read on read-only device/.test(e.message),
  );
  const dev = await openImage(top, { readOnly: true });
  assert.throws(() => withCopyOnRead(dev), /read-only/);
  await dev.close();
  for (const prog of ['qemu-io', COMPAT_QEMU_IO]) {
    const r = await run(prog, ['-C', '-r', '-f', 'qcow2', '-c', 'read 0 512', top]);
    assert.match(r.stderr, /can't open device .*: Can't use copy-on-read on read-only device/, prog);
    const f = await run(prog, ['-c', `open -r -o driver=copy-on-read,file.driver=qcow2 ${top}`]);
    assert.match(f.stdout + f.stderr, /Block node is read-only/, prog);
  }
});

test('compat/qemu-io -C and the copy-on-read filter copy as qemu-io does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const maps: string[] = [];
  for (const [name, prog] of [
    ['q', 'qemu-io'],
    ['c', COMPAT_QEMU_IO],
  ] as const) {
    const a = await chain(dir, `${name}-flag`);
    const r = await run(prog, ['-C', '-f', 'qcow2', '-c', 'read 1024 1M', '-c', 'read 2M 128k', a]);
    assert.equal(r.code, 0, r.stderr);
    const b = await chain(dir, `${name}-filter`);
    const f = await run(prog, ['-c', `open -o driver=copy-on-read,file.driver=qcow2 ${b}`, '-c', 'read 1024 1M', '-c', 'read 2M 128k']);
    assert.equal(f.code, 0, f.stderr);
    maps.push((await ownMap(a)) + (await ownMap(b)));
  }
  assert.equal(maps[1], maps[0]);
});
