/**
 * An image whose bitmap directory has an entry QEMU cannot load: qemu-img and qemu-io refuse to
 * open it ("Bitmap 'x' doesn't satisfy the constraints"), whatever the command, before they write
 * anything. The compat front ends must refuse it the same way (same output, same exit code, file
 * untouched), while the `qcow` command still opens it so the bitmap can be removed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { decodeDirectory, encodeDirectory, FLAG_AUTO, FLAG_EXTRA_DATA_COMPATIBLE } from '#src/formats/qcow2/bitmaps/directory.js';
import { headerOf } from '../../support/qcow2-edit.js';
import { needs, qcow, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));
const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

const BITMAPS_EXTENSION = 0x23852875;

/** Set one byte of the first bitmap directory entry. */
async function poke(file: string, at: number, value: number): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const { header } = await headerOf(fh);
    await fh.write(new Uint8Array([value]), 0, 1, header.bitmaps!.directoryOffset + at);
  } finally {
    await fh.close();
  }
}

/** Give the first directory entry 8 bytes of extra data, with these flags; the directory grows. */
async function addExtraData(file: string, flags: number): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const { head, header } = await headerOf(fh);
    const { nbBitmaps, directorySize, directoryOffset } = header.bitmaps!;
    const dir = new Uint8Array(directorySize);
    await fh.read(dir, 0, dir.length, directoryOffset);
    const entries = decodeDirectory(dir, nbBitmaps);
    entries[0] = { ...entries[0]!, flags, extraData: new Uint8Array(8).fill(0xee) };
    const grown = encodeDirectory(entries);
    await fh.write(grown, 0, grown.length, directoryOffset);
    // The extension's directory size (bytes 8-15 of its data).
    const view = new DataView(head.buffer);
    let at = view.getUint32(100);
    while (view.getUint32(at) !== BITMAPS_EXTENSION) at += 8 + Math.ceil(view.getUint32(at + 4) / 8) * 8;
    view.setBigUint64(at + 16, BigInt(grown.length));
    await fh.write(head, at + 16, 8, at + 16);
  } finally {
    await fh.close();
  }
}

test('compat/qemu-img and compat/qemu-io refuse a bitmap QEMU cannot load, as QEMU does', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  // How the first directory entry is broken: a byte offset inside it and the value written there
  // (granularity bits too large and too small, an unknown type, an unknown flag, a misaligned
  // table, a table of 0 entries, the extra_data_compatible flag), or extra data, which QEMU refuses even when marked compatible.
  const breakages: [string, (file: string) => Promise<void>, RegExp][] = [
    ...([
      [17, 40],
      [17, 8],
      [16, 2],
      [12, 0x80],
      [7, 8],
      [11, 0],
      // The flags' low byte with extra_data_compatible set and no extra data: a reserved flag to
      // QEMU 7.2 (iotest 242), though the spec names it.
      [15, FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE],
    ] as const).map(([at, value]): [string, (file: string) => Promise<void>, RegExp] => [`byte ${at} = ${value}`, (f) => poke(f, at, value), /Bitmap 'bad' doesn't satisfy the constraints/]),
    ['extra data', (f) => addExtraData(f, FLAG_AUTO), /Bitmap extra data is not supported/],
    ['compatible extra data', (f) => addExtraData(f, FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE), /Bitmap extra data is not supported/],
  ];
  const commands: [string, string, string[]][] = [
    ['qemu-img', COMPAT_QEMU_IMG, ['info', 'x.qcow2']],
    ['qemu-img', COMPAT_QEMU_IMG, ['check', 'x.qcow2']],
    ['qemu-img', COMPAT_QEMU_IMG, ['check', '-r', 'all', 'x.qcow2']],
    ['qemu-img', COMPAT_QEMU_IMG, ['bitmap', '--remove', 'x.qcow2', 'bad']],
    ['qemu-img', COMPAT_QEMU_IMG, ['convert', '-O', 'raw', 'x.qcow2', 'x.raw']],
    ['qemu-img', COMPAT_QEMU_IMG, ['resize', 'x.qcow2', '32M']],
    ['qemu-io', COMPAT_QEMU_IO, ['-c', 'write 0 4k', 'x.qcow2']],
    ['qemu-io', COMPAT_QEMU_IO, ['-r', '-c', 'read 0 4k', 'x.qcow2']],
  ];
  for (const [i, [how, breakEntry, refusal]] of breakages.entries()) {
    const orig = join(dir, `broken-${i}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', orig, '16M']);
    await qemuImg(['bitmap', '--add', orig, 'bad']);
    await qemuImg(['bitmap', '--add', orig, 'good']);
    await breakEntry(orig);
    const bytes = await readFile(orig);
    for (const [theirs, ours, args] of commands) {
      const what = `${args.join(' ')} with ${how}`;
      await copyFile(orig, join(dir, 'x.qcow2'));
      const expected = await run(theirs, args, { cwd: dir });
      assert.deepEqual(await readFile(join(dir, 'x.qcow2')), bytes, `${theirs} ${what} left the file as it was`);
      assert.match(expected.stderr, refusal, `${theirs} ${what}`);
      await copyFile(orig, join(dir, 'x.qcow2'));
      const got = await run(ours, args, { cwd: dir });
      assert.deepEqual([got.code, got.stdout, got.stderr], [expected.code, expected.stdout, expected.stderr], `compat ${what}`);
      assert.deepEqual(await readFile(join(dir, 'x.qcow2')), bytes, `compat ${what} left the file as it was`);
    }
    // qcow itself opens the image and shows the bitmap as unusable, so that it can be removed.
    const info = await qcow(['info', '--output=json', orig]);
    assert.equal(info.code, 0, info.stderr);
  }
});
