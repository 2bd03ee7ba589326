/**
 * The package as its users meet it: the packed tarball installed into a fresh project. The Node
 * quick start is taken from the README itself (so the README cannot drift from the package),
 * type-checked under each module resolution TypeScript users have (node16, nodenext, bundler),
 * compiled and run, and its images handed to qemu-img; a browser project bundles `qcow/browser`
 * with esbuild for the browser platform.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { needs, run, scratch } from '../support/qemu.js';

const root = join(import.meta.dirname, '..', '..');
const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
const esbuild = join(root, 'node_modules', '.bin', 'esbuild');

/** The first ```ts block after the README heading `heading`. */
async function readmeBlock(heading: string): Promise<string> {
  const text = await readFile(join(root, 'README.md'), 'utf8');
  const at = text.indexOf(`\n## ${heading}\n`);
  assert.ok(at >= 0, `README has no "## ${heading}"`);
  const m = /```ts\n([\s\S]*?)```/.exec(text.slice(at));
  assert.ok(m, `no ts block under "## ${heading}"`);
  return m[1]!;
}

async function ok(cmd: string, args: string[], cwd: string, what: string) {
  const r = await run(cmd, args, { cwd, timeoutMs: 300_000 });
  assert.equal(r.code, 0, `${what}:\n${r.stdout}\n${r.stderr}`);
  return r;
}

test('the packed tarball in a fresh project: the README quick start type-checks under node16, nodenext and bundler, runs, and qemu-img reads its images; qcow/browser bundles for the browser', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const packed = await ok('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', dir], root, 'npm pack');
  const tarball = join(dir, (JSON.parse(packed.stdout) as { filename: string }[])[0]!.filename);
  const app = join(dir, 'app');
  await mkdir(app);
  await writeFile(join(app, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module', dependencies: { qcow: `file:${tarball}` } }));
  // As a user installs it: the install script runs (the addon is built, or the fallbacks used).
  await ok('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline'], app, 'npm install');

  await writeFile(join(app, 'readme.ts'), await readmeBlock('Quick start: Node library'));
  await writeFile(
    join(app, 'browser.ts'),
    [
      "import { openUrl, asV86Buffer, type BlockDevice } from 'qcow/browser';",
      "const disk: BlockDevice = await openUrl('images/disk.qcow2', { writable: true, http: { chunkSize: 4 << 20 } });",
      'const buffer = asV86Buffer(disk);',
      'console.log(buffer.byteLength);',
    ].join('\n'),
  );
  // Our declarations are checked too (no skipLibCheck): a consumer with a strict setup sees them.
  const common = ['--noEmit', '--strict', '--target', 'es2022', '--skipLibCheck', 'false', '--typeRoots', join(root, 'node_modules', '@types')];
  for (const [mod, resolution] of [
    ['node16', 'node16'],
    ['nodenext', 'nodenext'],
    ['esnext', 'bundler'],
  ] as const) {
    await ok(process.execPath, [tsc, ...common, '--module', mod, '--moduleResolution', resolution, '--types', 'node', 'readme.ts'], app, `tsc ${resolution}`);
  }
  // The browser project has the DOM and no Node types at all.
  await writeFile(
    join(app, 'tsconfig.browser.json'),
    JSON.stringify({ compilerOptions: { noEmit: true, strict: true, target: 'es2022', module: 'esnext', moduleResolution: 'bundler', lib: ['es2022', 'dom'], types: [], skipLibCheck: false }, files: ['browser.ts'] }),
  );
  await ok(process.execPath, [tsc, '-p', 'tsconfig.browser.json'], app, 'tsc browser');

  // Run the quick start as written (type annotations stripped by esbuild, nothing bundled).
  await ok(esbuild, ['readme.ts', '--format=esm', '--platform=node', '--outfile=readme.mjs'], app, 'esbuild readme');
  await ok(process.execPath, ['readme.mjs'], app, 'the README quick start');
  for (const img of ['disk.qcow2', 'top.qcow2']) await ok('qemu-img', ['check', '-q', img], app, `qemu-img check ${img}`);
  await ok('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0xab 1M 64k', 'top.qcow2'], app, 'the write the quick start made');
  await ok('qemu-img', ['info', '--object', 'secret,id=s0,data=hunter2', '--image-opts', 'driver=qcow,file.filename=secret.qcow,encrypt.key-secret=s0'], app, 'the encrypted qcow image');

  // The browser entry bundles without Node's modules.
  await ok(esbuild, ['browser.ts', '--bundle', '--format=esm', '--platform=browser', '--outfile=browser.js'], app, 'esbuild --platform=browser');
  const bundle = await readFile(join(app, 'browser.js'), 'utf8');
  assert.doesNotMatch(bundle, /from\s*["']node:|require\(["']node:/, 'the browser bundle imports no node: module');
  assert.ok((await readdir(app)).includes('browser.js'));
});
