import { test } from 'node:test';
import assert from 'node:assert/strict';
import { QcowError } from '#src/core/errors.js';
import { HEADER_SIZE, MAX_L1_SIZE, decodeHeader, encodeHeader, l1SizeOf, probeQcow1, virtualSizeOf, type QcowHeader } from '#src/formats/qcow1/header.js';
import { compressedEntry, decodeEntry } from '#src/formats/qcow1/l2-entry.js';

const base: QcowHeader = { backingFileOffset: 0, backingFileSize: 0, mtime: 0, size: 1 << 20, clusterBits: 12, l2Bits: 9, cryptMethod: 0, l1TableOffset: 48 };
const FILE = 560; // what qemu-img create makes for 1 MiB

function patched(fields: Partial<QcowHeader>, patch?: (b: Uint8Array) => void): Uint8Array {
  const b = encodeHeader({ ...base, ...fields });
  patch?.(b);
  return b;
}

function rejects(buf: Uint8Array, fileSize: number, code: string, pattern: RegExp): void {
  assert.throws(
    () => decodeHeader(buf, fileSize),
    (e: unknown) => e instanceof QcowError && e.code === code && pattern.test(e.message),
  );
}

test('the header of `qemu-img create -f qcow x 1M` decodes field by field (spec §10.1)', () => {
  const bytes = Uint8Array.from(
    Buffer.from('514649fb000000010000000000000000' + '00000000000000000000000000100000' + '0c090000000000000000000000000030', 'hex'),
  );
  const h = decodeHeader(bytes, FILE);
  assert.deepEqual(h, base);
  assert.deepEqual(encodeHeader(h), bytes);
  assert.equal(l1SizeOf(h), 1);
});

test('probe: the magic with version 1 is qcow; version 2 or 3 is left to qcow2', () => {
  assert.equal(probeQcow1(encodeHeader(base)), 100);
  assert.equal(probeQcow1(patched({}, (b) => (b[7] = 2))), 0);
  assert.equal(probeQcow1(patched({}, (b) => (b[7] = 3))), 0);
  assert.equal(probeQcow1(new Uint8Array(48)), 0);
  assert.equal(probeQcow1(new Uint8Array(3)), 0);
});

test('the guest sees the size rounded down to 512 bytes; L1 size comes from the raw size field', () => {
  assert.equal(virtualSizeOf({ size: 1000 }), 512);
  assert.equal(virtualSizeOf({ size: 256 }), 0);
  assert.equal(l1SizeOf({ size: 2 * 2 ** 21 + 1, clusterBits: 12, l2Bits: 9 }), 3);
});

test('every check QEMU makes on open gives a QcowError naming the field', () => {
  rejects(patched({}, (b) => (b[0] = 0)), FILE, 'QCOW_BAD_MAGIC', /not in qcow format/);
  rejects(encodeHeader(base).subarray(0, 20), FILE, 'QCOW_BAD_MAGIC', /shorter/);
  rejects(patched({}, (b) => (b[7] = 2)), FILE, 'QCOW_UNSUPPORTED', /version 2.*qcow2/);
  rejects(patched({ size: 1 }), FILE, 'QCOW_CORRUPT', /size 1 is too small/);
  rejects(patched({ clusterBits: 8 }), FILE, 'QCOW_CORRUPT', /cluster_bits 8/);
  rejects(patched({ clusterBits: 17 }), FILE, 'QCOW_CORRUPT', /cluster_bits 17/);
  rejects(patched({ l2Bits: 5 }), FILE, 'QCOW_CORRUPT', /l2_bits 5/);
  rejects(patched({ l2Bits: 14 }), FILE, 'QCOW_CORRUPT', /l2_bits 14/);
  rejects(patched({ cryptMethod: 2 }), FILE, 'QCOW_CORRUPT', /crypt_method 2/);
  // size field near 2^64, and an L1 table one entry over QEMU's largest read
  rejects(patched({}, (b) => new DataView(b.buffer).setBigUint64(24, 2n ** 64n - 1n)), FILE, 'QCOW_UNSUPPORTED', /too large/);
  rejects(patched({ size: (MAX_L1_SIZE + 1) * 2 ** 21 }), 2 ** 40, 'QCOW_UNSUPPORTED', /too large/);
  rejects(patched({ l1TableOffset: 600 }), FILE, 'QCOW_CORRUPT', /l1_table_offset.*past the end/);
  rejects(patched({}, (b) => new DataView(b.buffer).setBigUint64(40, 2n ** 63n)), FILE, 'QCOW_CORRUPT', /l1_table_offset/);
  rejects(patched({ backingFileOffset: 48, backingFileSize: 1024 }), 4096, 'QCOW_CORRUPT', /backing_file_size 1024.*too long/);
  rejects(patched({ backingFileOffset: 48, backingFileSize: 600 }), FILE, 'QCOW_CORRUPT', /backing_file_offset.*past the end/);
});

test('the largest values QEMU accepts are accepted', () => {
  const h = decodeHeader(patched({ size: MAX_L1_SIZE * 2 ** 21 }), 48 + 8 * MAX_L1_SIZE);
  assert.equal(l1SizeOf(h), MAX_L1_SIZE);
  assert.equal(decodeHeader(patched({ backingFileOffset: 48, backingFileSize: 1023 }), 48 + 1023 + 8).backingFileSize, 1023);
  // mtime and padding are ignored, as QEMU ignores them
  assert.equal(decodeHeader(patched({ mtime: 1234 }, (b) => b.fill(0xff, 34, 36)), FILE).mtime, 1234);
  assert.equal(HEADER_SIZE, 48);
});

test('L2 entries: normal offsets, compressed descriptors as QEMU writes them (spec §5)', () => {
  assert.deepEqual(decodeEntry(0n, 12), { kind: 'unallocated' });
  assert.deepEqual(decodeEntry(0x2000n, 12), { kind: 'normal', hostOffset: 0x2000 });
  // 512-aligned but not cluster-aligned is fine; unaligned is QEMU's EIO
  assert.deepEqual(decodeEntry(0x2200n, 12), { kind: 'normal', hostOffset: 0x2200 });
  assert.throws(() => decodeEntry(0x2001n, 12), (e: unknown) => e instanceof QcowError && e.code === 'QCOW_CORRUPT');
  const c12 = decodeEntry(0x80b0000000002000n, 12);
  assert.equal(c12.kind, 'compressed');
  assert.deepEqual([c12.kind === 'compressed' && c12.compressedSize, c12.kind === 'compressed' && c12.hostOffset], [22, 0x2000]);
  const c9 = decodeEntry(0x8200000000008400n, 9);
  assert.deepEqual([c9.kind === 'compressed' && c9.compressedSize, c9.kind === 'compressed' && c9.hostOffset], [8, 0x8400]);
  assert.equal(compressedEntry(0x2000, 22, 12), 0x80b0000000002000n);
  assert.equal(compressedEntry(0x8400, 8, 9), 0x8200000000008400n);
  assert.throws(() => compressedEntry(0, 4096, 12), RangeError);
  assert.throws(() => decodeEntry(0x7fff_ffff_ffff_f000n, 12), (e: unknown) => e instanceof QcowError && /too large/.test(e.message));
});
