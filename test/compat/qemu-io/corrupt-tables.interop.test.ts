/**
 * A corrupt table found while the image is in use (an L1 entry naming an unaligned L2 table),
 * through the drop-in qemu-io against qemu-io: open read-write, the first request that needs the
 * table marks the image corrupt ("Marking image as corrupt") and every later one fails with
 * ENOMEDIUM, reads included; open read-only, the event is told once ("Image is corrupt") and each
 * request that needs the table fails with EIO, while the rest of the image stays readable.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';
import { headerOf } from '../../support/qcow2-edit.js';

const COMPAT_IO = fileURLToPath(new URL('../../../compat/qemu-io', import.meta.url));

/** Move L1 entry `index`'s L2 table offset by `by` bytes (off its cluster boundary). */
async function skewL1Entry(file: string, index: number, by: number): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const { header } = await headerOf(fh);
    const entry = new Uint8Array(8);
    const at = header.l1TableOffset + 8 * index;
    await fh.read(entry, 0, 8, at);
    const view = new DataView(entry.buffer);
    view.setBigUint64(0, view.getBigUint64(0) + BigInt(by));
    await fh.write(entry, 0, 8, at);
  } finally {
    await fh.close();
  }
}

test('an unaligned L2 table offset is a corruption event, as qemu-io signals it', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'a.qcow2');
  // [open flags, commands]: the table at L1 index 1 maps [512M, 1G) (an L2 table of 64 KiB
  // clusters reaches 512 MiB); index 0 stays sound.
  const cases: Array<[string[], string[]]> = [
    [[], ['read 512M 512', 'read 0 512', 'map', 'length', 'write 0 512']],
    [[], ['alloc 512M 64k', 'read 0 512', 'info']],
    [[], ['write 512M 512', 'read 0 512', 'truncate 2G']],
    [['-r'], ['read 512M 512', 'read 0 512', 'read 512M 512', 'map', 'alloc 512M 64k', 'length']],
    [['-r'], ['map', 'read 512M 512', 'read 0 512']],
  ];
  for (const compat of ['1.1', '0.10']) {
    for (const [flags, cmds] of cases) {
      const got: string[] = [];
      for (const tool of ['qemu-io', COMPAT_IO]) {
        await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `compat=${compat}`, 'a.qcow2', '1G'], dir);
        await qemuIo(['-f', 'qcow2', '-c', 'write 0 512', '-c', 'write 512M 512', 'a.qcow2'], dir);
        await skewL1Entry(file, 1, 0x200);
        const r = await run(tool, ['-f', 'qcow2', ...flags, ...cmds.flatMap((c) => ['-c', c]), 'a.qcow2'], { cwd: dir });
        const info = await run('qemu-img', ['info', '-f', 'qcow2', 'a.qcow2'], { cwd: dir });
        const corrupt = /corrupt: true/.test(info.stdout);
        got.push(`${r.code}\n${r.stdout.replace(/^\d.*ops\/sec\)\n/gm, '')}${r.stderr}corrupt: ${corrupt}`);
      }
      const label = `${flags.join(' ')} ${cmds.join('; ')} (compat=${compat})`;
      assert.equal(got[1], got[0], label);
      assert.match(got[0]!, /qcow2: (Marking image as corrupt|Image is corrupt): L2 table offset 0x[0-9a-f]+ unaligned \(L1 index: 0x1\)/, label);
    }
  }
});
