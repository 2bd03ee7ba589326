/**
 * The native copy loop of plain converts into raw (ops/native-copy.ts, native/copy_loop.c) against
 * the TypeScript loop it stands in for: the same bytes and the same holes for every kind of item
 * (holes, zero blocks inside data, compressed clusters the loop leaves to TypeScript, a backing
 * chain, -S sizes, -n into an existing file), a failed write mid-copy as one error line, progress
 * to the end.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { BlockDevice } from '#src/core/block-device.js';
import { hostAddon } from '#src/host/native.node.js';
import { createImage, openImage } from '#src/node-open.js';
import { convert, type ConvertOptions } from '#src/ops/convert.js';
import { NativeCopy } from '#src/ops/native-copy.js';
import { needs, qcow, qemuImg, qemuIo, randomBytes, run, scratch, QCOW_BIN } from '../support/qemu.js';

const MiB = 2 ** 20;
const withLoop = hostAddon()?.copyExtents ? {} : { skip: 'the host addon is not loaded (QCOW_NO_NATIVE=1 or not built): no native copy loop' };

/**
 * A raw file of 24 MiB and 1.5 KiB (three 8 MiB items and a short one) with every kind of range:
 * holes (1 MiB, and a whole 8 MiB item), zeros written as data (64 KiB, one 4 KiB block, 512
 * bytes inside a block), data up to the odd end.
 */
async function mixedRaw(dir: string): Promise<string> {
  const path = join(dir, 'mixed.raw');
  const size = 24 * MiB + 1536;
  const fh = await open(path, 'w');
  try {
    await fh.truncate(size);
    const data = randomBytes(8 * MiB, 7);
    data.fill(0, 3 * MiB, 3 * MiB + 64 * 1024);
    data.fill(0, 5 * MiB + 4096, 5 * MiB + 8192);
    data.fill(0, 6 * MiB + 1024, 6 * MiB + 1536);
    await fh.write(data.subarray(0, 2 * MiB), 0, 2 * MiB, 0);
    await fh.write(data.subarray(3 * MiB), 0, 5 * MiB, 3 * MiB);
    // 8-16 MiB: a hole; 16 MiB to the end: data again.
    await fh.write(data, 0, 8 * MiB, 16 * MiB);
    await fh.write(randomBytes(1536, 9), 0, 1536, 24 * MiB);
  } finally {
    await fh.close();
  }
  return path;
}

async function mapOf(path: string): Promise<string> {
  return (await qemuImg(['map', '--output=json', '-f', 'raw', path])).stdout;
}

/** Count the runs the loop wrote into `target` (the raw store's wroteDirectly). */
async function spyLoop(target: BlockDevice): Promise<{ runs: number }> {
  const seen = { runs: 0 };
  const [whole] = await target.plainExtents!(0, target.size);
  const store = whole!.store!;
  const wrote = store.wroteDirectly!.bind(store);
  Object.defineProperty(store, 'wroteDirectly', {
    value: (offset: number, length: number) => {
      seen.runs++;
      wrote(offset, length);
    },
  });
  return seen;
}

/**
 * The mixed raw image opened as a source, a new raw file of its size as the target (watched by
 * spyLoop), both closed when the test ends.
 */
async function mixedIntoNewRaw(t: { after(fn: () => Promise<void>): void }, dir: string, name: string): Promise<{ src: BlockDevice; dst: BlockDevice; spy: { runs: number } }> {
  const src = await openImage(await mixedRaw(dir), { format: 'raw', readOnly: true });
  t.after(() => src.close());
  await createImage(join(dir, name), { format: 'raw', size: src.size });
  const dst = await openImage(join(dir, name), { format: 'raw' });
  t.after(() => dst.close());
  return { src, dst, spy: await spyLoop(dst) };
}

/**
 * Convert `source` into a new raw file twice: as a plain copy (the native loop) and with the same
 * item size asked for explicitly (`chunkSize`, which keeps convert on the TypeScript loop); `fill`
 * pre-fills the targets for a copy into an existing file (-n). Both files, and how many runs the
 * loop wrote.
 */
