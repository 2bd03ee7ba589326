/**
 * Hostile images: valid images made by qemu-img, broken in random but replayable ways, must each
 * open, describe, map, read and convert either correctly or with a QcowError — never another
 * exception, a hang or an unbounded allocation. The seed is fixed so CI replays the same cases;
 * QCOW_FUZZ_RUNS and QCOW_FUZZ_SEED explore further on demand.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { randomMutation, seededRandom } from './mutate.js';
import { openImage } from '#src/node.js';
import { QcowError } from '#src/core/errors.js';
import { mapChain } from '#src/ops/map.js';
import { imageInfo } from '#src/ops/info.js';
import { bitmapRuns } from '#src/ops/changed-extents.js';
import type { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { decodeDirectory } from '#src/formats/qcow2/bitmaps/directory.js';
import { needs, qemuImg, qemuIo, randomBytes, scratch } from '../support/qemu.js';

interface Seed {
  file: string;
  format: string;
  headerSize: number;
  password?: string;
  /** Byte ranges the mutations aim at too (see randomMutation). */
  hot?: Array<[number, number]>;
}

/** Where an image's bitmap structures lie: the header extensions, the directory, every table. */
async function bitmapRegions(path: string): Promise<Array<[number, number]>> {
  const dev = (await openImage(path, { readOnly: true })) as Qcow2Device;
  try {
    const ext = dev.header.bitmaps!;
    const dir = new Uint8Array(ext.directorySize);
    await dev.store.read(ext.directoryOffset, dir);
    const regions: Array<[number, number]> = [
      [dev.header.headerLength, dev.header.headerLength + 256],
      [ext.directoryOffset, ext.directoryOffset + ext.directorySize],
    ];
    for (const e of decodeDirectory(dir, ext.nbBitmaps)) regions.push([e.tableOffset, e.tableOffset + e.tableSize * 8]);
    return regions;
  } finally {
    await dev.close();
  }
}

