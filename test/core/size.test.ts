import { test } from 'node:test';
import assert from 'node:assert/strict';
import { formatSize, parseOffset, parseSize } from '#src/core/size.js';

test('sizes parse with k/M/G/T suffixes as powers of 1024', () => {
  assert.equal(parseSize('512'), 512);
  assert.equal(parseSize('64k'), 65536);
  assert.equal(parseSize('1.5M'), 1572864);
  assert.equal(parseSize('4T'), 4 * 2 ** 40);
  assert.equal(parseOffset('0x200'), 512);
  assert.throws(() => parseSize('12Q'), /invalid size/);
  assert.throws(() => parseSize('-1'), /invalid size/);
  assert.throws(() => parseSize('0.3'), /whole number/);
});

test('sizes print as qemu-img prints them', () => {
  for (const [bytes, text] of [
    [0, '0 B'],
    [512, '512 B'],
    [1000, '0.977 KiB'],
    [200704, '196 KiB'],
    [2703360, '2.58 MiB'],
    [4194304, '4 MiB'],
    [1572864, '1.5 MiB'],
    [4 * 2 ** 40, '4 TiB'],
  ] as const) {
    assert.equal(formatSize(bytes), text);
  }
});

test('sizes in 0x-hex parse as qemu parses them: whole bytes, no fraction, no suffix', () => {
  assert.equal(parseSize('0x10000'), 65536);
  assert.equal(parseSize('0X200'), 512);
  assert.equal(parseOffset('0xa00802'), 0xa00802);
  for (const bad of ['0x1.5', '0x', '0xg']) assert.throws(() => parseSize(bad), /invalid size/);
});
