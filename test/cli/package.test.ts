/**
 * What `npm pack` ships: the launchers (bin/, compat/) and the library, and none of the tooling
 * (tests, test helpers, benchmark harnesses, fuzzers, the NBD test client) nor source maps that
 * point at sources the package does not carry.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { run } from '../support/qemu.js';

const root = join(import.meta.dirname, '..', '..');

test('npm pack ships the launchers and the library, and no tests, harnesses or maps', async () => {
  const r = await run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: root });
  assert.equal(r.code, 0, r.stderr);
  const files = (JSON.parse(r.stdout) as { files: { path: string }[] }[])[0]!.files.map((f) => f.path);
  for (const must of ['bin/qcow', 'bin/qcow.cjs', 'compat/qemu-img', 'compat/qemu-io', 'dist/index.js', 'dist/node.js', 'dist/cli/qcow.bundle.cjs', 'binding.gyp', 'native/qcow_host.c', 'native/install.mjs']) {
    assert.ok(files.includes(must), `${must} is not packed`);
  }
  const tooling = files.filter((f) => /\.test\.|test-helpers|test\.helpers|\.map$|\.tsbuildinfo$|^(test|bench|dist-test|dist-bench)\//.test(f));
  assert.deepEqual(tooling, []);
});
