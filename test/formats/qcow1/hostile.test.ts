/**
 * Broken and hostile images: each gives one QcowError naming the structure, never a crash, a hang,
 * a huge allocation or a changed file.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qcow, scratch } from '../../support/qemu.js';
import { QcowError } from '#src/core/errors.js';
import { MemoryStore } from '#src/storage/memory.js';
import { createQcow1 } from '#src/formats/qcow1/create.js';
import { Qcow1Device } from '#src/formats/qcow1/device.js';
import { qcowFormat } from '#src/formats/qcow1/index.js';

async function image(size = 1 << 20, fill?: (dev: Qcow1Device) => Promise<void>): Promise<Uint8Array> {
  const store = new MemoryStore();
  await createQcow1(store, { size });
  if (fill) {
    const dev = await Qcow1Device.open(store);
    await fill(dev);
    await dev.close();
  }
  return store.bytes();
}

function setU64(b: Uint8Array, off: number, v: bigint): Uint8Array {
  new DataView(b.buffer, b.byteOffset).setBigUint64(off, v);
  return b;
}

async function expectError(bytes: Uint8Array, code: string, pattern: RegExp, action: (dev: Qcow1Device) => Promise<unknown> = async () => undefined): Promise<void> {
  const store = new MemoryStore(bytes);
  const before = store.bytes();
  await assert.rejects(
    (async () => action((await qcowFormat.open(store)) as Qcow1Device))(),
    (e: unknown) => e instanceof QcowError && e.code === code && pattern.test(e.message) && !e.message.includes('\n'),
  );
  assert.deepEqual(store.bytes(), before, 'the image is unchanged');
}

test('header: bad version, cluster_bits out of range, L1 past EOF, huge size, long backing name', async () => {
  const good = await image();
  const v = good.slice();
  v[7] = 2;
  await expectError(v, 'QCOW_UNSUPPORTED', /version 2/);
  const cb = good.slice();
  cb[32] = 30;
  await expectError(cb, 'QCOW_CORRUPT', /cluster_bits 30/);
  await expectError(setU64(good.slice(), 40, 0x10000000n), 'QCOW_CORRUPT', /l1_table_offset.*past the end/);
  // A size whose L1 table would be 1 GiB, in a 560-byte file: refused before any allocation.
  await expectError(setU64(good.slice(), 24, 2n ** 48n), 'QCOW_CORRUPT', /L1 table.*past the end/);
  await expectError(setU64(good.slice(), 24, 2n ** 62n), 'QCOW_UNSUPPORTED', /too large/);
  const name = good.slice();
  setU64(name, 8, 48n);
  new DataView(name.buffer).setUint32(16, 5000);
  await expectError(name, 'QCOW_CORRUPT', /backing file name too long/);
  await expectError(good.slice(0, 20), 'QCOW_BAD_MAGIC', /not in qcow format/);
});

test('L2 entries: unaligned cluster offset, garbage compressed data', async () => {
  const written = await image(1 << 20, (d) => d.write(0, new Uint8Array(4096).fill(1)));
  // L1[0] = 0x1000; L2[0] at 0x1000
  await expectError(setU64(written.slice(), 0x1000, 0x2001n), 'QCOW_CORRUPT', /guest cluster 0: .*not a multiple of 512/, (d) => d.read(0, new Uint8Array(1)));
  const garbage = setU64(written.slice(), 0x1000, 0x8000000000000000n | (100n << 51n) | 0x30n); // "compressed" L1 bytes
  await expectError(garbage, 'QCOW_CORRUPT', /compressed cluster at 0x30/, (d) => d.read(0, new Uint8Array(1)));
});

test('writes through entries that point outside the data area are refused', async () => {
  const written = await image(1 << 20, (d) => d.write(0, new Uint8Array(4096).fill(1)));
  // L1[0] at 0x30 = 0x1000 (the L2 table); L2[0] at 0x1000 = 0x2000 (the data)
  const write = (d: Qcow1Device) => d.write(0, new Uint8Array(10));
  await expectError(setU64(written.slice(), 0x1000, 0x1000n), 'QCOW_CORRUPT', /guest cluster 0: .*overlaps the L2 table at 0x1000; refusing to write/, write);
  await expectError(setU64(written.slice(), 0x1000, 0x100000000000n), 'QCOW_CORRUPT', /outside the data area .*; refusing to write/, write);
  // An L2 table inside the header decodes to nonsense entries: corrupt for reads and writes.
  await expectError(setU64(written.slice(), 0x30, 0x8n), 'QCOW_CORRUPT', /L2 table at 0x8 is outside/, write);
  await expectError(setU64(written.slice(), 0x30, 0x8n), 'QCOW_CORRUPT', /guest cluster 3: .*too large/, (d) => d.read(3 * 4096, new Uint8Array(1)));
  // An L2 table far past the end of the file reads as unallocated (as in QEMU), but is never written.
  const farL2 = setU64(written.slice(), 0x30, 0x100000000000n);
  const dev = await qcowFormat.open(new MemoryStore(farL2));
  const b = new Uint8Array(16);
  await dev.read(0, b);
  assert.ok(b.every((x) => x === 0));
  await expectError(farL2, 'QCOW_CORRUPT', /L1 entry 0: L2 table at 0x100000000000 is outside/, write);
});

test('the CLI reports a broken image in one line with exit status 3', async (t) => {
  const dir = await scratch(t);
  const bad = await image();
  bad[32] = 30; // cluster_bits
  await writeFile(join(dir, 'bad.qcow'), bad);
  for (const args of [['info', 'bad.qcow'], ['map', 'bad.qcow'], ['io', '-c', 'read 0 512', 'bad.qcow'], ['convert', '-O', 'raw', 'bad.qcow', 'out.raw']]) {
    const r = await qcow(args, { cwd: dir });
    assert.equal(r.code, 3, args.join(' '));
    assert.equal(r.stderr, 'qcow: bad.qcow: header cluster_bits 30 is out of range: the cluster size must be between 512 and 64k\n', args.join(' '));
  }
  assert.deepEqual(new Uint8Array(await readFile(join(dir, 'bad.qcow'))), bad);
});
