/**
 * Ways to break a valid image, the kinds of damage hostile or corrupted files carry: header fields
 * set to extremes, table entries pointed at nonsense, flipped bits, files cut short. Each mutation
 * is a pure function of the image bytes and a random source, so a failing case replays from its seed.
 */
export type Rand = () => number; // uniform in [0, 1)

/** xorshift32: small, fast and seedable, so fuzz cases replay exactly. */
export function seededRandom(seed: number): Rand {
  let x = seed >>> 0 || 0x9e3779b9;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

const pick = <T>(r: Rand, xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
const int = (r: Rand, n: number) => Math.floor(r() * n);

/** Values that break arithmetic: zero, one, all-ones, sign bits, just past limits. */
function extreme(r: Rand, bytes: number, fileSize: number): bigint {
  const max = (1n << BigInt(bytes * 8)) - 1n;
  const candidates = [0n, 1n, max, max >> 1n, (max >> 1n) + 1n, BigInt(fileSize), BigInt(fileSize) + 512n, BigInt(fileSize) * 1024n, 1n << 53n, 0x200n, 0x7fffffffn, 0x80000000n, 0xffffffffn];
  let v = pick(r, candidates);
  if (r() < 0.3) v = BigInt(int(r, 2 ** 31)) * BigInt(1 + int(r, 4096));
  return v & max;
}

function setBE(buf: Uint8Array, off: number, bytes: number, v: bigint): void {
  for (let i = bytes - 1; i >= 0; i--) {
    buf[off + i] = Number(v & 0xffn);
    v >>= 8n;
  }
}

export interface Mutation {
  describe: string;
  apply(image: Uint8Array): Uint8Array;
}

/**
 * A random mutation. `headerSize` bounds the header-field smashes (48 for qcow v1, 112 for qcow2).
 * `hot`: [start, end) byte ranges of structures worth aiming at (a bitmap directory and its
 * tables, which lie past where the other kinds mostly land); with them, a third of the mutations
 * set a field inside one of them to an extreme value.
 */
export function randomMutation(r: Rand, headerSize: number, hot: ReadonlyArray<readonly [number, number]> = []): Mutation {
  if (hot.length > 0 && r() < 1 / 3) {
    const [start, end] = pick(r, hot);
    const width = pick(r, [1, 2, 4, 8]);
    const span = Math.max(1, Math.floor((end - start) / width));
    const off = start + int(r, span) * width;
    const seed = r();
    return {
      describe: `u${width * 8} at ${off} (in [${start}, ${end})) set to an extreme value`,
      apply: (img) => {
        const out = img.slice();
        if (off + width <= out.length) setBE(out, off, width, extreme(seededRandom(Math.floor(seed * 2 ** 32)), width, img.length));
        return out;
      },
    };
  }
  const kind = pick(r, ['header-field', 'header-field', 'table-entry', 'bit-flip', 'truncate', 'byte-run'] as const);
  switch (kind) {
    case 'header-field': {
      const width = pick(r, [1, 2, 4, 8]);
      const off = Math.min(headerSize - width, int(r, headerSize / width) * width);
      const seed = r();
      return {
        describe: `header u${width * 8} at ${off} set to an extreme value`,
        apply: (img) => {
          const out = img.slice();
          setBE(out, off, width, extreme(seededRandom(Math.floor(seed * 2 ** 32)), width, img.length));
          return out;
        },
      };
    }
    case 'table-entry': {
      const seed = r();
      return {
        describe: 'a non-zero 8-byte word after the header pointed elsewhere',
        apply: (img) => {
          const rr = seededRandom(Math.floor(seed * 2 ** 32));
          const out = img.slice();
          const words: number[] = [];
          for (let o = headerSize - (headerSize % 8); o + 8 <= img.length && words.length < 4096; o += 8) {
            if (img[o + 7] !== 0 || img[o + 6] !== 0 || img[o + 5] !== 0) {
              // Looks like an offset or a descriptor: worth pointing somewhere bad.
              const hi = (img[o]! | img[o + 1]! | img[o + 2]!) & 0x3f;
              if (hi === 0) words.push(o);
            }
          }
          if (words.length === 0) return out;
          const o = pick(rr, words);
          const flags = BigInt(out[o]! & 0xc0) << 56n;
          setBE(out, o, 8, flags | (extreme(rr, 7, img.length) & 0x00ff_ffff_ffff_fe00n));
          return out;
        },
      };
    }
    case 'bit-flip': {
      const n = 1 + int(r, 8);
      const offs = Array.from({ length: n }, () => r());
      const bits = Array.from({ length: n }, () => int(r, 8));
      return {
        describe: `${n} bit(s) flipped`,
        apply: (img) => {
          const out = img.slice();
          offs.forEach((f, i) => {
            // Half the flips land in the first 64 KiB, where the metadata of small images lives.
            const o = i % 2 === 0 ? Math.floor(f * Math.min(img.length, 65536)) : Math.floor(f * img.length);
            out[o]! ^= 1 << bits[i]!;
          });
          return out;
        },
      };
    }
    case 'truncate': {
      const f = r();
      return { describe: `cut to ${(f * 100).toFixed(1)}% of its length`, apply: (img) => img.slice(0, Math.floor(f * img.length)) };
    }
    case 'byte-run': {
      const f = r();
      const len = 1 + int(r, 64);
      const value = pick(r, [0x00, 0xff, 0x80, int(r, 256)]);
      return {
        describe: `${len} bytes set to 0x${value.toString(16)}`,
        apply: (img) => {
          const out = img.slice();
          const o = Math.floor(f * Math.min(img.length, 131072));
          out.fill(value, o, Math.min(out.length, o + len));
          return out;
        },
      };
    }
  }
}
