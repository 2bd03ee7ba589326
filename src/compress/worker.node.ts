/** A codec worker (see pool.node.ts): runs batches of cluster jobs and sends the results back. */
import { parentPort } from 'node:worker_threads';
import { needsZstdWasm, runNow, zstdReadyHere } from './kernels.node.js';
import type { JobMessage, ResultMessage } from './pool.node.js';

const port = parentPort!;
// Batches are handled one after another (a zstd batch may first wait for the WebAssembly module
// to load: always to compress, and to decode where libzstd is not there).
let chain: Promise<void> = Promise.resolve();

port.on('message', (jobs: JobMessage[]) => {
  chain = chain.then(async () => {
    if (jobs.some((j) => needsZstdWasm(j.op))) await zstdReadyHere();
    const results: ResultMessage[] = [];
    const transfer: ArrayBuffer[] = [];
    for (const j of jobs) {
      // The input buffer goes back for the pool's next job (no result below holds on to it).
      const input = j.data.buffer as ArrayBuffer;
      try {
        let out = runNow(j.op, j.data, j.outSize, j.into);
        // Transfer only a buffer the result owns whole (zlib may hand back a slice of a larger one).
        if (out !== j.into && (out.byteOffset !== 0 || out.byteLength !== out.buffer.byteLength || out.buffer === input)) out = out.slice();
        results.push({ id: j.id, data: out, input });
        transfer.push(out.buffer as ArrayBuffer, input);
      } catch (e) {
        const err = e as { code?: unknown; message?: unknown };
        results.push({ id: j.id, error: { code: typeof err.code === 'string' && err.code.startsWith('QCOW_') ? err.code : 'QCOW_CORRUPT', message: String(err.message ?? e) }, input });
        transfer.push(input);
      }
    }
    port.postMessage(results, transfer);
  });
});
port.postMessage('ready');
