/**
 * bin/qcow.cjs runs the CLI from a bundle that `npm run build` makes, compiled from V8's code
 * cache (see scripts/build-cli.mjs): the whole CLI's, or a common command's own. These check that
 * the build left pairs that belong together and that V8 takes each cache, since a rejected cache
 * costs every command ~25 ms without failing, and that the launcher picks the command's bundle.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { Script } from 'node:vm';
import { run } from '../support/qemu.js';

const dir = join(import.meta.dirname, '..', '..', 'dist', 'cli');
const launcher = join(dir, '..', '..', 'bin', 'qcow.cjs');
const bundles = readdirSync(dir).filter((f) => /^qcow\.(bundle|cmd-[a-z-]+)\.cjs$/.test(f));
const { bundleFor } = createRequire(import.meta.url)(launcher) as { bundleFor: (argv: string[]) => string | undefined };

test('every bundle and its code cache carry the same identity comment, and V8 accepts the cache', () => {
  assert.ok(bundles.includes('qcow.bundle.cjs') && bundles.includes('qcow.cmd-info.cjs'), bundles.join(' '));
  for (const name of bundles) {
    const source = readFileSync(join(dir, name), 'latin1');
    const cache = readFileSync(join(dir, name.replace(/\.cjs$/, '.cache')));
    const id = source.slice(0, source.indexOf('*/') + 2);
    assert.match(id, /^\/\* qcow-bundle [0-9a-f]{64} \*\/$/, name);
    assert.equal(cache.subarray(0, id.length).toString(), id, name);
    // Compiled as the launcher does: the file is one function expression, not Module.wrap'ped.
    // The data starts 8-byte aligned after the identity (V8 would copy it otherwise).
    assert.equal(cache.subarray(id.length, Math.ceil(id.length / 8) * 8).toString().trim(), '', name);
    const script = new Script(source, { filename: join(dir, name), cachedData: cache.subarray(Math.ceil(id.length / 8) * 8) });
    assert.equal(script.cachedDataRejected, false, name);
    assert.equal(typeof script.runInThisContext(), 'function', name);
  }
});

test('the bundles have no import() left: code run by vm.Script has no import callback', () => {
  for (const name of bundles) assert.doesNotMatch(readFileSync(join(dir, name), 'latin1'), /\bimport\(/, name);
});

test('the launcher picks the bundle of the command, also behind the qemu-img persona', () => {
  const pick = (...args: string[]) => bundleFor(['node', 'qcow', ...args]);
  assert.equal(pick('info', 'x.qcow2'), 'info');
  assert.equal(pick('convert', '-O', 'raw', 'a', 'b'), 'convert');
  assert.equal(pick('--persona=qemu-img', '-T', 'trace-event', 'check', 'x'), 'check');
  assert.equal(pick('--persona=qemu-img', '--trace=x', 'map', 'x'), 'map');
  assert.equal(pick('--persona=qemu-io', '-c', 'read 0 64k', 'x'), 'qemu-io');
  assert.equal(pick('--persona=qemu-img', '--version'), undefined);
  assert.equal(pick('--help'), undefined);
  assert.equal(pick('/some/file'), undefined);
});

test('a command whose bundle leaves out the others still runs them from the whole CLI when asked', async () => {
  // `amend` has no bundle of its own: the launcher falls back to the whole CLI's.
  const r = await run(process.execPath, [launcher, 'amend', '-f', 'qcow2', '-o', 'help', 'no-such.qcow2']);
  assert.match(r.stdout, /^Amend options for 'qcow2':/);
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
