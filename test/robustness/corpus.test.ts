/**
 * The broken-image corpus (corpus.ts) through the command line, as a user meets it: `qcow info
 * --backing-chain`, `qcow convert -O raw`, `qcow map` and, for qcow2, `qcow check`. For every
 * image and command:
 *  - a command the case says must fail exits non-zero (4 for passwords);
 *  - a failure is exactly one stderr line `qcow: <file>: ...` naming the image (or the file of its
 *    chain at fault), never a stack trace (`qcow check` prints its findings, one per line);
 *  - no process hangs (a generous kill timer is only a hang guard) or peaks above 300 MiB resident
 *    (measured with /usr/bin/time when present);
 *  - the image and every file of its chain are byte-identical afterwards.
 * Header-field cases run convert only (opening is the same for all), unless QCOW_CORPUS_FULL=1.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CLI, needs, qcow, qemuImg, scratch, sha256 } from '../support/qemu.js';
import { buildCorpus, type CorpusCase, type CorpusCommand } from './corpus.js';

const TIME = '/usr/bin/time';
const HANG_GUARD_MS = 60_000;
const MAX_RSS_KIB = 300 * 1024;
const FULL = process.env.QCOW_CORPUS_FULL === '1';

interface Outcome {
  code: number | null;
  signal: string | null;
  stderr: string[];
  peakKiB?: number;
}

function runCli(args: string[], cwd: string): Promise<Outcome> {
  const timed = existsSync(TIME);
  const [cmd, argv] = timed ? [TIME, ['-f', 'peak-rss-kib %M', process.execPath, CLI, ...args]] : [process.execPath, [CLI, ...args]];
  return new Promise((resolve) => {
    execFile(cmd, argv, { cwd, timeout: HANG_GUARD_MS, killSignal: 'SIGKILL', maxBuffer: 64 << 20 }, (err, _stdout, stderr) => {
      let peakKiB: number | undefined;
      const lines = String(stderr)
        .split('\n')
        .filter((l) => {
          const m = /^peak-rss-kib (\d+)$/.exec(l);
          if (m) peakKiB = Number(m[1]);
          return l !== '' && !m && !/^Command (exited with non-zero status|terminated by signal)/.test(l);
        });
      const e = err as (NodeJS.ErrnoException & { code?: number | string; signal?: string; killed?: boolean }) | null;
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, signal: e?.killed ? 'SIGKILL' : (e?.signal ?? null), stderr: lines, peakKiB });
    });
  });
}

function commandsFor(c: CorpusCase): CorpusCommand[] {
  const all: CorpusCommand[] = c.format === 'qcow2' ? ['info', 'convert', 'map', 'check'] : ['info', 'convert', 'map'];
  if (c.name.startsWith('qcow2/bitmaps/')) all.push('bitmaps');
  // A broken header stops every command at the same place (opening): convert, which also reads
  // everything, stands for them all by default.
  return FULL || !c.name.includes('/header/') ? all : ['convert'];
}

function argsFor(cmd: CorpusCommand, c: CorpusCase, out: string): string[] {
  const common = ['-f', c.format];
  switch (cmd) {
    case 'info':
      return ['info', ...common, ...(c.args ?? []), '--backing-chain', c.file];
    case 'convert':
      return ['convert', ...common, ...(c.args ?? []), '-O', 'raw', c.file, out];
    case 'map':
      return ['map', ...common, ...(c.args ?? []), c.file];
    case 'check':
      return ['check', ...common, c.file];
    case 'bitmaps':
      return ['convert', ...common, '--bitmaps', '-O', 'qcow2', c.file, out];
  }
}

/** Run `jobs` two at a time (the machine is shared). */
async function pool<T>(jobs: (() => Promise<T>)[], width = 2): Promise<T[]> {
  const results: T[] = new Array(jobs.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (next < jobs.length) {
        const i = next++;
        results[i] = await jobs[i]!();
      }
    }),
  );
  return results;
}

