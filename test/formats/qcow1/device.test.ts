import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createCipheriv, createDecipheriv } from 'node:crypto';
import { QcowError } from '#src/core/errors.js';
import { MemoryStore } from '#src/storage/memory.js';
import { randomBytes } from '../../support/qemu.js';
import { createQcow1 } from '#src/formats/qcow1/create.js';
import { Qcow1Device } from '#src/formats/qcow1/device.js';
import { memImage, readAll, RecordingStore } from './qcow1.test.helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const isCode = (code: string) => (e: unknown) => e instanceof QcowError && e.code === code;

function u64At(b: Uint8Array, off: number): bigint {
  return new DataView(b.buffer, b.byteOffset).getBigUint64(off);
}

test('create lays the file out as qemu-img does (spec §3)', async () => {
  const cases: [number, string | undefined, number, number, number][] = [
    // size, backing, file size, L1 offset, cluster bits
    [1 * MiB, undefined, 560, 0x30, 12],
    [3 * MiB, undefined, 560, 0x30, 12],
    [1024 * MiB, undefined, 4144, 0x30, 12],
    [10240 * MiB, undefined, 41008, 0x30, 12],
    [1 * MiB, 'base.raw', 568, 0x38, 9],
    [1 * MiB, 'cbase.raw', 576, 0x40, 9],
  ];
  for (const [size, backingFile, fileSize, l1Offset, cb] of cases) {
    const store = new MemoryStore();
    await createQcow1(store, { size, backingFile, backingFormat: 'raw' });
    const b = store.bytes();
    assert.equal(b.length, fileSize, `file size for ${size} ${backingFile ?? ''}`);
    assert.equal(Number(u64At(b, 40)), l1Offset);
    assert.equal(b[32], cb);
    assert.equal(b[33], cb === 12 ? 9 : 12);
    if (backingFile) assert.equal(new TextDecoder().decode(b.subarray(48, 48 + backingFile.length)), backingFile);
  }
});

test('create rounds the size up to 512 and rejects what qcow cannot hold', async () => {
  const store = new MemoryStore();
  await createQcow1(store, { size: 1000 });
  assert.equal((await Qcow1Device.open(store)).size, 1024);
  await assert.rejects(createQcow1(new MemoryStore(), { size: 1 * MiB, options: { cluster_size: '64k' } }), /Invalid parameter 'cluster_size' for format qcow/);
  await assert.rejects(createQcow1(new MemoryStore(), { size: 1 * MiB, options: { 'encrypt.format': 'luks' } }), /only supports 'aes'/);
  await assert.rejects(createQcow1(new MemoryStore(), { size: 1 * MiB, options: { encryption: 'on' } }), isCode('QCOW_NEED_PASSWORD'));
  await assert.rejects(createQcow1(new MemoryStore(), { size: 1 * MiB, backingFile: 'x'.repeat(1024) }), /backing file name too long/);
  await assert.rejects(createQcow1(new MemoryStore(), { size: 513 * 2 ** 40 }), /Image too large/);
  await assert.rejects(createQcow1(new MemoryStore(), { size: 0 }), /too small/);
  const enc = new MemoryStore();
  await createQcow1(enc, { size: 1 * MiB, options: { encryption: 'on' }, password: 'hunter2' });
  assert.equal(enc.bytes()[39], 1, 'crypt_method = 1');
});

test('a write allocates L2 table and clusters at the end of the file, as in spec §10.1', async () => {
  const store = new MemoryStore();
  await createQcow1(store, { size: 1 * MiB });
  const dev = await Qcow1Device.open(store);
  await dev.write(128 * KiB, new Uint8Array(64 * KiB).fill(0xab));
  await dev.flush();
  const b = store.bytes();
  assert.equal(b.length, 73728);
  assert.equal(u64At(b, 0x30), 0x1000n); // L1[0]
  assert.equal(u64At(b, 0x1100), 0x2000n); // L2[32]
  assert.equal(u64At(b, 0x1178), 0x11000n); // L2[47]
  assert.equal(b[0x2000], 0xab);
});

