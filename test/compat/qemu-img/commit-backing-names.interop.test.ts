/**
 * qemu-img commit and the names of backing files: -b names a base relative to the image that
 * names it (never the working directory), or by an absolute path; a json:{...} backing name
 * opens as QEMU opens it (here qcow2 over blkdebug), and a write error while the data is copied
 * is the block job's failure. The drop-in must answer each case as qemu-img does.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needs, qemuImg, qemuIo, run, scratch } from '../../support/qemu.js';

const COMPAT_IMG = fileURLToPath(new URL('../../../compat/qemu-img', import.meta.url));

test('commit -b finds the base as qemu-img does', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const outcomes: string[] = [];
  for (const [prog, p] of [
    ['qemu-img', 'q'],
    [COMPAT_IMG, 'c'],
  ] as const) {
    await mkdir(join(dir, p));
    const img = (s: string) => join(p, `t.qcow2${s}`);
    await qemuImg(['create', '-q', '-f', 'qcow2', img('.base'), '1M'], dir);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 't.qcow2.base', '-F', 'qcow2', img('.mid')], dir);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 't.qcow2.mid', '-F', 'qcow2', img('')], dir);
    for (const base of ['t.qcow2.mid', img('.mid'), join(dir, img('.mid')), 'nosuch']) {
      const r = await run(prog, ['commit', '-b', base, img('')], { cwd: dir });
      outcomes.push(`${base.replace(/^[qc]\//, 'X/').replace(dir, 'DIR').replace(/\/[qc]\//, '/X/')}: ${r.code} ${r.stdout}${r.stderr.replace(/'[qc]\//g, "'X/")}`);
    }
  }
  const half = outcomes.length / 2;
  assert.deepEqual(outcomes.slice(half), outcomes.slice(0, half));
  assert.match(outcomes[1]!, /Did not find 'X\/t.qcow2.mid' in the backing chain of 'X\/t.qcow2'/);
});

test('a json: backing file over blkdebug: create, write, and a commit that fails with ENOSPC', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const outs: string[] = [];
  for (const [prog, p] of [
    ['qemu-img', 'q'],
    [COMPAT_IMG, 'c'],
  ] as const) {
    const base = join(dir, `${p}.base`);
    await qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
    const backing = `json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'inject-error': [{'event': 'write_aio', 'errno': 28, 'once': true}], 'image': {'driver': 'file', 'filename': '${base}'}}}`;
    const top = join(dir, `${p}.qcow2`);
    const c = await run(prog, ['create', '-f', 'qcow2', '-b', backing, '-F', 'qcow2', top]);
    assert.equal(c.code, 0, c.stderr);
    await qemuIo(['-c', 'write -P 1 0 64k', top]);
    const r = await run(prog, ['commit', top]);
    outs.push(`${c.stdout.replace(dir, 'DIR').replace(dir, 'DIR').replace(/\/[qc]\./g, '/X.')}${r.code} ${r.stdout}${r.stderr}`);
  }
  assert.equal(outs[1], outs[0]);
  assert.match(outs[0]!, /qemu-img: Block job failed: No space left on device/);
});
