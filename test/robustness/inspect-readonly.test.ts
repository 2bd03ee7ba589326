/**
 * Nothing is written to an image while it is only being inspected: info, map, compare, check
 * without -r, convert (as its source), io -r and snapshot -l leave every file of the chain
 * byte-identical, including a dirty lazy-refcounts image (whose repair must wait for a writer) and
 * one whose corrupt bit is set.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { needs, qcow, qemuImg, qemuIo, run, scratch, sha256 } from '../support/qemu.js';

test('inspecting commands leave every image byte-identical (dirty and corrupt-bit ones too)', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const p = (n: string) => join(dir, n);
  // A plain v3 image with data, zeros and a compressed cluster; a v2 (0.10) image; a chain.
  await qemuImg(['create', '-q', '-f', 'qcow2', p('plain.qcow2'), '4M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x11 0 128k', '-c', 'write -z 1M 64k', '-c', 'write -c -P 0x22 2M 64k', p('plain.qcow2')]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', p('v2.qcow2'), '4M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x12 64k 64k', p('v2.qcow2')]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'plain.qcow2', '-F', 'qcow2', p('top.qcow2')]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x33 1M 4k', p('top.qcow2')]);
  // qcow v1 with a backing file (its format is probed).
  await qemuImg(['create', '-q', '-f', 'qcow', '-b', 'plain.qcow2', '-F', 'qcow2', p('v1.qcow')]);
  await qemuIo(['-f', 'qcow', '-c', 'write -P 0x44 3M 4k', p('v1.qcow')]);
  // Lazy refcounts, left dirty by a writer that died (qemu-io's abort).
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', p('dirty.qcow2'), '4M']);
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x55 0 256k', '-c', 'abort', p('dirty.qcow2')]);
  const dirtyBytes = await readFile(p('dirty.qcow2'));
  assert.equal(dirtyBytes.readBigUInt64BE(72) & 1n, 1n, 'the dirty bit is set');
  // The corrupt bit set (as QEMU does when it finds an inconsistency).
  const corrupt = await readFile(p('plain.qcow2'));
  corrupt.writeBigUInt64BE(corrupt.readBigUInt64BE(72) | 2n, 72);
  await writeFile(p('corrupt.qcow2'), corrupt);

  const images = ['plain.qcow2', 'v2.qcow2', 'top.qcow2', 'v1.qcow', 'dirty.qcow2', 'corrupt.qcow2'];
  const all = [...images, 'plain.qcow2'];
  const before = new Map(await Promise.all(all.map(async (n) => [n, sha256(await readFile(p(n)))] as const)));

  const ran: string[] = [];
  for (const img of images) {
    const commands: string[][] = [
      ['info', img],
      ['info', '--backing-chain', '--output=json', img],
      ['map', img],
      ['map', '--output=json', img],
      ['compare', img, img],
      ['compare', img, 'plain.qcow2'],
      ['convert', '-O', 'raw', img, 'out.raw'],
      ['convert', '-O', 'qcow2', '-c', img, 'out.qcow2'],
      ['io', '-r', '-c', 'read 0 64k', '-c', 'map', img],
      ['snapshot', '-l', img],
    ];
    if (img.endsWith('.qcow2')) commands.push(['check', img], ['check', '--output=json', img]);
    for (const args of commands) {
      const r = await qcow(args, { cwd: dir, timeoutMs: 60_000 });
      ran.push(`${args.join(' ')} -> ${r.code}${r.code ? ` (${r.stderr.split("\n")[0]})` : ''}`);
      // The command may succeed or fail (a corrupt image may be refused): it must not write.
      assert.notEqual(r.code, 124, `${args.join(' ')} hung`);
      for (const n of all) assert.equal(sha256(await readFile(p(n))), before.get(n), `${args.join(' ')} changed ${n}`);
    }
  }
  // The images were really read: every command but the ones on the corrupt image succeeded at least somewhere.
  assert.ok(ran.filter((l) => /-> 0$/.test(l)).length > ran.length / 2, ran.join('\n'));
  // The dirty image still reads back what the dead writer flushed, through us and QEMU alike.
  const ours = await qcow(['io', '-r', '-c', 'read -P 0x55 0 256k', 'dirty.qcow2'], { cwd: dir });
  assert.equal(ours.code, 0, ours.stderr + ours.stdout);
  assert.equal(sha256(await readFile(p('dirty.qcow2'))), before.get('dirty.qcow2'));
  t.diagnostic(ran.filter((l) => !/-> 0$/.test(l)).join('; ') || 'every command succeeded');
});

test('a write to an image whose corrupt bit is set is refused, and the image is left as it was', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const file = join(dir, 'c.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', file, '1M']);
  const bytes = await readFile(file);
  bytes.writeBigUInt64BE(bytes.readBigUInt64BE(72) | 2n, 72);
  await writeFile(file, bytes);
  const r = await qcow(['io', '-c', 'write -P 1 0 4k', file]);
  assert.notEqual(r.code, 0);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /^qcow: .*c\.qcow2: .*corrupt/i);
  assert.deepEqual(await readFile(file), bytes);
});
