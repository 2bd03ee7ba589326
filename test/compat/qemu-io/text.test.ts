import { test } from 'node:test';
import assert from 'node:assert/strict';
import { hexdump, humanSize, parseNumber, parsePatternByte, report, timeText } from '#src/compat/qemu-io/text.js';
import { getopt } from '#src/compat/qemu-io/getopt.js';

test('sizes parse as qemu-io reads them: suffixes, fractions, hex; bad ones say why', () => {
  assert.deepEqual(parseNumber('512'), { value: 512 });
  assert.deepEqual(parseNumber('64k'), { value: 65536 });
  assert.deepEqual(parseNumber('64K'), { value: 65536 });
  assert.deepEqual(parseNumber('1.5M'), { value: 1572864 });
  assert.deepEqual(parseNumber('0x200'), { value: 512 });
  assert.deepEqual(parseNumber('1b'), { value: 1 });
  assert.deepEqual(parseNumber('1.k'), { value: 1024 });
  assert.deepEqual(parseNumber('1.5'), { error: 'invalid' });
  assert.deepEqual(parseNumber('-1'), { error: 'invalid' });
  assert.deepEqual(parseNumber('12x'), { error: 'invalid' });
  assert.deepEqual(parseNumber('1kk'), { error: 'invalid' });
  assert.deepEqual(parseNumber(''), { error: 'invalid' });
  assert.deepEqual(parseNumber('8E'), { error: 'range' });
  assert.deepEqual(parseNumber('99999999999999999999'), { error: 'range' });
});

test('human sizes: three decimals, .000 dropped, bytes below 1 KiB', () => {
  assert.equal(humanSize(0), '0 bytes');
  assert.equal(humanSize(512), '512 bytes');
  assert.equal(humanSize(1536), '1.500 KiB');
  assert.equal(humanSize(65536), '64 KiB');
  assert.equal(humanSize(2 ** 30 * 1.5), '1.500 GiB');
  assert.equal(humanSize(100.5), '100.500000 bytes');
  assert.equal(humanSize(1.0625 * 2 ** 20), '1.062 MiB');
  assert.equal(humanSize(2.0625 * 2 ** 20), '2.062 MiB');
  assert.equal(humanSize(1.1875 * 2 ** 20), '1.188 MiB');
});

test('the statistics lines have the shape iotests filter', () => {
  const r = report('wrote', 0.0012, 1024, 65536, 65536, 1, false);
  assert.match(r, /^wrote 65536\/65536 bytes at offset 1024\n64 KiB, 1 ops; 00\.00 sec \([0-9.]+ [KMGTPE]?i?B?[a-z]*\/sec and [0-9.]+ ops\/sec\)\n$/);
  assert.equal(timeText(61.25, false), '0:01:01.25');
  assert.equal(timeText(0.5, true), '0:00:00.50');
  assert.match(report('read', 1, 0, 512, 512, 1, true), /^512,1,0:00:01\.00,512\.000,1\.000\n$/);
});

test('hexdump: 16 bytes a line, letters and digits shown, the rest as dots', () => {
  const buf = new Uint8Array(18).fill(0x41);
  buf[1] = 0x20;
  assert.equal(hexdump(buf, 0x200), '00000200:  41 20 41 41 41 41 41 41 41 41 41 41 41 41 41 41  A.AAAAAAAAAAAAAA\n00000210:  41 41  AA\n');
});

test('pattern bytes: decimal, hex, octal; out of range or trailing text refused', () => {
  assert.equal(parsePatternByte('0xab'), 0xab);
  assert.equal(parsePatternByte('010'), 8);
  assert.equal(parsePatternByte('255'), 255);
  assert.equal(parsePatternByte('256'), null);
  assert.equal(parsePatternByte('-1'), null);
  assert.equal(parsePatternByte('1k'), null);
  assert.equal(parsePatternByte('route66'), null);
});

test('getopt: clustered flags, attached and separate arguments, operands anywhere, -- ends options', () => {
  const errors: string[] = [];
  const r = getopt('read', ['-qP', '5', '0', '-v', '512', '--', '-1'], 'P:qv', [], (l) => errors.push(l));
  assert.deepEqual(r, { options: [{ key: 'q' }, { key: 'P', arg: '5' }, { key: 'v' }], operands: ['0', '512', '-1'] });
  assert.equal(getopt('read', ['-x'], 'P:qv', [], (l) => errors.push(l)), null);
  assert.equal(getopt('read', ['-P'], 'P:qv', [], (l) => errors.push(l)), null);
  assert.deepEqual(errors, ["read: invalid option -- 'x'\n", "read: option requires an argument -- 'P'\n"]);
  const long = getopt('qemu-io', ['--cmd=read 0 1', '--form', 'raw'], 'c:f:', [
    { name: 'cmd', hasArg: true, key: 'c' },
    { name: 'format', hasArg: true, key: 'f' },
  ], (l) => errors.push(l));
  assert.deepEqual(long?.options, [{ key: 'c', arg: 'read 0 1' }, { key: 'f', arg: 'raw' }]);
});