test('writes of any alignment read back: straddling clusters and L2 tables, sub-sector, the last bytes', async () => {
  // 512-byte clusters and 64-entry L2 tables: one table maps 32 KiB, so boundaries are everywhere.
  const size = 200 * KiB;
  const { dev, reopen } = await memImage({ size, clusterBits: 9, l2Bits: 6 });
  const model = new Uint8Array(size);
  const writes: [number, number][] = [
    [100, 10], // inside one sector
    [511, 2], // across a cluster boundary
    [32 * KiB - 700, 1400], // across an L2 table boundary
    [64 * KiB - 3, 70 * KiB], // across several tables
    [size - 1, 1], // the very last byte
    [size - 4096, 4096],
    [0, 1], // the first byte, then over data already written
    [101, 3],
  ];
  let seed = 1;
  for (const [off, len] of writes) {
    const data = randomBytes(len, seed++);
    await dev.write(off, data);
    model.set(data, off);
    const back = new Uint8Array(len);
    await dev.read(off, back);
    assert.deepEqual(back, data, `read back [${off}, +${len})`);
  }
  assert.deepEqual(await readAll(dev), model);
  await dev.close();
  assert.deepEqual(await readAll(await reopen()), model, 'after reopening');
});

test('a partial write into a new cluster keeps the backing bytes around it (QEMU would zero them)', async () => {
  const backing = new Uint8Array(6 * KiB).fill(0x11); // shorter than the image
  const { dev } = await memImage({ size: 16 * KiB, clusterBits: 12, l2Bits: 9, backing });
  await dev.write(512, new Uint8Array(512).fill(0x22));
  await dev.write(5 * KiB, new Uint8Array(10).fill(0x33)); // in the cluster the backing file ends in
  const all = await readAll(dev);
  const expect = new Uint8Array(16 * KiB);
  expect.fill(0x11, 0, 6 * KiB);
  expect.fill(0x22, 512, 1024);
  expect.fill(0x33, 5 * KiB, 5 * KiB + 10);
  assert.deepEqual(all, expect);
  assert.deepEqual(
    (await dev.blockStatus(0, 16 * KiB)).map((e) => [e.offset, e.length, e.allocated, e.data]),
    [
      [0, 8192, true, true], // two new clusters, one after the other in the file
      [8192, 8192, false, false],
    ],
  );
});

test('reads of unallocated ranges come from the backing image, zeros past its end', async () => {
  const backing = randomBytes(3000, 7);
  const { dev } = await memImage({ size: 8 * KiB, clusterBits: 9, l2Bits: 12, backing });
  const all = await readAll(dev);
  assert.deepEqual(all.subarray(0, 3000), backing);
  assert.ok(all.subarray(3000).every((b) => b === 0));
});

test('compressed clusters: written whole, read back, overwritten partly and wholly', async () => {
  const cs = 4096;
  const { dev, store, reopen } = await memImage({ size: 6 * KiB }); // last cluster is 2 KiB
  await dev.writeCompressed!(0, new Uint8Array(cs).fill(0x66));
  await dev.writeCompressed!(cs, new Uint8Array(2 * KiB).fill(0x77)); // the short last cluster
  assert.ok(store.bytes().length < 560 + 4096 + 4096, 'stored small');
  let st = await dev.blockStatus(0, 6 * KiB);
  assert.deepEqual(
    st.map((e) => [e.offset, e.length, e.compressed, e.hostOffset]),
    [[0, 6 * KiB, true, undefined]], // no host offset for compressed data, so they merge as in qemu-img map
  );
  const all = await readAll(dev);
  assert.ok(all.subarray(0, cs).every((b) => b === 0x66));
  assert.ok(all.subarray(cs).every((b) => b === 0x77));

  // A partial overwrite turns the cluster into a normal one holding the old bytes around the new.
  await dev.write(100, new Uint8Array(10).fill(1));
  // A compressed write over a compressed cluster replaces it.
  await dev.writeCompressed!(cs, new Uint8Array(2 * KiB).fill(0x78));
  st = await dev.blockStatus(0, 6 * KiB);
  assert.equal(st[0]!.compressed, undefined);
  assert.equal(st[1]!.compressed, true);
  const expect = new Uint8Array(6 * KiB).fill(0x66);
  expect.fill(1, 100, 110);
  expect.fill(0x78, cs);
  assert.deepEqual(await readAll(dev), expect);
  await dev.close();
  assert.deepEqual(await readAll(await reopen()), expect);
});

test('a compressed write over normal data stores the data (QEMU 7.2 leaves deflate bytes)', async () => {
  const { dev } = await memImage({ size: 16 * KiB });
  await dev.write(0, randomBytes(4096, 3));
  await dev.writeCompressed!(0, new Uint8Array(4096).fill(0x44));
  assert.ok((await readAll(dev)).subarray(0, 4096).every((b) => b === 0x44));
});

