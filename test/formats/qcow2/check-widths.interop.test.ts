/**
 * check and `check -r all` of images with every refcount width (qemu-img create -o
 * refcount_bits=N), each with counts changed by hand: a leaked free cluster and, where the width
 * holds a 2, a data cluster counted twice (a leak and a COPIED flag that no longer agrees). Our
 * JSON, exit code and messages' kinds must be qemu-img's, and the repaired file must be clean to
 * qemu-img with the guest's data unchanged. The compare of counts takes one loop per width
 * (ClusterRefs.sameAsStored): these images go through every one of them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CLI, needs, qemuGuestSha256, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';
import { REFCOUNT_WIDTHS, getRefcount, setRefcount } from '#src/formats/qcow2/refcount.js';

const CS = 4096;

interface Outcome {
  code: number;
  json: Record<string, unknown> | null;
  /** The kind of each finding line ("Leaked cluster", "ERROR OFLAG_COPIED data cluster", ...), sorted. */
  kinds: string[];
}

async function check(dir: string, tool: 'qemu-img' | 'qcow', file: string, repair = false): Promise<Outcome> {
  const argv = ['check', '-f', 'qcow2', '--output=json', ...(repair ? ['-r', 'all'] : []), file];
  const r = tool === 'qemu-img' ? await run('qemu-img', argv, { cwd: dir }) : await run(process.execPath, [CLI, ...argv], { cwd: dir });
  let json: Record<string, unknown> | null = null;
  try {
    json = JSON.parse(r.stdout) as Record<string, unknown>;
    delete json.filename;
  } catch {
    json = null;
  }
  const kinds = r.stderr
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => l.replace(/\s*[0-9].*$/, ''))
    .sort();
  return { code: r.code, json, kinds };
}

/** The image's first refcount block: its offset and bytes. */
async function firstBlock(file: string): Promise<{ image: Uint8Array; at: number }> {
  const image = new Uint8Array(await readFile(file));
  const v = new DataView(image.buffer);
  const table = Number(v.getBigUint64(48));
  return { image, at: Number(v.getBigUint64(table) & ~0x1ffn) };
}

for (const bits of REFCOUNT_WIDTHS) {
  test(`check and check -r all of a ${bits}-bit refcount image agree with qemu-img`, needs('qemu-img', 'qemu-io'), async (t) => {
    const dir = await scratch(t);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CS},refcount_bits=${bits}`, 'a.qcow2', '4M'], dir);
    // 40 clusters of data, then one freed in the middle (its count 0, the file as long).
    await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x5a 0 160k', '-c', 'discard 64k 4k', 'a.qcow2'], dir);
    const file = join(dir, 'a.qcow2');
    const { image, at } = await firstBlock(file);
    const block = image.subarray(at, at + CS);
    // The freed cluster: the first one below the end of the file whose count is 0.
    const clusters = image.length / CS;
    let freed = 1;
    while (freed < clusters && getRefcount(block, freed, bits) !== 0) freed++;
    assert.ok(freed < clusters, 'the discard left a free cluster inside the file');
    setRefcount(block, freed, bits, 1);
    // The last cluster of the file holds data (the writes came last): counted twice where it can be.
    if (bits > 1) setRefcount(block, clusters - 1, bits, 2);
    await writeFile(file, image);
    const before = await qemuGuestSha256(['-f', 'qcow2', file]);
    const theirs = await check(dir, 'qemu-img', 'a.qcow2');
    const ours = await check(dir, 'qcow', 'a.qcow2');
    assert.equal(ours.code, theirs.code);
    assert.deepEqual(ours.json, theirs.json);
    assert.deepEqual(ours.kinds, theirs.kinds);
    assert.equal(theirs.json?.leaks, bits > 1 ? 2 : 1);
    await copyFile(file, join(dir, 'q.qcow2'));
    await copyFile(file, join(dir, 'o.qcow2'));
    const theirFix = await check(dir, 'qemu-img', 'q.qcow2', true);
    const ourFix = await check(dir, 'qcow', 'o.qcow2', true);
    assert.equal(ourFix.code, theirFix.code);
    assert.deepEqual(ourFix.json, theirFix.json);
    assert.deepEqual(ourFix.kinds, theirFix.kinds);
    const after = await check(dir, 'qemu-img', 'o.qcow2');
    assert.equal(after.code, 0);
    assert.equal(await qemuGuestSha256(['-f', 'qcow2', join(dir, 'o.qcow2')]), before);
  });
}
