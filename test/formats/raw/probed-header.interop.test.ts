/**
 * A raw image opened writable without a format (probed) keeps block 0 from becoming another
 * format's header, as QEMU's raw driver does: a guest that wrote a qcow2 header naming a host file
 * as its backing file would otherwise have the next probing open follow it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { MemoryStore } from '#src/storage/memory.js';
import { QcowError } from '#src/core/errors.js';
import { openImage as openImageWith } from '#src/chain/open.js';
import { builtinFormats } from '#src/formats/index.js';
import { convert } from '#src/ops/convert.js';
import { openImage } from '#src/node-open.js';
import type { StoreOpener } from '#src/storage/types.js';
import { NbdClient } from '../../support/nbd-client.js';
import { serveQcow } from '../../support/serve.js';
import { needs, qcow, qemuImg, run, scratch } from '../../support/qemu.js';

const COMPAT_QEMU_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

/** The first sector of a fresh qcow2 image: what a hostile guest would write. */
async function qcow2Header(dir: string): Promise<Uint8Array> {
  const img = join(dir, 'hdr.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
  return (await readFile(img)).subarray(0, 512);
}

/** Every open of a name sees the same bytes (the store keeps its own copy of what it is given). */
function memoryOpener(files: Map<string, Uint8Array>): StoreOpener {
  return {
    open: async (name, { readOnly }) => {
      const store = new MemoryStore(files.get(name), { name, readOnly });
      const close = store.close.bind(store);
      store.close = async () => {
        files.set(name, store.bytes().slice());
        await close();
      };
      return store;
    },
    resolve: (name) => name,
  };
}

async function head8(dev: { read(offset: number, into: Uint8Array): Promise<void> }): Promise<number[]> {
  const b = new Uint8Array(8);
  await dev.read(0, b);
  return [...b];
}

const refused = (e: unknown) => e instanceof QcowError && e.code === 'QCOW_READ_ONLY' && e.errno === 'EPERM' && /qcow2 header into block 0/.test(e.message);

test('probed raw: a write, partial write or zero write that would leave a format header in block 0 is refused; others are not', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const header = await qcow2Header(dir);
  const files = new Map([['disk.img', new Uint8Array(64 * 1024)]]);
  const probed: string[] = [];
  const open = (format?: string) => openImageWith('disk.img', { opener: memoryOpener(files), formats: builtinFormats(), format, onProbedRaw: (n) => probed.push(n) });

  const dev = await open();
  assert.equal(dev.format, 'raw');
  assert.deepEqual(probed, ['disk.img']);
  await assert.rejects(dev.write(0, header), refused);
  // The header's magic and version written alone over a sector that holds the rest of it.
  await dev.write(8, header.subarray(8, 512));
  await assert.rejects(dev.write(0, header.subarray(0, 8)), refused);
  assert.deepEqual(await head8(dev), [0, 0, 0, 0, 0, 0, 0, 0]);
  // The same bytes elsewhere, or other bytes in block 0, are the guest's business.
  await dev.write(512, header);
  await dev.write(0, new Uint8Array(512).fill(0x51));
  // A LUKS magic with version 0x0101 is no LUKS header; zeroing its high byte would make one.
  const luksish = new Uint8Array([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0x01, 0x01]);
  await dev.write(0, luksish);
  await assert.rejects(dev.writeZeroes(6, 1), (e: unknown) => e instanceof QcowError && e.errno === 'EPERM' && /luks header/.test(e.message));
  assert.deepEqual(await head8(dev), [...luksish]);
  await dev.writeZeroes(0, 512);
  await dev.close();

  // Given as raw, nothing is restricted and nothing is said.
  const raw = await open('raw');
  await raw.write(0, header);
  assert.deepEqual(await head8(raw), [...header.subarray(0, 8)]);
  await raw.writeZeroes(0, 512);
  await raw.close();
  assert.deepEqual(probed, ['disk.img']);
  // Read-only, nothing is said either.
  const ro = await openImageWith('disk.img', { opener: memoryOpener(files), formats: builtinFormats(), readOnly: true, onProbedRaw: (n) => probed.push(n) });
  assert.equal(ro.format, 'raw');
  await ro.close();
  assert.deepEqual(probed, ['disk.img']);
});

