/**
 * Child process of the crash tests: writes pseudo-random data at pseudo-random offsets into an
 * image forever, flushing now and then, until it is killed. Protocol on stdout, one line each,
 * written BEFORE the write starts / AFTER the flush completes:
 *   w <offset> <length> <seed>      a write is about to start (its data: randomBytes(length, seed))
 *   d <offset> <length>             a discard of whole 64 KiB blocks is about to start (they read
 *                                   as zeros afterwards: qcow2 v3 without a backing file)
 *   f                               every write announced so far is durable
 * Usage: node crash-writer.node.js IMAGE FORMAT SEED [CACHE_BYTES [FLUSH_ONE_IN [DISCARD_ONE_IN]]]
 */
import { writeSync } from 'node:fs';
import { openImage } from '#src/node.js';
import { randomBytes } from './qemu.js';

const [image, format, seedText, cacheText, flushText, discardText] = process.argv.slice(2);
/** A flush after about one write in this many. */
const flushOneIn = Number(flushText) || 8;
/** A discard instead of about one write in this many (0: never). */
const discardOneIn = Number(discardText) || 0;
const DISCARD_UNIT = 64 * 1024;
let x = Number(seedText) >>> 0 || 1;
const rand = (n: number): number => {
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  return (x >>> 0) % n;
};

// Pending bitmap ranges are applied every few writes, so kills land in the middle of that too.
const dev = await openImage(image!, { format, bitmapLimits: { maxPendingRanges: 8 }, ...(cacheText ? { cacheBytes: Number(cacheText) } : {}) });
const say = (line: string) => writeSync(1, line + '\n');
for (let i = 0; ; i++) {
  // Small unaligned writes (partial clusters: read-modify-write) and larger runs of whole sectors.
  const len = rand(3) === 0 ? 1 + rand(4096) : 512 * (1 + rand(256));
  const off = rand(dev.size - len);
  const seed = (Number(seedText) * 100003 + i) >>> 0 || 1;
  if (discardOneIn > 0 && rand(discardOneIn) === 0) {
    // Discards free clusters that the next writes reuse: kills land between the two as well.
    const units = Math.floor(dev.size / DISCARD_UNIT);
    const n = 1 + rand(4);
    const at = rand(units - n + 1) * DISCARD_UNIT;
    say(`d ${at} ${n * DISCARD_UNIT}`);
    await dev.discard(at, n * DISCARD_UNIT);
  } else {
    say(`w ${off} ${len} ${seed}`);
    await dev.write(off, randomBytes(len, seed));
  }
  if (rand(flushOneIn) === 0) {
    await dev.flush();
    say('f');
  }
}
