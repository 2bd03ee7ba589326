import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockDevice } from '#src/core/block-device.js';
import { qcow2Format } from '#src/formats/index.js';
import { MemoryStore } from '#src/storage/memory.js';
import { QemuIo, type IoOutput, type Opener } from '#src/compat/qemu-io/engine.js';

/** An engine over a fresh in-memory qcow2 image, printing into strings (stats numbers masked). */
async function engine(size = 1024 * 1024, readOnly = false) {
  const store = new MemoryStore();
  await qcow2Format.create(store, { size });
  const opener: Opener = {
    open: async (req) => qcow2Format.open(store, { readOnly: req.readOnly }),
    close: async (dev: BlockDevice) => dev.close(),
  };
  let out = '';
  let err = '';
  const output: IoOutput = { out: (t) => (out += t), err: (t) => (err += t), flush: () => undefined };
  const io = new QemuIo(output, opener);
  assert.equal(await io.openImage({ name: 'img', options: {}, readOnly, snapshot: false, forceShare: false }), 0);
  const mask = (s: string) => s.replace(/ops; .*$/gm, 'ops; X');
  return {
    io,
    async run(...lines: string[]): Promise<{ out: string; err: string; rets: number[] }> {
      out = '';
      err = '';
      const rets: number[] = [];
      for (const l of lines) rets.push(await io.command(l));
      await io.drain();
      return { out: mask(out), err, rets };
    },
  };
}

test('write then read back with a pattern; a mismatch names the offset and fails', async () => {
  const e = await engine();
  const r = await e.run('write -P 0x5a 4k 8k', 'read -P 0x5a 4k 8k', 'read -P 0x5a -s 4k -l 4k 0 8k', 'read -P 0x5a -s 0 -l 4k 0 8k', 'read -q -P 0 0 4k');
  assert.equal(r.out, 'wrote 8192/8192 bytes at offset 4096\n8 KiB, 1 ops; X\nread 8192/8192 bytes at offset 4096\n8 KiB, 1 ops; X\nread 8192/8192 bytes at offset 0\n8 KiB, 1 ops; X\nPattern verification failed at offset 0, 4096 bytes\nread 8192/8192 bytes at offset 0\n8 KiB, 1 ops; X\n');
  assert.deepEqual(r.rets, [0, 0, 0, -22, 0]);
});

test('requests past the end fail with EIO, bad numbers and options with usage lines', async () => {
  const e = await engine();
  const r = await e.run('write 1M 1', 'read 1023k 2k', 'read 0 12x', 'write -z -P 1 0 1', 'writev 0 512 99999999999', 'read 0');
  assert.equal(
    r.out,
    'write failed: Input/output error\nread failed: Input/output error\nParsing error: non-numeric argument, or extraneous/unrecognized suffix -- 12x\nOnly one of -z, -P, and -s can be specified at the same time\nArgument \'99999999999\' exceeds maximum size 2147483136\n',
  );
  assert.equal(r.err, 'bad argument count 1 to read, expected at least 2 arguments\n');
  assert.ok(r.rets.every((x) => x < 0));
});

test('alloc and map report this layer, merged into runs', async () => {
  const e = await engine();
  const r = await e.run('write 64k 64k', 'write -z 192k 64k', 'alloc 0 256k', 'alloc 64k', 'map', 'length');
  assert.equal(
    r.out.replace(/^(wrote|\d+ KiB, 1 ops).*\n/gm, ''),
    '131072/262144 bytes allocated at offset 0 bytes\n512/512 bytes allocated at offset 64 KiB\n' +
      '64 KiB (0x10000) bytes not allocated at offset 0 bytes (0x0)\n64 KiB (0x10000) bytes     allocated at offset 64 KiB (0x10000)\n' +
      '64 KiB (0x10000) bytes not allocated at offset 128 KiB (0x20000)\n64 KiB (0x10000) bytes     allocated at offset 192 KiB (0x30000)\n' +
      '768 KiB (0xc0000) bytes not allocated at offset 256 KiB (0x40000)\n1 MiB\n',
  );
});

test('aio requests run together and all report by aio_flush', async () => {
  const e = await engine();
  const r = await e.run('aio_write -P 1 0 64k', 'aio_write -P 2 64k 64k', 'aio_flush', 'read -P 1 0 64k', 'read -P 2 64k 64k');
  assert.equal((r.out.match(/^wrote 65536\/65536/gm) ?? []).length, 2);
  assert.deepEqual(r.rets, [0, 0, 0, 0, 0]);
});

test('read-only images refuse writing commands; truncate, close and unknown commands', async () => {
  const ro = await engine(1024 * 1024, true);
  const r = await ro.run('write 0 1', 'discard 0 1');
  assert.equal(r.err, 'qemu-io: Block node is read-only\nqemu-io: Block node is read-only\n');
  const e = await engine();
  const t = await e.run('truncate 2M', 'length', 'close', 'read 0 1', 'nope', 'help nope');
  assert.equal(t.out, '2 MiB\ncommand nope not found\n');
  assert.equal(t.err, "no file open, try 'help open'\ncommand \"nope\" not found\n");
});
