/**
 * Writable opens cache L2 slices (4 KiB), not whole tables: writes, zero writes, discards,
 * compressed writes and snapshots spread over many slices of many tables, with a cache of a few
 * slices (so they are evicted and reloaded all the time), leave an image qemu reads as a raw
 * model of the same operations, `qemu-img check` clean, snapshots intact. Discards free clusters
 * that new L2 tables then reuse: their slices not written yet must read as empty, not as the
 * cluster's old bytes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { open as openFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { FileStore } from '#src/storage/file.node.js';
import type { ByteStore } from '#src/storage/types.js';
import { needs, qemuImg, randomBytes, run, runOk, scratch } from '../../support/qemu.js';

const GiB = 2 ** 30;

async function qemuCheckClean(file: string): Promise<void> {
  const r = await run('qemu-img', ['check', file]);
  assert.equal(r.code, 0, `qemu-img check ${file}: ${r.stdout}${r.stderr}`);
}

async function qemuSame(qcow2: string, raw: string): Promise<void> {
  const r = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, raw]);
  assert.equal(r.code, 0, `qemu-img compare: ${r.stdout}${r.stderr}`);
}

/**
 * The image opened writable with a cache of 8 slices (nearly every request evicts and reloads
 * one), through a store that cannot punch holes: freed clusters keep their old bytes, as on a
 * filesystem without hole punching, so a new L2 table in one is not zeros unless we make it so.
 */
async function openNoPunch(path: string): Promise<Qcow2Device> {
  const store = await FileStore.open(path);
  const noPunch = new Proxy(store, {
    get(target, prop) {
      if (prop === 'punchHole') return undefined;
      const v = Reflect.get(target, prop, target) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  }) as ByteStore;
  return Qcow2Device.open(noPunch, { cacheBytes: 8 * 4096 });
}

interface Config {
  opts: string;
  size: number;
}

const CONFIGS: Config[] = [
  { opts: 'cluster_size=64k', size: 8 * GiB },
  { opts: 'cluster_size=2M', size: 2048 * GiB },
  { opts: 'cluster_size=64k,extended_l2=on', size: 8 * GiB },
  { opts: 'cluster_size=32k,compat=0.10', size: 4 * GiB },
];

for (const { opts, size } of CONFIGS) {
  test(`writable L2 slices (${opts}): writes, zeros, discards, compressed writes, snapshots; qemu agrees, check clean`, needs('qemu-img'), async (t) => {
    const dir = await scratch(t);
    const img = join(dir, 'img.qcow2');
    const raw = join(dir, 'model.raw');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, img, String(size)]);
    await qemuImg(['create', '-q', '-f', 'raw', raw, String(size)]);
    const model = await openFile(raw, 'r+');
    let dev = await openNoPunch(img);
    const cs = dev.clusterSize;
    const v3 = !opts.includes('compat=0.10');
    let seed = 7;
    const rnd = (n: number) => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return seed % n;
    };
    const clusters = size / cs;
    const write = async (off: number, data: Uint8Array) => {
      await dev.write(off, data);
      await model.write(data, 0, data.length, off);
    };
    const zero = async (off: number, len: number) => {
      if (len <= 8 * cs) await model.write(new Uint8Array(len), 0, len, off);
      else await runOk('fallocate', ['-p', '-o', String(off), '-l', String(len), raw]);
    };
    // Phase one writes in the first half only, so phase two makes new tables there.
    const half = Math.floor(clusters / 2);
    const step = async (i: number, range = clusters - 4) => {
      const op = rnd(10);
      const c = rnd(range);
      if (op < 5) {
        const len = (1 + rnd(16)) * 4096;
        await write(c * cs + rnd(cs / 512) * 512, randomBytes(Math.min(len, size - c * cs - cs), i + 1));
      } else if (op < 7) {
        const len = (1 + rnd(3)) * cs;
        await dev.writeZeroes(c * cs, len);
        await zero(c * cs, len);
      } else if (op < 8) {
        const len = (1 + rnd(3)) * cs;
        await dev.discard(c * cs, len);
        // Whole clusters without a backing file: discarded clusters read as zeros.
        await zero(c * cs, len);
      } else if (op < 9 && v3) {
        // Compressible data, one or two clusters.
        const n = 1 + rnd(2);
        const data = new Uint8Array(n * cs).fill(0x30 + (i % 64));
        data.set(randomBytes(512, i + 3), 100);
        await dev.writeCompressed(c * cs, data);
        await model.write(data, 0, data.length, c * cs);
      } else {
        await write(c * cs, randomBytes(cs, i + 5));
      }
    };
    try {
      for (let i = 0; i < 150; i++) await step(i, half - 4);
      // Free every data cluster written so far: the new tables of phase two take those clusters,
      // full of old data, and their slices not written yet must still read as empty.
      await dev.flush();
      await dev.discard(0, half * cs);
      await zero(0, half * cs);
      await dev.flush();
      for (let i = 150; i < 250; i++) await step(i);
      await dev.createSnapshot('s1');
      // (sparse: the model is mostly holes)
      await runOk('cp', ['--sparse=always', raw, join(dir, 's1.raw')]);
      // After the snapshot every table is shared: the writes below copy them slice by slice.
      for (let i = 250; i < 400; i++) await step(i);
      await dev.flush();
      await dev.close();
      dev = await openNoPunch(img);
      for (let i = 400; i < 450; i++) await step(i);
    } finally {
      await dev.close();
      await model.close();
    }
    await qemuCheckClean(img);
    await qemuSame(img, raw);
    // The snapshot kept its content through the copies of its tables.
    await qemuImg(['snapshot', '-a', 's1', img]);
    await qemuCheckClean(img);
    await qemuSame(img, join(dir, 's1.raw'));
  });
}
