/**
 * bin/qcow.cjs runs the CLI from the bundle that `npm run build` makes, compiled from V8's code
 * cache (see scripts/build-cli.mjs). These check that the build left a pair that belongs together
 * and that V8 takes the cache, since a rejected cache costs every command ~25 ms without failing.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import Module from 'node:module';
import { join } from 'node:path';
import { Script } from 'node:vm';
import { run } from '../test-support/qemu.js';

const dir = import.meta.dirname;
const bundlePath = join(dir, 'qcow.bundle.cjs');
const launcher = join(dir, '..', '..', 'bin', 'qcow.cjs');

test('the bundle and its code cache carry the same identity comment, and V8 accepts the cache', () => {
  const source = readFileSync(bundlePath, 'utf8');
  const cache = readFileSync(join(dir, 'qcow.bundle.cache'));
  const id = source.slice(0, source.indexOf('*/') + 2);
  assert.match(id, /^\/\* qcow-bundle [0-9a-f]{64} \*\/$/);
  assert.equal(cache.subarray(0, id.length).toString(), id);
  const script = new Script(Module.wrap(source), { filename: bundlePath, cachedData: cache.subarray(id.length) });
  assert.equal(script.cachedDataRejected, false);
});

test('the bundle has no import() left: code run by vm.Script has no import callback', () => {
  assert.doesNotMatch(readFileSync(bundlePath, 'utf8'), /\bimport\(/);
});

test('bin/qcow.cjs runs commands through the bundle with nothing extra on stderr', async () => {
  const version = await run(process.execPath, [launcher, '--version']);
  assert.equal(version.code, 0);
  assert.match(version.stdout, /^\d+\.\d+\.\d+\nimage locking: [^\n]+\n$/);
  assert.equal(version.stderr, '');
  const bad = await run(process.execPath, [launcher, 'info', '--output', 'yaml', 'x']);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /^qcow: [^\n]+\n$/);
});