test('a cluster that does not shrink is stored uncompressed', async () => {
  const { dev } = await memImage({ size: 16 * KiB });
  const data = randomBytes(4096, 9);
  await dev.writeCompressed!(8192, data);
  const [e] = await dev.blockStatus(8192, 4096);
  assert.equal(e!.compressed, undefined);
  assert.equal(typeof e!.hostOffset, 'number');
  const back = new Uint8Array(4096);
  await dev.read(8192, back);
  assert.deepEqual(back, data);
});

test('compressed writes must be whole aligned clusters', async () => {
  const { dev } = await memImage({ size: 16 * KiB });
  await assert.rejects(dev.writeCompressed!(512, new Uint8Array(4096)), isCode('QCOW_INVALID_ARGUMENT'));
  await assert.rejects(dev.writeCompressed!(0, new Uint8Array(512)), isCode('QCOW_INVALID_ARGUMENT'));
  await assert.rejects(dev.writeCompressed!(0, new Uint8Array(8192)), isCode('QCOW_INVALID_ARGUMENT'));
});

test('AES: the bytes on disk are those of spec §10.4 and read back as plaintext', async () => {
  const { dev, store, reopen } = await memImage({ size: 1 * MiB, password: 'hunter2' });
  await dev.write(128 * KiB, new Uint8Array(64 * KiB).fill(0xab));
  await dev.flush();
  const b = store.bytes();
  assert.equal(Buffer.from(b.subarray(0x2000, 0x2010)).toString('hex'), '4b7b9750174fb8803455041eb1f2559c');
  const plain = await readAll(dev);
  assert.ok(plain.subarray(128 * KiB, 192 * KiB).every((x) => x === 0xab));
  assert.ok(plain.subarray(0, 128 * KiB).every((x) => x === 0));
  // Sub-sector write into an existing encrypted cluster, and one into a new cluster: the rest of
  // the new cluster holds enciphered zeros, as QEMU writes it.
  await dev.write(128 * KiB + 5, new Uint8Array([1, 2, 3]));
  await dev.write(300 * KiB + 700, new Uint8Array([9]));
  await dev.flush();
  const again = await readAll(await reopen());
  const expect = new Uint8Array(1 * MiB);
  expect.fill(0xab, 128 * KiB, 192 * KiB);
  expect.set([1, 2, 3], 128 * KiB + 5);
  expect[300 * KiB + 700] = 9;
  assert.deepEqual(again, expect);
  const [e] = await dev.blockStatus(300 * KiB, 4096);
  assert.equal(e!.hostOffset, undefined, 'no host offset for enciphered data (as qemu-img map)');
});

test('AES sectors are AES-128-CBC with key = password bytes and IV = little-endian guest sector', async () => {
  const { dev, store } = await memImage({ size: 64 * KiB, password: 'hunter2' });
  await dev.write(4096 + 512, new Uint8Array(512).fill(0x5c));
  await dev.flush();
  const host = Number(u64At(store.bytes(), 0x30)) + 4096; // L2 table is one cluster, then the data
  const key = Buffer.from('hunter2\0\0\0\0\0\0\0\0\0', 'latin1');
  const decrypt = (sector: number, bytes: Uint8Array) => {
    const iv = Buffer.alloc(16);
    iv.writeBigUInt64LE(BigInt(sector));
    const d = createDecipheriv('aes-128-cbc', key, iv).setAutoPadding(false);
    return Buffer.concat([d.update(bytes), d.final()]);
  };
  const cluster = store.bytes().subarray(host, host + 4096);
  assert.ok(decrypt(9, cluster.subarray(512, 1024)).every((x) => x === 0x5c));
  assert.ok(decrypt(8, cluster.subarray(0, 512)).every((x) => x === 0), 'unwritten sector = enciphered zeros');
  const iv = Buffer.alloc(16);
  iv.writeBigUInt64LE(8n);
  const zeros = createCipheriv('aes-128-cbc', key, iv).setAutoPadding(false).update(Buffer.alloc(512));
  assert.deepEqual(Buffer.from(cluster.subarray(0, 512)), zeros);
});

test('AES without a password: open fails, except for inspection, which cannot read data', async () => {
  const { store } = await memImage({ size: 64 * KiB, password: 'x' });
  await assert.rejects(Qcow1Device.open(store), isCode('QCOW_NEED_PASSWORD'));
  const dev = await Qcow1Device.open(store, { inspectOnly: true, readOnly: true });
  assert.deepEqual(await dev.describe(), { format: 'qcow', virtualSize: 64 * KiB, clusterSize: 4096, encrypted: true });
  const withData = await memImage({ size: 64 * KiB, password: 'x' });
  await withData.dev.write(0, new Uint8Array(512).fill(1));
  await withData.dev.flush();
  const inspect = await Qcow1Device.open(withData.store, { inspectOnly: true, readOnly: true });
  await assert.rejects(inspect.read(0, new Uint8Array(512)), isCode('QCOW_NEED_PASSWORD'));
  // compressed clusters would be stored unencrypted, so they are refused
  await assert.rejects(withData.dev.writeCompressed!(4096, new Uint8Array(4096)), /Compression and encryption/);
});

