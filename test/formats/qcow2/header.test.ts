/** The header codec: qemu-made headers decode to the right fields and re-encode byte for byte. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { needs, qemuImg, scratch } from '../../support/qemu.js';
import { decodeHeader, encodeHeader, QEMU_FEATURE_NAMES } from '#src/formats/qcow2/header.js';

test('qemu-made headers (v2/v3, backing, data file, bitmaps, zstd) decode and re-encode identically', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const make = async (name: string, args: string[]) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', ...args, name, '1M'], dir);
    const bytes = new Uint8Array(await readFile(join(dir, name)));
    return { bytes, h: decodeHeader(bytes.subarray(0, 65536)) };
  };
  await qemuImg(['create', '-q', '-f', 'raw', join(dir, 'base.raw'), '1M']);
  const cases = [
    await make('v3.qcow2', []),
    await make('v2.qcow2', ['-o', 'compat=0.10']),
    await make('v2b.qcow2', ['-o', 'compat=0.10', '-b', 'base.raw', '-F', 'raw']),
    await make('v3b.qcow2', ['-b', 'base.raw', '-F', 'raw']),
    await make('zstd.qcow2', ['-o', 'compression_type=zstd,data_file=d.data']),
  ];
  await qemuImg(['bitmap', '--add', join(dir, 'v3.qcow2'), 'bm0']);
  cases.push({ bytes: new Uint8Array(await readFile(join(dir, 'v3.qcow2'))), h: decodeHeader(new Uint8Array(await readFile(join(dir, 'v3.qcow2'))).subarray(0, 65536)) });

  const [v3, v2, v2b, v3b, zstd, bitmaps] = cases;
  assert.equal(v3!.h.version, 3);
  assert.equal(v3!.h.headerLength, 112);
  assert.deepEqual(v3!.h.featureNames, QEMU_FEATURE_NAMES);
  assert.equal(v2!.h.version, 2);
  assert.equal(v2!.h.headerLength, 72);
  assert.deepEqual(v2!.h.featureNames, []);
  assert.equal(v2b!.h.backingFile, 'base.raw');
  assert.equal(v2b!.h.backingFormat, 'raw');
  assert.equal(v3b!.h.backingFile, 'base.raw');
  assert.equal(zstd!.h.compressionType, 1);
  assert.equal(zstd!.h.dataFile, 'd.data');
  assert.equal(bitmaps!.h.bitmaps?.nbBitmaps, 1);
  for (const { bytes, h } of cases) {
    const enc = encodeHeader(h, 65536);
    assert.deepEqual(enc, bytes.subarray(0, enc.length));
    assert.ok(bytes.subarray(enc.length, 4096).every((b) => b === 0), 'nothing after the encoded header');
  }
});

test('unknown extensions are kept verbatim for re-encoding', () => {
  const h = decodeHeader(encodeHeader({ ...baseHeader(), unknownExtensions: [{ type: 0x12345678, data: Uint8Array.of(1, 2, 3) }] }, 512));
  assert.deepEqual(h.unknownExtensions, [{ type: 0x12345678, data: Uint8Array.of(1, 2, 3) }]);
});

test('a header that does not fit in one cluster is refused', () => {
  assert.throws(() => encodeHeader({ ...baseHeader(), backingFile: 'x'.repeat(500) }, 512), /do not fit/);
});

function baseHeader() {
  return {
    version: 3 as const,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: 9,
    size: 1 << 20,
    cryptMethod: 0,
    l1Size: 1,
    l1TableOffset: 1536,
    refcountTableOffset: 512,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: 112,
    compressionType: 0,
    featureNames: [],
    unknownExtensions: [],
  };
}
