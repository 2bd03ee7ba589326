/**
 * A chain whose every overlay names its backing file with a json:{...} name (as iotest
 * backing-file-invalidation builds one): the image such a name opens has its own json:{...}
 * backing name, which opens the same way, layer after layer. qemu-img info --backing-chain, reads
 * through the chain and check agree with QEMU's programs, on chains made by either side.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));
const TOOLS = { qemu: ['qemu-img', 'qemu-io'], ours: [COMPAT_IMG, COMPAT_IO] } as const;

async function ok(cmd: string, args: string[], cwd: string): Promise<string> {
  const r = await run(cmd, args, { cwd });
  assert.equal(r.code, 0, `${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

test('json:{...} backing names, each image of the chain naming the next so: opened layer after layer as in QEMU', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const [maker, [img, io]] of Object.entries(TOOLS)) {
    const name = (i: number) => join(dir, `${maker}${i}.img`);
    await ok(img, ['create', '-q', '-f', 'qcow2', name(0), '1M'], dir);
    for (let i = 1; i <= 3; i++) {
      const backing = { driver: 'qcow2', file: { driver: 'file', filename: name(i - 1) } };
      await ok(img, ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', `json:${JSON.stringify(backing)}`, name(i), '1M'], dir);
    }
    // Each layer's own data, at its own offset, so that a read of the top sees all four.
    for (let i = 0; i <= 3; i++) await ok(io, ['-c', `write -P ${i + 1} ${i * 65536} 64k`, name(i)], dir);
    const want = await ok('qemu-img', ['info', '--output=json', '--backing-chain', name(3)], dir);
    const chain = JSON.parse(want) as { filename: string }[];
    assert.deepEqual(chain.map((c) => c.filename), [3, 2, 1, 0].map(name), maker);
    for (const [reader, [rimg, rio]] of Object.entries(TOOLS)) {
      const what = `${maker}'s chain read by ${reader}`;
      const got = JSON.parse(await ok(rimg, ['info', '--output=json', '--backing-chain', name(3)], dir)) as Record<string, unknown>[];
      assert.deepEqual(
        got.map((c) => [c.filename, c['backing-filename']]),
        (chain as unknown as Record<string, unknown>[]).map((c) => [c.filename, c['backing-filename']]),
        what,
      );
      const reads = [0, 1, 2, 3].flatMap((i) => ['-c', `read -P ${i + 1} ${i * 65536} 64k`]);
      const out = await ok(rio, ['-r', ...reads, name(3)], dir);
      assert.doesNotMatch(out, /Pattern verification failed|failed/, what);
      await ok(rimg, ['check', name(3)], dir);
    }
  }
});