test('a wrong password is not detectable (no check value): it reads garbage, as in QEMU', async () => {
  const { dev, reopen } = await memImage({ size: 64 * KiB, password: 'right' });
  await dev.write(0, new Uint8Array(512).fill(7));
  const wrong = await reopen({ password: 'wrong' });
  const b = new Uint8Array(512);
  await wrong.read(0, b);
  assert.ok(!b.every((x) => x === 7));
});

test('crash ordering: data and new L2 tables reach the disk, flushed, before anything links to them', async () => {
  let rec!: RecordingStore;
  const { dev } = await memImage({ size: 4 * MiB, wrap: (s) => (rec = new RecordingStore(s)) });
  const l1 = { lo: 48, hi: 48 + 8 * 2 };
  const l2 = { lo: 4096, hi: 8192 }; // the first table, allocated by the first write
  const check = async (label: string, write: () => Promise<void>, linkRanges = [l1, l2]) => {
    const isLink = (o: { offset: number; length: number }) => linkRanges.some((r) => o.offset < r.hi && o.offset + o.length > r.lo);
    rec.log.length = 0;
    await write();
    assert.ok(!rec.log.some((o) => o.kind === 'write' && isLink(o)), `${label}: no link before flush()`);
    await dev.flush();
    const log = rec.log;
    const firstLink = log.findIndex((o) => o.kind === 'write' && isLink(o));
    const lastData = log.findLastIndex((o) => o.kind === 'write' && !isLink(o));
    assert.ok(firstLink > 0, `${label}: a link was written`);
    assert.ok(lastData < firstLink, `${label}: all data before the first link`);
    assert.ok(log.slice(lastData + 1, firstLink).some((o) => o.kind === 'flush'), `${label}: a flush between data and links`);
    assert.equal(log[log.length - 1]!.kind, 'flush', `${label}: flush() ends with the links durable`);
  };
  // New L2 tables + clusters, two tables at once: only the L1 entries link them.
  await check('new tables', () => dev.write(2 * MiB - 4096, new Uint8Array(8192).fill(1)), [l1]);
  // Existing table: the L2 entries are the links.
  await check('existing table', () => dev.write(8192, new Uint8Array(100).fill(2)));
  await check('compressed', () => dev.writeCompressed!(16384, new Uint8Array(4096).fill(3)));
});

test('links are written in groups: many small writes, one flush', async () => {
  let rec!: RecordingStore;
  const { dev, reopen } = await memImage({ size: 4 * MiB, wrap: (s) => (rec = new RecordingStore(s)) });
  for (let i = 0; i < 100; i++) await dev.writeCompressed!(i * 4096, new Uint8Array(4096).fill(i + 1));
  assert.equal(rec.log.filter((o) => o.kind === 'flush').length, 0);
  await dev.close();
  assert.equal(rec.log.filter((o) => o.kind === 'flush').length, 2, 'one before the links, one after');
  const again = await reopen();
  const b = new Uint8Array(4096);
  await again.read(99 * 4096, b);
  assert.ok(b.every((x) => x === 100));
});

test('concurrent writes and reads: every write lands, readers see old or new bytes', async () => {
  const { dev, reopen } = await memImage({ size: 1 * MiB, clusterBits: 9, l2Bits: 6, cacheBytes: 512 });
  const model = new Uint8Array(1 * MiB);
  const jobs: Promise<void>[] = [];
  for (let i = 0; i < 200; i++) {
    const off = (i * 7919 * 13) % (1 * MiB - 3000);
    const len = 1 + ((i * 31) % 2500);
    const data = new Uint8Array(len).fill(1 + (i % 250));
    model.set(data, off); // writes complete in order (FIFO lock), so the model is applied in order
    jobs.push(dev.write(off, data));
    if (i % 10 === 0) {
      const probe = new Uint8Array(len);
      jobs.push(
        dev.read(off, probe).then(() => {
          assert.ok(probe.every((b, k) => b === 0 || b === probe[k]));
        }),
      );
    }
  }
  await Promise.all(jobs);
  assert.deepEqual(await readAll(dev), model);
  await dev.close();
  assert.deepEqual(await readAll(await reopen()), model);
});

