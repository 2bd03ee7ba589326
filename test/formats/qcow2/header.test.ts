/** The header codec: qemu-made headers decode to the right fields and re-encode byte for byte. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { needs, qemuImg, scratch } from '../../support/qemu.js';
import { decodeHeader, decodeHeaderPrefix, encodeHeader, QEMU_FEATURE_NAMES, type Qcow2Header } from '#src/formats/qcow2/header.js';

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

/** decodeHeader's answer for `bytes` (the header or the error's message), to compare decodes by. */
function outcome(decode: () => unknown): unknown {
  try {
    return decode();
  } catch (e) {
    return `error: ${(e as Error).message}`;
  }
}

test('a header decoded from the first bytes of its area is the one decoded from the whole area, or undefined', () => {
  const clusterSize = 65536;
  const area = (h: Qcow2Header) => {
    const bytes = new Uint8Array(clusterSize);
    bytes.set(encodeHeader(h, clusterSize));
    return bytes;
  };
  const headers: Qcow2Header[] = [
    baseHeader(),
    { ...baseHeader(), featureNames: [...QEMU_FEATURE_NAMES], backingFile: 'base.qcow2', backingFormat: 'qcow2' },
    // Extensions past the first page: read-header.ts must then read the rest.
    { ...baseHeader(), unknownExtensions: [{ type: 0x12345678, data: new Uint8Array(5000).fill(7) }], backingFile: 'b' },
    { ...baseHeader(), version: 2 as const, headerLength: 72, backingFile: 'x'.repeat(1000) },
  ].map((h) => ({ ...h, clusterBits: 16 }));
  const broken = area(headers[1]!);
  broken[100 + 3] = 0xf0; // header_length 240: still in the area, but the extensions start mid-table
  const runsPast = area(headers[0]!);
  runsPast.set([0, 0, 0, 1, 0, 1, 0, 0], 112); // an extension longer than the area
  let whole = 0;
  for (const bytes of [...headers.map(area), broken, runsPast]) {
    const full = outcome(() => decodeHeader(bytes));
    for (const cut of [0, 72, 104, 111, 112, 200, 600, 1024, 4096, 5200, 6000, clusterSize]) {
      const part = outcome(() => decodeHeaderPrefix(bytes.subarray(0, cut), clusterSize));
      if (part !== undefined) assert.deepEqual(part, full, `the first ${cut} bytes`);
      if (cut === clusterSize) assert.notEqual(part, undefined);
    }
    if (outcome(() => decodeHeaderPrefix(bytes.subarray(0, 4096), clusterSize)) !== undefined) whole++;
    // A file shorter than a cluster: its area ends with the file.
    const short = bytes.subarray(0, 300);
    assert.deepEqual(outcome(() => decodeHeaderPrefix(short, short.length)), outcome(() => decodeHeader(short)));
  }
  assert.equal(whole, 5, 'the first page holds every header here but the one with a 5000-byte extension (the broken ones fail from it)');
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