async function hashes(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const name of await readdir(dir)) out.set(name, sha256(await readFile(join(dir, name))));
  return out;
}

test('broken-image corpus: one clean error line, bounded time and memory, nothing written', needs('qemu-img', 'qemu-io'), async (t) => {
  const root = await scratch(t);
  const dir = join(root, 'corpus');
  const outDir = join(root, 'out');
  await mkdir(dir);
  await mkdir(outDir);
  const cases = await buildCorpus(dir);
  const before = await hashes(dir);

  const problems: string[] = [];
  let runs = 0;
  let peak = 0;
  const jobs = cases.flatMap((c, ci) =>
    commandsFor(c).map((cmd) => async () => {
      const out = join(outDir, `${ci}-${cmd}.raw`);
      const r = await runCli(argsFor(cmd, c, out), dir);
      await rm(out, { force: true });
      runs++;
      peak = Math.max(peak, r.peakKiB ?? 0);
      const where = `${c.name} [${cmd}]`;
      const text = r.stderr.join('\n');
      if (r.signal) return problems.push(`${where}: killed by ${r.signal} (hang guard ${HANG_GUARD_MS} ms)`);
      if (r.peakKiB !== undefined && r.peakKiB > MAX_RSS_KIB) problems.push(`${where}: peak RSS ${r.peakKiB} KiB`);
      if (/^\s+at .+[:(]\d+/m.test(text) || /\b(TypeError|RangeError|ReferenceError)\b/.test(text)) problems.push(`${where}: stack trace or internal error: ${text}`);
      if (c.mustFail.includes(cmd) && r.code === 0) problems.push(`${where}: exit 0, must fail`);
      if (r.code === 0) return;
      if (cmd === 'check') {
        if (r.stderr.length === 0 && r.code !== 2 && r.code !== 3) problems.push(`${where}: exit ${r.code} without a word`);
        return;
      }
      const names = [c.file, ...(c.related ?? [])];
      const line = r.stderr[0] ?? '';
      if (r.stderr.length !== 1) problems.push(`${where}: ${r.stderr.length} stderr lines: ${text}`);
      else if (!names.some((n) => line.startsWith(`qcow: ${n}: `)) || line.length <= `qcow: ${c.file}: `.length) problems.push(`${where}: error line does not name the image: ${line}`);
      if (c.exitCode !== undefined && c.mustFail.includes(cmd) && r.code !== c.exitCode) problems.push(`${where}: exit ${r.code}, expected ${c.exitCode}: ${line}`);
    }),
  );
  await pool(jobs);

  const after = await hashes(dir);
  for (const [name, h] of before) if (after.get(name) !== h) problems.push(`${name} was modified`);
  assert.deepEqual(problems, []);
  t.diagnostic(`${cases.length} images, ${runs} runs, peak RSS ${Math.round(peak / 1024)} MiB`);
  assert.ok(cases.length >= 100 && runs >= 200, `${cases.length} cases, ${runs} runs`);
});

/** `qcow check` refuses what opening refuses (qemu-img check exits 1 on these too). */
test('qcow check refuses images whose header the qcow2 driver refuses', needs('qemu-img'), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
  const bytes = new Uint8Array(await readFile(base));
  const cases: [string, (b: DataView) => void][] = [
    ['crypt_method=3', (b) => b.setUint32(32, 3)],
    ['incompatible_features bit 40', (b) => b.setBigUint64(72, 1n << 40n)],
  ];
  for (const [name, mutate] of cases) {
    const copy = bytes.slice();
    mutate(new DataView(copy.buffer));
    const file = join(dir, `${name}.qcow2`);
    await writeFile(file, copy);
    const r = await qcow(['check', file]);
    assert.notEqual(r.code, 0, `${name}: ${r.stdout}`);
    assert.equal(r.stderr.trim().split('\n').length, 1);
  }
});