async function both(dir: string, source: string, format: string, options: ConvertOptions, fill?: number): Promise<{ native: string; script: string; runs: number }> {
  const out: string[] = [];
  let runs = 0;
  for (const [name, extra] of [
    ['native.raw', {}],
    ['script.raw', { chunkSize: 8 * MiB, parallel: 2 }],
  ] as const) {
    const path = join(dir, name);
    await using src = await openImage(source, { format, readOnly: true });
    if (fill === undefined) await createImage(path, { format: 'raw', size: src.size });
    else await writeFile(path, new Uint8Array(src.size).fill(fill));
    await using dst = await openImage(path, { format: 'raw' });
    const spy = await spyLoop(dst);
    await convert([src], dst, { targetIsZero: fill === undefined, ...options, ...extra });
    await dst.flush();
    if (name === 'native.raw') runs = spy.runs;
    else assert.equal(spy.runs, 0, 'an asked chunkSize keeps the TypeScript loop');
    out.push(path);
  }
  return { native: out[0]!, script: out[1]!, runs };
}

async function assertSame(r: { native: string; script: string; runs: number }, source?: string): Promise<void> {
  assert.ok(r.runs > 0, 'the native loop wrote');
  assert.ok(Buffer.compare(await readFile(r.native), await readFile(r.script)) === 0, 'same bytes');
  assert.equal(await mapOf(r.native), await mapOf(r.script), 'same holes');
  if (source) assert.ok(Buffer.compare(await readFile(r.native), await readFile(source)) === 0, 'the source\'s bytes');
}

test('native loop and TypeScript loop write the same bytes and leave the same holes: raw with holes and zero blocks, any -S', { ...withLoop, ...needs('qemu-img') }, async (t) => {
  const dir = await scratch(t);
  const src = await mixedRaw(dir);
  for (const sparseSize of [undefined, 0, 512, 64 * 1024, 3 * MiB]) {
    await t.test(`-S ${sparseSize ?? 'default'}`, async () => assertSame(await both(dir, src, 'raw', { sparseSize }), src));
  }
});

test('native loop and TypeScript loop agree on -n into an existing file: zeros are made where the source has them', { ...withLoop, ...needs('qemu-img') }, async (t) => {
  const dir = await scratch(t);
  const src = await mixedRaw(dir);
  for (const sparseSize of [undefined, 0, 64 * 1024]) {
    await t.test(`-S ${sparseSize ?? 'default'}`, async () => assertSame(await both(dir, src, 'raw', { sparseSize }, 0xa5), src));
  }
});

test('a qcow2 chain with compressed clusters: plain items go through the loop, the rest through TypeScript, the same file', { ...withLoop, ...needs('qemu-img', 'qemu-io') }, async (t) => {
  const dir = await scratch(t);
  const raw = await mixedRaw(dir);
  // The base compressed, a middle layer of plain clusters over part of it, a top of 4 KiB clusters
  // with zero writes and data over both.
  await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, join(dir, 'base.qcow2')]);
  await qemuImg(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'mid.qcow2')]);
  await qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'mid.qcow2', '-F', 'qcow2', join(dir, 'top.qcow2')]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x11 0 8M', '-c', 'write -P 0x22 17M 3M', '-c', 'write -z 10M 1M', join(dir, 'mid.qcow2')]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x33 1M 1M', '-c', 'write -z 2M 64k', '-c', 'write -P 0 4M 4k', '-c', 'write -P 0x44 18M 12k', join(dir, 'top.qcow2')]);
  const r = await both(dir, join(dir, 'top.qcow2'), 'qcow2', {});
  await assertSame(r);
  const whole = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', join(dir, 'top.qcow2'), r.native]);
  assert.equal(whole.code, 0, whole.stdout + whole.stderr);
});

test('the loop is taken only for a raw target whose file it can write', withLoop, async (t) => {
  const dir = await scratch(t);
  await createImage(join(dir, 't.raw'), { format: 'raw', size: MiB });
  await createImage(join(dir, 't.qcow2'), { format: 'qcow2', size: MiB });
  await using raw = await openImage(join(dir, 't.raw'), { format: 'raw' });
  await using q = await openImage(join(dir, 't.qcow2'), { format: 'qcow2' });
  await using ro = await openImage(join(dir, 't.raw'), { format: 'raw', readOnly: true });
  assert.ok(await NativeCopy.for(raw, 4096, true, 8 * MiB));
  assert.equal(await NativeCopy.for(q, 4096, true, 8 * MiB), undefined);
  assert.equal(await NativeCopy.for(ro, 4096, true, 8 * MiB), undefined);
});

