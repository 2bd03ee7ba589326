/**
 * A qcow2 image cut inside its first cluster (a fuzz case of test/fuzz/check-diff: an extended-L2
 * image truncated to 0.1% of its length). QEMU bounds the header extensions by the cluster, not
 * the file, and reads zeros past the end of a file, so qemu-img opens such an image and its check
 * reports the tables it lost; ours must do the same (same JSON and exit code), where it refused
 * the image with "header extension ... runs past the header area".
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { CLI, needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

async function outcome(cmd: string, args: string[], dir: string): Promise<{ code: number; json: unknown }> {
  const r = await run(cmd, args, { cwd: dir });
  let json: unknown = null;
  try {
    json = JSON.parse(r.stdout);
  } catch {
    json = r.stderr.trim();
  }
  return { code: r.code, json };
}

test('an image cut inside its header extensions is checked as qemu-img checks it', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', 'x.qcow2', '64M'], dir);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x33 0 1M', 'x.qcow2'], dir);
  const full = (await stat(join(dir, 'x.qcow2'))).size;
  // Inside the fixed fields' tail, inside the feature-name table, just before the end of the
  // extensions, and 0.1% of the file.
  for (const length of [120, 300, 503, Math.floor(full / 1000)]) {
    await copyFile(join(dir, 'x.qcow2'), join(dir, 't.qcow2'));
    await truncate(join(dir, 't.qcow2'), length);
    const theirs = await outcome('qemu-img', ['check', '-f', 'qcow2', '--output=json', 't.qcow2'], dir);
    const ours = await outcome(process.execPath, [CLI, 'check', '-f', 'qcow2', '--output=json', 't.qcow2'], dir);
    assert.equal(ours.code, theirs.code, `cut at ${length}`);
    assert.deepEqual(ours.json, theirs.json, `cut at ${length}`);
    assert.equal(theirs.code, 2, `cut at ${length}: qemu-img finds corruptions`);
    // The header now reads, so info gets as far as the tables: it refuses the L1 table past the
    // end of the file (qemu-img info, which reads no table, opens it), in one line, not a crash.
    const info = await run(process.execPath, [CLI, 'info', 't.qcow2'], { cwd: dir });
    if (info.code !== 0) assert.match(info.stderr, /^qcow: t\.qcow2: L1 table .* lies outside the file .*\n$/);
  }
});