test('compat qemu-io on a probed raw image: the same warning, refusal and image as QEMU\'s qemu-io', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const header = await qcow2Header(dir);
  await writeFile(join(dir, 'hdr.bin'), header);
  const outputs: string[] = [];
  const images: Buffer[] = [];
  for (const prog of ['qemu-io', COMPAT_QEMU_IO]) {
    const img = join(dir, 'probe.raw');
    await writeFile(img, new Uint8Array(0));
    await truncate(img, 1 << 20);
    const r = await run(prog, ['-c', `write -s ${join(dir, 'hdr.bin')} 0 512`, '-c', `write -s ${join(dir, 'hdr.bin')} 512 512`, '-c', 'write -P 0x51 0 512', img]);
    // A command that failed makes qemu-io exit 1, the others still run.
    assert.equal(r.code, 1, r.stderr);
    const lines = (r.stdout + r.stderr).split('\n').filter((l) => !/ ops; /.test(l)).sort();
    outputs.push(lines.join('\n'));
    images.push(await readFile(img));
    const info = await qemuImg(['info', '--output=json', img]);
    assert.equal(JSON.parse(info.stdout).format, 'raw');
  }
  assert.match(outputs[0]!, /write failed: Operation not permitted/);
  assert.match(outputs[0]!, /WARNING: Image format was not specified for '.*probe\.raw' and probing guessed raw\./);
  assert.equal(outputs[1], outputs[0]);
  assert.ok(images[1]!.equals(images[0]!));
});

test('qcow io warns in its own words; qcow serve without a format refuses a header in block 0 with EPERM', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const header = await qcow2Header(dir);
  const img = join(dir, 'disk.raw');
  await writeFile(img, new Uint8Array(0));
  await truncate(img, 1 << 20);
  const io = await qcow(['io', '-c', 'write -P 0x11 512 512', img]);
  assert.equal(io.code, 0, io.stderr);
  assert.match(io.stderr, /^qcow: warning: the format of '.*disk\.raw' was not given and probing guessed raw: .* \(give -f raw to allow them\)\n$/);

  const served = await serveQcow(t, dir, [img]);
  const client = await NbdClient.connect({ path: served.sock });
  t.after(() => client.disconnect().catch(() => undefined));
  await assert.rejects(client.write(0, header), { errno: 1 }); // EPERM
  await client.write(0, new Uint8Array(512).fill(0x22));
  await client.flush();
  const info = await qemuImg(['info', '--output=json', '-U', img]);
  assert.equal(JSON.parse(info.stdout).format, 'raw');
  assert.equal((await readFile(img))[0], 0x22);
});

test('convert into a raw file opened without a format takes the checked path: a header in block 0 is refused', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const header = await qcow2Header(dir);
  // Guest data whose first sector is a qcow2 header, in a raw image opened with its format.
  const source = join(dir, 'guest.raw');
  const data = new Uint8Array(4 << 20).fill(0x33);
  data.set(header, 0);
  await writeFile(source, data);
  const target = join(dir, 'target.raw');
  await writeFile(target, new Uint8Array(0));
  await truncate(target, 4 << 20);
  const src = await openImage(source, { format: 'raw', readOnly: true });
  t.after(() => src.close());
  const dst = await openImage(target, { onProbedRaw: () => undefined });
  await assert.rejects(convert([src], dst, { targetIsZero: true }), refused).finally(() => dst.close());
  const after = await readFile(target);
  assert.deepEqual([...after.subarray(0, 8)], [0, 0, 0, 0, 0, 0, 0, 0]);
  // Given as raw, the same convert goes through (the native loop where the addon is).
  const raw = await openImage(target, { format: 'raw' });
  await convert([src], raw, { targetIsZero: true });
  await raw.close();
  assert.ok((await readFile(target)).equals(Buffer.from(data)));
});
