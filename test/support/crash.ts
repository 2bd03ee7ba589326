/** Shared pieces of the crash tests: a writer child killed at a chosen moment, and whole-image reads. */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { openImage } from '#src/node.js';
import { randomBytes } from './qemu.js';

const WRITER = fileURLToPath(new URL('./crash-writer.node.js', import.meta.url));

/** The whole guest content of an image, as our reader sees it. */
export async function readGuest(file: string, format: string): Promise<Uint8Array> {
  const dev = await openImage(file, { format, readOnly: true });
  try {
    const buf = new Uint8Array(dev.size);
    await dev.read(0, buf);
    return buf;
  } finally {
    await dev.close();
  }
}

/**
 * Run the writer child on `file`, SIGKILL it at the chosen moment, and return what it announced.
 * The moment is counted in the child's own progress, not in time from its start: once it has
 * announced `kill.afterLines` lines, it is killed `kill.thenMs` milliseconds later (0 kills at once),
 * so a round exercises as many writes and flushes on a loaded machine as on a quiet one, and
 * the delay still lands the kill at varying points inside an operation.
 * `cacheBytes`: the writer's metadata cache budget (small ones make it evict and spill tables);
 * `flushOneIn`: it flushes after about one write in this many (default 8); `discardOneIn`: it
 * discards instead of about one write in this many (default 0, never).
 */
export function crashRound(file: string, format: string, seed: number, kill: { afterLines: number; thenMs: number }, options: { cacheBytes?: number; flushOneIn?: number; discardOneIn?: number } = {}): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const args = [WRITER, file, format, String(seed), String(options.cacheBytes ?? 0), String(options.flushOneIn ?? 8), String(options.discardOneIn ?? 0)];
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    // Counting announcements rather than milliseconds: Node's start-up and the writes themselves
    // take several times longer on a loaded machine, and a round killed after a handful of writes
    // tests little (CI once saw 109 writes and no flush in 8 rounds of 150-750 ms each).
    let timer: NodeJS.Timeout | undefined;
    let seen = 0;
    child.stdout.on('data', (d: Buffer) => {
      const text = d.toString();
      out += text;
      for (let i = text.indexOf('\n'); i !== -1; i = text.indexOf('\n', i + 1)) seen++;
      if (seen >= kill.afterLines && timer === undefined) timer = setTimeout(() => child.kill('SIGKILL'), kill.thenMs);
    });
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (signal !== 'SIGKILL') reject(new Error(`child ended by itself (code ${code}): ${err}`));
      else resolve(out.split('\n').filter(Boolean));
    });
  });
}

/**
 * Apply what a killed writer announced (see crash-writer.node.ts) to `model`, the expected guest
 * content: writes and discards (zeros) before its last completed flush are durable and go into
 * the model; bytes that later ones touched may hold old or new data and are marked in `maybe` (1 = not checked).
 */
export function applyAnnounced(lines: string[], model: Uint8Array): { maybe: Uint8Array; lastFlush: number; flushes: number } {
  const lastFlush = lines.lastIndexOf('f');
  const maybe = new Uint8Array(model.length);
  lines.forEach((l, i) => {
    const kind = l[0];
    if (kind !== 'w' && kind !== 'd') return;
    const [, off, len, seed] = l.split(' ').map(Number) as [number, number, number, number];
    if (i >= lastFlush) maybe.fill(1, off, off + len);
    else if (kind === 'w') model.set(randomBytes(len, seed), off);
    else model.fill(0, off, off + len);
  });
  return { maybe, lastFlush, flushes: lines.filter((l) => l === 'f').length };
}