test('progress reaches the total through the loop', withLoop, async (t) => {
  const { src, dst, spy } = await mixedIntoNewRaw(t, await scratch(t), 'p.raw');
  let last: [number, number] = [0, -1];
  await convert([src], dst, { targetIsZero: true, onProgress: (done, total) => (last = [done, total]) });
  assert.ok(spy.runs > 0);
  assert.equal(last[0], last[1]);
  assert.ok(last[1] > 8 * MiB);
});

test('a write failing mid-copy (EFBIG past the file size limit) is one error line and exit 1, as without the loop', { ...needs('qemu-img'), skip: process.platform !== 'linux' }, async (t) => {
  const dir = await scratch(t);
  const src = join(dir, 's.raw');
  await writeFile(src, randomBytes(16 * MiB, 3));
  const results = [];
  for (const noNative of ['0', '1']) {
    const dst = join(dir, `d${noNative}.raw`);
    // Made whole first: under the limit ftruncate would fail before any copy.
    await writeFile(dst, new Uint8Array(0));
    const fh = await open(dst, 'r+');
    await fh.truncate(16 * MiB);
    await fh.close();
    const r = await run('sh', ['-c', 'ulimit -f 4096; exec "$0" "$@"', QCOW_BIN, 'convert', '-n', '-f', 'raw', '-O', 'raw', src, dst], { env: { ...process.env, QCOW_NO_NATIVE: noNative } });
    results.push(r);
    assert.equal(r.code, 1, r.stderr);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, /EFBIG/);
  }
  assert.equal(results[0]!.stderr, results[1]!.stderr.replaceAll('d1.raw', 'd0.raw'));
  // The CLI through the same loop copies the whole file when nothing stops it.
  const ok = await qcow(['convert', '-f', 'raw', '-O', 'raw', src, join(dir, 'whole.raw')]);
  assert.equal(ok.code, 0, ok.stderr);
  assert.ok(Buffer.compare(await readFile(src), await readFile(join(dir, 'whole.raw'))) === 0);
});

test('an abort stops the loop between items with QCOW_ABORTED', withLoop, async (t) => {
  const { src, dst, spy } = await mixedIntoNewRaw(t, await scratch(t), 'a.raw');
  const stop = new AbortController();
  await assert.rejects(
    convert([src], dst, { targetIsZero: true, signal: stop.signal, onProgress: (done) => done > 0 && stop.abort() }),
    (e: unknown) => e instanceof Error && (e as { code?: string }).code === 'QCOW_ABORTED',
  );
  assert.ok(spy.runs > 0);
});

test('a qcow (v1) chain takes the loop for its normal clusters (plainExtents), compressed ones through TypeScript, the same file', { ...withLoop, ...needs('qemu-img', 'qemu-io') }, async (t) => {
  const dir = await scratch(t);
  const raw = await mixedRaw(dir);
  // qemu 7.2's convert -c -O qcow exits 1 after writing a correct image (docs/notes/qcow1.md §9).
  await run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow', raw, join(dir, 'base.qcow')]);
  await qemuImg(['create', '-f', 'qcow', '-b', 'base.qcow', '-F', 'qcow', join(dir, 'top.qcow')]);
  await qemuIo(['-f', 'qcow', '-c', 'write -P 0x11 0 8M', '-c', 'write -P 0x22 17M 3M', '-c', 'write -P 0 4M 4k', '-c', 'write -P 0x33 9M 12k', join(dir, 'top.qcow')]);
  const r = await both(dir, join(dir, 'top.qcow'), 'qcow', {});
  await assertSame(r);
  const whole = await run('qemu-img', ['compare', '-f', 'qcow', '-F', 'raw', join(dir, 'top.qcow'), r.native]);
  assert.equal(whole.code, 0, whole.stdout + whole.stderr);
  // A plain qcow image, every cluster normal: the whole copy through the loop, the source's bytes.
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow', raw, join(dir, 'plain.qcow')]);
  await assertSame(await both(dir, join(dir, 'plain.qcow'), 'qcow', {}), raw);
});
