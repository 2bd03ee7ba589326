/**
 * Codec test data of mixed compressibility, shared by the zlib and zstd tests.
 *
 * `mixedSource`: a 4 MiB raw image of mixed compressibility: 1 MiB of repeated `phrase`
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

/**
 * Clusters of the kinds images hold, in this order: random, zeros, text, half-random, a small
 * piece of text, 512 random bytes, and 2 MiB of text (a 2 MiB-cluster image's). `seed` to
 * `seed + 2` pick the random ones.
 */
export function clusterKinds(phrase: string, seed: number): Uint8Array[] {
  const text = new TextEncoder().encode(phrase.repeat(Math.ceil((2 * MiB + 3) / phrase.length)));
  return [
    randomBytes(65536, seed),
    new Uint8Array(65536),
    text.subarray(0, 65536),
    randomBytes(65536, seed + 1).map((b, i) => (i % 5 < 2 ? b : i & 0x3f)),
    text.subarray(3, 3 + 4096),
    randomBytes(512, seed + 2),
    text.subarray(0, 2 * MiB),
  ];
}
