/**
 * `convert -c` makes the same file from the same input every time, as qemu-img does: compressed
 * clusters are placed in guest order whether they were compressed here, one after another, or on
 * codec worker threads that finish in any order.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { QCOW_BIN, needs, qemuImg, randomBytes, run, scratch } from '../support/qemu.js';

const CLUSTER = 64 * 1024;
const CHUNK = 2 * 1024 * 1024;

/**
 * Three 2 MiB chunks (convert's work items), each opening with a cluster that deflates slowly
 * (mostly random bytes, still shrinking) before clusters that deflate at once: on worker threads
 * the fast ones finish first.
 */
function input(): Uint8Array {
  const data = new Uint8Array(3 * CHUNK);
  for (let chunk = 0; chunk < 3; chunk++) {
    for (let c = 0; c < CHUNK / CLUSTER; c++) {
      const at = chunk * CHUNK + c * CLUSTER;
      if (c === 0) {
        data.set(randomBytes(CLUSTER - CLUSTER / 4, chunk + 1), at);
      } else data.fill((chunk * 32 + c) & 0xff, at, at + CLUSTER);
    }
  }
  return data;
}

const convert = (format: string, src: string, dst: string, env: NodeJS.ProcessEnv) =>
  run(QCOW_BIN, ['convert', '-c', '-f', 'raw', '-O', format, src, dst], { env: { ...process.env, ...env } });

for (const format of ['qcow2', 'qcow']) {
  test(`convert -c -O ${format} writes the same bytes with codec workers as without, and twice alike`, needs('qemu-img'), async (t) => {
    const dir = await scratch(t);
    const src = join(dir, 'in.raw');
    await writeFile(src, input());
    const outputs: Uint8Array[] = [];
    const runs: [string, NodeJS.ProcessEnv][] = [
      ['on this thread', { QCOW_CODEC_THREADS: '0' }],
      ['two workers from the start', { QCOW_CODEC_THREADS: '2', QCOW_CODEC_START_MS: '0' }],
      ['two workers again', { QCOW_CODEC_THREADS: '2', QCOW_CODEC_START_MS: '0' }],
    ];
    for (const [what, env] of runs) {
      const dst = join(dir, `out-${outputs.length}.${format}`);
      const r = await convert(format, src, dst, env);
      assert.equal(r.code, 0, `${what}: ${r.stderr}`);
      // qemu-img checks qcow2 only; both formats' guest content is compared (qemuImg throws on a difference).
      if (format === 'qcow2') await qemuImg(['check', dst]);
      await qemuImg(['compare', '-f', 'raw', '-F', format, src, dst]);
      outputs.push(await readFile(dst));
    }
    for (let i = 1; i < outputs.length; i++) assert.ok(Buffer.from(outputs[0]!).equals(outputs[i]!), `${runs[i]![0]}: the file differs from the one made ${runs[0]![0]}`);
  });
}
