/**
 * `write -z` over part of a cluster: qemu makes the whole cluster a zero cluster when the rest of
 * it already reads as zeros (through the backing chain) and the overlay holds no data there, and
 * writes zero bytes otherwise; a request that ends at the image's end has no tail. The drop-in
 * qemu-io must leave the same map as qemu-io.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

/** The map without host offsets (the two programs may place clusters elsewhere). */
async function map(dir: string, file: string): Promise<unknown> {
  const r = await run('qemu-img', ['map', '--output=json', file], { cwd: dir });
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as Array<Record<string, unknown>>).map(({ offset, ...rest }) => ({ ...rest, offset: offset !== undefined }));
}

test('write -z over part of a cluster leaves the map qemu-io leaves', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const size = 1024 * 1024;
  const cases: Array<{ what: string; base?: string[]; top?: string[]; topSize?: number; zero: string }> = [
    { what: 'backing reads zeros: tail unaligned', zero: '0 2k' },
    { what: 'backing reads zeros: both unaligned', zero: '17k 2k' },
    { what: 'backing reads zeros: across two clusters', zero: '27k 2k' },
    { what: 'backing has data in the rest of the cluster', base: ['write -P 1 0 512'], zero: '1k 2k' },
    { what: 'backing has data under the request only', base: ['write -P 1 1k 512'], zero: '1k 2k' },
    { what: 'the overlay has data in the cluster', top: ['write -P 2 0 4k'], zero: '1k 2k' },
    { what: 'the overlay has a zero cluster', top: ['write -z 0 4k'], zero: '1k 2k' },
    { what: 'a data cluster at the unaligned end of the image, zeroed to the end', topSize: size + 1024, top: [`write -P 1 ${size} 1k`], zero: `${size} 1k` },
    { what: 'a data cluster at the unaligned end of the image, zeroed in part', topSize: size + 1024, top: [`write -P 1 ${size} 1k`], zero: `${size + 512} 512` },
  ];
  for (const c of cases) {
    for (const [tool, file] of [
      ['qemu-io', 'q.qcow2'],
      [COMPAT_IO, 'c.qcow2'],
    ] as const) {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', 'base.qcow2', String(size)], dir);
      for (const cmd of c.base ?? []) await qemuIo(['-f', 'qcow2', '-c', cmd, 'base.qcow2'], dir);
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'base.qcow2', '-F', 'qcow2', file, String(c.topSize ?? size)], dir);
      for (const cmd of c.top ?? []) await qemuIo(['-f', 'qcow2', '-c', cmd, file], dir);
      const r = await run(tool, ['-f', 'qcow2', '-c', `write -z ${c.zero}`, file], { cwd: dir });
      assert.equal(r.code, 0, `${c.what}: ${r.stderr}`);
    }
    assert.deepEqual(await map(dir, 'c.qcow2'), await map(dir, 'q.qcow2'), c.what);
  }
});
