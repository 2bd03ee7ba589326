/**
 * Hostile and broken qcow2 images: each must fail with one clean QcowError naming the problem,
 * never a crash, a hang or a huge allocation. Images are qemu-made, then patched in memory.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { MemoryStore } from '#src/storage/memory.js';
import { isQcowError, type QcowErrorCode } from '#src/core/errors.js';
import { needs, qemuImg, qemuIo, scratch } from '../../support/qemu.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';

const setU32 = (b: Uint8Array, off: number, v: number) => new DataView(b.buffer, b.byteOffset).setUint32(off, v);
const setU64 = (b: Uint8Array, off: number, v: bigint) => new DataView(b.buffer, b.byteOffset).setBigUint64(off, v);
const getU64 = (b: Uint8Array, off: number) => new DataView(b.buffer, b.byteOffset).getBigUint64(off);

async function openAndReadAll(bytes: Uint8Array, readOnly = true): Promise<void> {
  const dev = await Qcow2Device.open(new MemoryStore(bytes, { name: 'hostile.qcow2', readOnly }), { readOnly });
  try {
    const buf = new Uint8Array(dev.size);
    await dev.read(0, buf);
  } finally {
    await dev.close();
  }
}

function rejectsWith(code: QcowErrorCode, pattern: RegExp) {
  return (e: unknown) => {
    assert.ok(isQcowError(e), `expected a QcowError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, pattern);
    assert.ok(!e.message.includes('\n'), 'one line');
    return true;
  };
}

test('hostile qcow2 headers and tables give clean QcowErrors', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  // 64 KiB clusters: header at 0, refcount table 0x10000, refcount block 0x20000, L1 0x30000, L2 0x40000, data 0x50000
  await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'a.qcow2'), '4M'], dir);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0xab 0 64k', join(dir, 'a.qcow2')]);
  await qemuImg(['convert', '-c', '-O', 'qcow2', join(dir, 'a.qcow2'), join(dir, 'c.qcow2')]);
  const good = new Uint8Array(await readFile(join(dir, 'a.qcow2')));
  const compressed = new Uint8Array(await readFile(join(dir, 'c.qcow2')));
  await openAndReadAll(good); // the unpatched image reads fine
  await openAndReadAll(compressed);
  const patched = (src: Uint8Array, patch: (b: Uint8Array) => void) => {
    const b = src.slice();
    patch(b);
    return b;
  };
  const l1Off = Number(getU64(good, 40));
  const l2Off = Number(getU64(good, l1Off) & 0x00fffffffffffe00n);

  await t.test('an unknown incompatible feature bit is refused, named from the feature table', async () => {
    // Rename the table's "extended L2 entries" entry to describe bit 9 instead, and set bit 9.
    const b = patched(good, (b) => setU64(b, 72, 1n << 9n));
    const tableAt = 112 + 8;
    for (let i = 0; i < 8; i++) if (b[tableAt + i * 48] === 0 && b[tableAt + i * 48 + 1] === 4) b[tableAt + i * 48 + 1] = 9;
    await assert.rejects(openAndReadAll(b), rejectsWith('QCOW_UNSUPPORTED', /Unsupported qcow2 feature\(s\): extended L2 entries/));
    const unnamed = patched(good, (b) => setU64(b, 72, 1n << 20n));
    await assert.rejects(openAndReadAll(unnamed), rejectsWith('QCOW_UNSUPPORTED', /Unknown incompatible feature: 100000/));
    // Several bits: the named ones in the table's order, the rest as one mask (as qemu words it).
    const several = patched(good, (b) => {
      setU64(b, 72, (1n << 20n) | (1n << 9n) | (1n << 40n));
      for (let i = 0; i < 8; i++) if (b[tableAt + i * 48] === 0 && b[tableAt + i * 48 + 1] === 4) b[tableAt + i * 48 + 1] = 9;
    });
    await assert.rejects(openAndReadAll(several), rejectsWith('QCOW_UNSUPPORTED', /feature\(s\): extended L2 entries, Unknown incompatible feature: 10000100000$/));
  });

  await t.test('a feature table is read as qemu reads it: a short last entry padded with zeros, an empty name ends it', async () => {
    // Replace the table (extension at 112) with one 14-byte entry naming bit 63, then an entry
    // with an empty name (the end), then one that would name bit 62 if it were read.
    const b = patched(good, (b) => {
      setU64(b, 72, (1n << 63n) | (1n << 62n));
      const len = new DataView(b.buffer).getUint32(116);
      b.fill(0, 120, 120 + len);
      b.set([0, 63, ...new TextEncoder().encode('Test feature')], 120);
      b.set([0, 62, ...new TextEncoder().encode('after the end')], 120 + 96);
    });
    await assert.rejects(openAndReadAll(b), rejectsWith('QCOW_UNSUPPORTED', /feature\(s\): Test feature, Unknown incompatible feature: 4000000000000000$/));
  });

  await t.test('header_length too small or unaligned', async () => {
    await assert.rejects(openAndReadAll(patched(good, (b) => setU32(b, 100, 100))), rejectsWith('QCOW_CORRUPT', /header too short/));
    await assert.rejects(openAndReadAll(patched(good, (b) => setU32(b, 100, 113))), rejectsWith('QCOW_CORRUPT', /multiple of 8/));
  });

  await t.test('cluster_bits and version out of range', async () => {
    await assert.rejects(openAndReadAll(patched(good, (b) => setU32(b, 20, 22))), rejectsWith('QCOW_CORRUPT', /cluster size/));
    await assert.rejects(openAndReadAll(patched(good, (b) => setU32(b, 4, 4))), rejectsWith('QCOW_UNSUPPORTED', /version 4/));
  });

  await t.test('L1 table offset past EOF', async () => {
    await assert.rejects(openAndReadAll(patched(good, (b) => setU64(b, 40, 0x100000000n))), rejectsWith('QCOW_CORRUPT', /L1 table .* outside the file/));
  });

  await t.test('huge l1_size is refused before anything is allocated', async () => {
    await assert.rejects(openAndReadAll(patched(good, (b) => setU32(b, 36, 0xffffffff))), rejectsWith('QCOW_CORRUPT', /limit/));
    // Within qemu's limit but far beyond the file.
    await assert.rejects(openAndReadAll(patched(good, (b) => setU32(b, 36, 1 << 20))), rejectsWith('QCOW_CORRUPT', /outside the file/));
  });

  await t.test('virtual size larger than the L1 table covers', async () => {
    await assert.rejects(openAndReadAll(patched(good, (b) => setU64(b, 24, 1n << 40n))), rejectsWith('QCOW_CORRUPT', /L1 table is too small/));
  });

  await t.test('L1 entry pointing past EOF', async () => {
    await assert.rejects(openAndReadAll(patched(good, (b) => setU64(b, l1Off, 0x8000000100000000n))), rejectsWith('QCOW_CORRUPT', /beyond the end of the file/));
  });

  await t.test('L2 entry pointing past EOF, or misaligned', async () => {
    await assert.rejects(openAndReadAll(patched(good, (b) => setU64(b, l2Off, 0x8000000100000000n))), rejectsWith('QCOW_CORRUPT', /beyond the end of the file/));
    await assert.rejects(openAndReadAll(patched(good, (b) => setU64(b, l2Off, 0x8000000000050200n))), rejectsWith('QCOW_CORRUPT', /^Cluster allocation offset 0x50200 unaligned \(L2 offset: 0x40000, L2 index: 0\)$/));
  });

  await t.test('a bad compressed cluster descriptor (garbage stream, or past EOF)', async () => {
    const cl1 = Number(getU64(compressed, 40));
    const cl2 = Number(getU64(compressed, cl1) & 0x00fffffffffffe00n);
    const entry = getU64(compressed, cl2);
    assert.equal(entry >> 62n, 1n, 'the first cluster is compressed');
    // Point the stream at the header: not a deflate stream that yields a cluster.
    await assert.rejects(openAndReadAll(patched(compressed, (b) => setU64(b, cl2, (1n << 62n) | 8n))), rejectsWith('QCOW_CORRUPT', /compressed cluster/));
    await assert.rejects(openAndReadAll(patched(compressed, (b) => setU64(b, cl2, (1n << 62n) | 0x3fffffffffn))), rejectsWith('QCOW_CORRUPT', /beyond the end of the file/));
  });

  await t.test('backing file name outside the first cluster', async () => {
    const b = patched(good, (b) => {
      setU64(b, 8, 0xfff0n);
      setU32(b, 16, 100);
    });
    await assert.rejects(openAndReadAll(b), rejectsWith('QCOW_CORRUPT', /backing file name/));
  });

  await t.test('a header extension longer than the header area', async () => {
    await assert.rejects(openAndReadAll(patched(good, (b) => setU32(b, 116, 0x100000))), rejectsWith('QCOW_CORRUPT', /extension/));
  });

  await t.test("an extension's own 8 bytes cut by the backing file name (qemu: Header extension too large)", async () => {
    const b = patched(good, (b) => {
      setU64(b, 8, 116n);
      setU32(b, 16, 4);
    });
    await assert.rejects(openAndReadAll(b), rejectsWith('QCOW_CORRUPT', /extension at 0x70 runs past the header area/));
  });

  await t.test('the corrupt bit refuses read-write but reads read-only', async () => {
    const b = patched(good, (b) => setU64(b, 72, 2n));
    await openAndReadAll(b, true);
    await assert.rejects(openAndReadAll(b, false), rejectsWith('QCOW_CORRUPT', /corrupt.*read\/write/));
  });
});
