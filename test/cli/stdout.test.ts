/**
 * The CLI writes its output straight to file descriptor 1 (src/cli/common.ts writeOut): long
 * output must arrive whole and in order whatever the descriptor is, and a reader that goes away
 * ends the program quietly.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { closeSync, constants, openSync, readSync } from 'node:fs';
import { join } from 'node:path';
import { FileStore } from '#src/storage/file.node.js';
import { createQcow2 } from '#src/formats/qcow2/create.js';
import { Qcow2Device } from '#src/formats/qcow2/qcow2.js';
import { QCOW_BIN, qcowOk, run, scratch } from '../support/qemu.js';

/** A qcow2 image whose map is long: every other 4 KiB cluster of 16 MiB written (~430 KiB of JSON). */
async function patchyImage(dir: string): Promise<string> {
  const path = join(dir, 'patchy.qcow2');
  const store = await FileStore.open(path, { create: true });
  await createQcow2(store, { size: 16 * 1024 * 1024, options: { cluster_size: '4k' } });
  const dev = await Qcow2Device.open(store, {});
  const data = new Uint8Array(4096).fill(1);
  for (let c = 0; c < 4096; c += 2) await dev.write(c * 4096, data);
  await dev.close();
  return path;
}

test('long output through a pipe that is cut short ends the program quietly, exit 0', async (t) => {
  const img = await patchyImage(await scratch(t));
  const full = (await qcowOk(['map', '--output=json', img])).stdout;
  // The reader takes 100 bytes and goes away; qcow's own status and stderr come out beside it.
  const r = await run('sh', ['-c', '{ "$0" map --output=json "$1"; echo "qcow exit $?" >&2; } | head -c 100', QCOW_BIN, img]);
  assert.equal(r.stdout, full.slice(0, 100));
  assert.equal(r.stderr, 'qcow exit 0\n', 'no stack trace, no message');
});

test('long output reaches a slow reader whole through a non-blocking pipe', async (t) => {
  const dir = await scratch(t);
  const img = await patchyImage(dir);
  const expected = (await qcowOk(['map', '--output=json', img])).stdout;
  assert.ok(expected.length > 256 * 1024, 'more than a pipe holds');
  // A non-blocking pipe as stdout, as a parent that is not libuv-based may hand over (Node's own
  // children always get blocking stdio): a FIFO opened non-blocking on both ends, passed as fd 3
  // (libuv makes only fds 0-2 blocking) and moved to fd 1 by the shell.
  const fifo = join(dir, 'out.fifo');
  execFileSync('mkfifo', [fifo]);
  const reader = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK);
  const writer = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
  const child = spawn('sh', ['-c', 'exec "$0" map --output=json "$1" >&3 3>&-', QCOW_BIN, img], { stdio: ['ignore', 'ignore', 'pipe', writer] });
  closeSync(writer);
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
  // Read nothing for a while, then slowly: the pipe fills and stays full.
  await new Promise((r) => setTimeout(r, 300));
  const chunks: Buffer[] = [];
  const buf = Buffer.alloc(16 * 1024);
  try {
    for (;;) {
      let n: number;
      try {
        n = readSync(reader, buf, 0, buf.length, null);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
        await new Promise((r) => setTimeout(r, 2));
        continue;
      }
      if (n === 0) break; // every writer gone: the end
      chunks.push(Buffer.from(buf.subarray(0, n)));
      await new Promise((r) => setTimeout(r, 1));
    }
  } finally {
    closeSync(reader);
  }
  assert.equal(await exited, 0, stderr);
  assert.equal(Buffer.concat(chunks).toString('utf8'), expected);
});