async function makeSeeds(dir: string): Promise<Seed[]> {
  const src = join(dir, 'src.raw');
  const data = new Uint8Array(1024 * 1024);
  data.fill(0xab, 0, 128 * 1024);
  data.set(randomBytes(64 * 1024, 3), 512 * 1024);
  await writeFile(src, data);
  const q = (args: string[]) => qemuImg(args, dir);
  await q(['convert', '-O', 'qcow2', '-o', 'cluster_size=4k', 'src.raw', 'v3.qcow2']);
  await q(['convert', '-O', 'qcow2', '-o', 'compat=0.10,cluster_size=4k', 'src.raw', 'v2.qcow2']);
  await q(['convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', 'src.raw', 'zlib.qcow2']);
  await q(['convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k,compression_type=zstd', 'src.raw', 'zstd.qcow2']);
  await q(['convert', '-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=16k', 'src.raw', 'xl2.qcow2']);
  await q(['convert', '-O', 'qcow2', '-o', 'cluster_size=4k', 'src.raw', 'snap.qcow2']);
  await q(['snapshot', '-c', 's1', 'snap.qcow2']);
  // Persistent bitmaps: an enabled one dirtied by writes, a disabled one merged from it, one at
  // the smallest granularity (its table and data span several clusters).
  await q(['convert', '-O', 'qcow2', '-o', 'cluster_size=4k', 'src.raw', 'bitmaps.qcow2']);
  await q(['bitmap', '--add', 'bitmaps.qcow2', 'on']);
  await q(['bitmap', '--add', '-g', '512', 'bitmaps.qcow2', 'fine']);
  await q(['bitmap', '--add', '--disable', 'bitmaps.qcow2', 'off']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x44 4k 8k', '-c', 'write -P 0x45 600k 100k', 'bitmaps.qcow2'], dir);
  await q(['bitmap', '--merge', 'on', 'bitmaps.qcow2', 'off']);
  await q(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'src.raw', '-F', 'raw', 'overlay.qcow2']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x33 8k 12k', 'overlay.qcow2'], dir);
  await q(['convert', '-O', 'qcow', 'src.raw', 'v1.qcow']);
  await q(['create', '-q', '-f', 'qcow', '-b', 'src.raw', '-F', 'raw', 'v1-back.qcow', '1M']);
  await qemuIo(['-f', 'qcow', '-c', 'write -P 0x22 4k 8k', 'v1-back.qcow'], dir);
  await qemuImg(['convert', '-c', '-O', 'qcow', 'src.raw', 'v1-zlib.qcow'], dir).catch(() => undefined); // qemu 7.2 exits 1 after success
  await q(['convert', '-O', 'qcow2', '--object', 'secret,id=s,data=hunter2', '-o', 'encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=100,cluster_size=4k', 'src.raw', 'luks.qcow2']);
  const v2 = { headerSize: 72 };
  const v3 = { headerSize: 112 };
  const v1 = { headerSize: 48 };
  return [
    { file: 'v3.qcow2', format: 'qcow2', ...v3 },
    { file: 'v2.qcow2', format: 'qcow2', ...v2 },
    { file: 'zlib.qcow2', format: 'qcow2', ...v3 },
    { file: 'zstd.qcow2', format: 'qcow2', ...v3 },
    { file: 'xl2.qcow2', format: 'qcow2', ...v3 },
    { file: 'snap.qcow2', format: 'qcow2', ...v3 },
    { file: 'overlay.qcow2', format: 'qcow2', ...v3 },
    { file: 'bitmaps.qcow2', format: 'qcow2', ...v3, hot: await bitmapRegions(join(dir, 'bitmaps.qcow2')) },
    { file: 'luks.qcow2', format: 'qcow2', password: 'hunter2', ...v3 },
    { file: 'v1.qcow', format: 'qcow', ...v1 },
    { file: 'v1-back.qcow', format: 'qcow', ...v1 },
    { file: 'v1-zlib.qcow', format: 'qcow', ...v1 },
  ];
}

/** Everything a user might do to an image read-only; returns normally or throws what it threw. */
async function exercise(path: string, seed: Seed, probe: boolean): Promise<void> {
  const dev = await openImage(path, { format: probe ? undefined : seed.format, readOnly: true, confineToFolder: true, password: seed.password });
  try {
    await imageInfo(dev);
    let extents = 0;
    for await (const e of mapChain(dev)) {
      assert.ok(e.length > 0 && e.start + e.length <= dev.size, 'map extents stay inside the image');
      if (++extents > 2000) break;
    }
    // Persistent bitmaps (qcow2): every run of each usable one, streamed (a mutant's table may
    // describe far more runs than the disk has granules to hold: the count is capped here).
    if (dev.format === 'qcow2') {
      for (const b of (await (dev as Qcow2Device).persistentBitmaps()).list()) {
        if (b.unusable) continue;
        let runs = 0;
        for await (const run of bitmapRuns(dev, b.name)) {
          assert.ok(run.length > 0 && run.offset + run.length <= dev.size, 'bitmap runs stay inside the disk');
          if (++runs > 100_000) break;
        }
      }
    }
    const buf = new Uint8Array(256 * 1024);
    const points = dev.size <= 4 * 1024 * 1024 ? Array.from({ length: Math.ceil(dev.size / buf.length) }, (_, i) => i * buf.length) : [0, dev.size / 2, dev.size - buf.length].map((x) => Math.max(0, Math.floor(x / 512) * 512));
    for (const off of points) await dev.read(off, buf.subarray(0, Math.min(buf.length, dev.size - off)));
  } finally {
    await dev.close();
  }
}

/** Writing to a damaged image must also end cleanly (it may refuse, but never throw anything else). */
async function exerciseWrites(path: string, seed: Seed): Promise<void> {
  const dev = await openImage(path, { format: seed.format, confineToFolder: true, password: seed.password });
  try {
    const data = new Uint8Array(70 * 1024).fill(0x5c);
    await dev.write(0, data.subarray(0, Math.min(data.length, dev.size)));
    if (dev.size > data.length) await dev.write(Math.floor((dev.size - data.length) / 2), data);
    await dev.writeZeroes(0, Math.min(dev.size, 8192));
    await dev.flush();
  } finally {
    await dev.close();
  }
}

const RUNS = Number(process.env.QCOW_FUZZ_RUNS ?? 300);
const SEED = Number(process.env.QCOW_FUZZ_SEED ?? 20261124);

test(`${RUNS} mutated images each give a clean result or a QcowError`, { ...needs('qemu-img', 'qemu-io'), timeout: 600_000 }, async (t) => {
  const dir = await scratch(t);
  const seeds = await makeSeeds(dir);
  const originals = new Map<string, Uint8Array>();
  // A plain Uint8Array copy: Buffer.slice() would share memory and let mutations pile up.
  for (const s of seeds) originals.set(s.file, new Uint8Array(await readFile(join(dir, s.file))));
  // The unmutated seeds must open cleanly: otherwise the fuzzer would only test the error path.
  for (const s of seeds) await exercise(join(dir, s.file), s, false);

  const r = seededRandom(SEED);
  const failures: string[] = [];
  let rssPeak = 0;
  const kinds = new Map<string, number>();
  for (let i = 0; i < RUNS; i++) {
    const seed = seeds[i % seeds.length]!;
    const m = randomMutation(r, seed.headerSize, seed.hot);
    const mutant = m.apply(originals.get(seed.file)!);
    const path = join(dir, `mutant-${seed.file}`);
    await writeFile(path, mutant);
    try {
      await exercise(path, seed, i % 5 === 0);
      if (i % 3 === 0) await exerciseWrites(path, seed);
      kinds.set('ok', (kinds.get('ok') ?? 0) + 1);
    } catch (e) {
      if (e instanceof QcowError) {
        kinds.set(e.code, (kinds.get(e.code) ?? 0) + 1);
        if (process.env.QCOW_FUZZ_VERBOSE) t.diagnostic(`case ${i} ${seed.file} ${m.describe}: ${e.code} ${e.message}`);
      }
      else failures.push(`case ${i} (${seed.file}: ${m.describe}): ${(e as Error)?.stack ?? e}`);
    }
    rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
  }
  t.diagnostic(`outcomes: ${JSON.stringify(Object.fromEntries(kinds))}; peak RSS ${(rssPeak / 2 ** 20).toFixed(0)} MiB`);
  assert.deepEqual(failures, []);
  // Bounded allocation: no mutant made us hold hundreds of MiB.
  assert.ok(rssPeak < 1024 * 2 ** 20, `peak RSS ${rssPeak}`);
});

test('a backing file that names itself, or a loop of two, is refused', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '1M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'b.qcow2', '-F', 'qcow2', 'a2.qcow2', '1M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'a2.qcow2', '-F', 'qcow2', 'b.qcow2', '1M'], dir);
  // qemu-img refuses the plain spelling; "./self.qcow2" is the same file.
  await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', './self.qcow2', '-F', 'qcow2', 'self.qcow2', '1M'], dir);
  for (const f of ['a2.qcow2', 'self.qcow2']) {
    await assert.rejects(openImage(join(dir, f), { readOnly: true }), (e: unknown) => e instanceof QcowError && /loop/.test(e.message));
  }
  // An image whose backing file lies outside its folder is refused when confinement is asked for.
  await copyFile(join(dir, 'a.qcow2'), join(dir, 'plain.qcow2'));
  await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/hostname', '-F', 'raw', 'escape.qcow2', '1M'], dir);
  await assert.rejects(openImage(join(dir, 'escape.qcow2'), { readOnly: true, confineToFolder: true }), (e: unknown) => e instanceof QcowError && /outside/.test(e.message));
});
