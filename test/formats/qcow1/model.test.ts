/**
 * Random operation sequences against a plain byte array: for any geometry QEMU accepts, with or
 * without a backing file, with or without AES, and with a tiny L2 cache, the image reads what a
 * simple disk would, before and after reopening.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { memImage, readAll } from './qcow1.test.helpers.js';

type Op = { kind: 'write' | 'zero' | 'compress'; at: number; len: number; fill: number };

test('random writes, zero writes and compressed writes read back like a plain disk', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.record({
        clusterBits: fc.integer({ min: 9, max: 13 }),
        l2Bits: fc.integer({ min: 6, max: 9 }),
        sectors: fc.integer({ min: 1, max: 160 }),
        backing: fc.boolean(),
        aes: fc.boolean(),
        tinyCache: fc.boolean(),
        ops: fc.array(
          fc.record({ kind: fc.constantFrom<Op['kind']>('write', 'write', 'zero', 'compress'), at: fc.nat(), len: fc.integer({ min: 1, max: 20000 }), fill: fc.integer({ min: 1, max: 255 }) }),
          { maxLength: 12 },
        ),
      }),
      async (p) => {
        const size = p.sectors * 512;
        const cs = 2 ** p.clusterBits;
        const backing = p.backing ? Uint8Array.from({ length: size - 512 * (p.sectors >> 2) }, (_, i) => (i * 7 + 3) & 0xff) : undefined;
        const img = await memImage({ size, clusterBits: p.clusterBits, l2Bits: p.l2Bits, backing, password: p.aes ? 'pw' : undefined, cacheBytes: p.tinyCache ? 1 : undefined });
        const model = new Uint8Array(size);
        if (backing) model.set(backing);
        for (const op of p.ops) {
          const at = op.at % size;
          const len = Math.min(op.len, size - at);
          if (op.kind === 'compress') {
            if (p.aes) continue;
            const start = at - (at % cs);
            const n = Math.min(cs, size - start);
            // alternate compressible and incompressible clusters
            const data = op.fill % 2 ? new Uint8Array(n).fill(op.fill) : Uint8Array.from({ length: n }, (_, i) => (i * op.fill * 2654435761) >>> 24);
            await img.dev.writeCompressed!(start, data);
            model.set(data, start);
          } else if (op.kind === 'zero') {
            await img.dev.writeZeroes(at, len);
            model.fill(0, at, at + len);
          } else {
            const data = new Uint8Array(len).fill(op.fill);
            await img.dev.write(at, data);
            model.set(data, at);
          }
        }
        assert.deepEqual(await readAll(img.dev), model);
        await img.dev.close();
        assert.deepEqual(await readAll(await img.reopen()), model);
      },
    ),
    { numRuns: 60 },
  );
});