test('write zeroes allocates nothing where the image already reads zeros', async () => {
  const { dev, store } = await memImage({ size: 1 * MiB });
  const before = store.bytes().length;
  await dev.writeZeroes(0, 64 * KiB);
  assert.equal(store.bytes().length, before);
  await dev.write(4096, new Uint8Array(4096).fill(5));
  await dev.writeZeroes(4096 + 100, 100);
  const b = new Uint8Array(4096);
  await dev.read(4096, b);
  assert.ok(b.subarray(100, 200).every((x) => x === 0) && b[99] === 5 && b[200] === 5);
  // over a backing file, zeros must be written to hide it
  const bk = await memImage({ size: 64 * KiB, clusterBits: 9, l2Bits: 12, backing: new Uint8Array(64 * KiB).fill(9) });
  await bk.dev.writeZeroes(1000, 3000);
  const all = await readAll(bk.dev);
  assert.ok(all.subarray(1000, 4000).every((x) => x === 0) && all[999] === 9 && all[4000] === 9);
  await assert.rejects(bk.dev.writeZeroes(0, 512, { fastOnly: true }), isCode('QCOW_UNSUPPORTED'));
});

test('a read-only image refuses writes', async () => {
  const { reopen } = await memImage({ size: 64 * KiB });
  const ro = await reopen({ readOnly: true });
  await assert.rejects(ro.write(0, new Uint8Array(1)), isCode('QCOW_READ_ONLY'));
  await assert.rejects(ro.writeCompressed!(0, new Uint8Array(4096)), isCode('QCOW_READ_ONLY'));
});

test('plainExtents: normal clusters as runs of the file (neighbours joined), compressed and unallocated ones without a store', async () => {
  const cs = 4096;
  const { dev, store } = await memImage({ size: 64 * KiB });
  // Clusters 0-2 written in one go (neighbours in the file), 3 unallocated, 4 compressed, 5 normal
  // again, the rest unallocated; one byte into cluster 1 makes the runs start mid-cluster.
  const data = randomBytes(3 * cs, 11);
  await dev.write(0, data);
  await dev.writeCompressed!(4 * cs, new Uint8Array(cs).fill(0x55));
  const five = randomBytes(cs, 12);
  await dev.write(5 * cs, five);
  const runs = await dev.plainExtents(1, 64 * KiB - 1);
  assert.deepEqual(
    runs.map((r) => [r.offset, r.length, r.store !== undefined]),
    [
      [1, 3 * cs - 1, true],
      [3 * cs, 2 * cs, false],
      [5 * cs, cs, true],
      [6 * cs, 64 * KiB - 6 * cs, false],
    ],
  );
  // The runs' bytes in the file are the guest's bytes.
  const file = store.bytes();
  assert.deepEqual(file.subarray(runs[0]!.hostOffset!, runs[0]!.hostOffset! + runs[0]!.length), data.subarray(1));
  assert.deepEqual(file.subarray(runs[2]!.hostOffset!, runs[2]!.hostOffset! + cs), five);
  assert.deepEqual(await dev.plainExtents(0, 0), []);
  await assert.rejects(dev.plainExtents(60 * KiB, 8 * KiB), isCode('QCOW_OUT_OF_RANGE'));
  await dev.close();
});

test('block status and reads tell entries apart as before the word-wise lookup: misaligned and huge normal entries are corrupt, compressed ones decode', async () => {
  const { dev, store, reopen } = await memImage({ size: 16 * KiB });
  await dev.write(0, new Uint8Array(4096).fill(1));
  await dev.writeCompressed!(4096, new Uint8Array(4096).fill(2));
  await dev.close();
  // The L2 table is the first cluster after the header and L1 table: find cluster 0's entry.
  const bytes = store.bytes();
  const dv = new DataView(bytes.buffer, bytes.byteOffset);
  const l1 = Number(dv.getBigUint64(40)); // l1_table_offset
  const l2 = Number(dv.getBigUint64(l1));
  assert.equal((await readAll(await reopen())).subarray(4096, 8192).every((b) => b === 2), true);
  for (const [entry, message] of [
    [dv.getBigUint64(l2) + 8n, /not a multiple of 512/],
    [1n << 60n, /too large/],
  ] as const) {
    const e = new Uint8Array(8);
    new DataView(e.buffer).setBigUint64(0, entry);
    await store.write(l2, e);
    const again = await reopen();
    await assert.rejects(again.read(0, new Uint8Array(4096)), message);
    await assert.rejects(again.blockStatus(0, 4096), message);
    await again.close();
  }
});
