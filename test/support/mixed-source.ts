/**
 * A 4 MiB raw image of mixed compressibility for the codec tests: 1 MiB of repeated `phrase`
 * (small compressed clusters), 1 MiB of half-random bytes (large ones), 512 KiB of random bytes
 * (stored plain by qemu-img) and zeros between and after. `seed` and `seed + 1` pick the random
 * parts, so two tests can use different data of the same shape.
 */
import { randomBytes } from './qemu.js';

const MiB = 1024 * 1024;

export function mixedSource(phrase: string, seed: number): Uint8Array {
  const text = new TextEncoder().encode(phrase.repeat(Math.ceil(MiB / phrase.length)));
  const src = new Uint8Array(4 * MiB);
  src.set(text.subarray(0, MiB), 0);
  src.set(randomBytes(MiB, seed).map((b, i) => (i % 3 ? b & 0x0f : b)), MiB);
  src.set(randomBytes(MiB / 2, seed + 1), 3 * MiB);
  return src;
}
