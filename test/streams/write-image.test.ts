/**
 * Writing an image into a stream: every layout (qcow2 v2/v3, 512 B to 2 MiB clusters, refcount
 * widths, zlib and zstd, backing files) checked by qemu-img once the stream ends; a reader that
 * goes away; what a stream cannot do, refused in one line; the library with Node and web streams.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Writable } from 'node:stream';
import { QCOW_BIN, needs, qemuGuestSha256, qemuImg, qemuIo, randomBytes, run, scratch, sha256 } from '../support/qemu.js';
import { MemoryStore } from '#src/storage/memory.js';
import { qcow2Format } from '#src/formats/index.js';
import { writeImageStream } from '#src/streams/write-image.js';
import { webStreamSink } from '#src/streams/sinks.js';
import { nodeWritableSink } from '#src/streams/node-sink.node.js';
import { memorySpill } from '#src/streams/spill.js';

const MiB = 2 ** 20;

/** `qcow convert ARGS... -` into `cat > out`, as a user pipes it. */
async function streamTo(out: string, args: string[], cwd: string) {
  const quoted = [QCOW_BIN, 'convert', ...args, '-'].map((a) => `'${a}'`).join(' ');
  return run('bash', ['-c', `set -o pipefail; ${quoted} | cat > '${out}'`], { cwd });
}

/** A 24 MiB qcow2 (4 KiB clusters) with data, zeros, a compressed cluster and a partial last cluster in the 1M..23M range. */
async function mixedSource(dir: string): Promise<string> {
  const path = join(dir, 'src.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', path, `${24 * MiB - 1536}`]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', '-c', 'write -z 2M 1M', '-c', 'write -P 0x22 5000k 10k', '-c', 'write -c -P 0x33 10M 64k', '-c', `write -P 0x44 ${24 * MiB - 6144} 4608`, path]);
  return path;
}

test('qcow2 into a pipe, every layout: qemu-img check is clean and the content is the source\'s', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const src = await mixedSource(dir);
  const want = await qemuGuestSha256(['-f', 'qcow2', src]);
  for (const o of ['', 'compat=0.10', 'cluster_size=512', 'cluster_size=2M', 'refcount_bits=1,cluster_size=4k', 'refcount_bits=64', 'compression_type=zstd']) {
    for (const compress of [false, true]) {
      const out = join(dir, 'out.qcow2');
      const r = await streamTo(out, ['-O', 'qcow2', ...(o ? ['-o', o] : []), ...(compress ? ['-c'] : []), '-f', 'qcow2', src], dir);
      assert.equal(r.code, 0, `${o} -c=${compress}: ${r.stderr}`);
      await qemuImg(['check', '-q', out]);
      assert.equal(await qemuGuestSha256(['-f', 'qcow2', out]), want, `${o} -c=${compress}`);
    }
  }
  // Raw into a pipe: the guest bytes, byte for byte.
  const raw = join(dir, 'out.raw');
  assert.equal((await streamTo(raw, ['-O', 'raw', '-f', 'qcow2', src], dir)).code, 0);
  assert.equal(sha256(new Uint8Array(await readFile(raw))), want);
});

test('a backing file: one of the source\'s chain is not copied, another one is overridden with zeros', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  await mixedSource(dir);
  const top = join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'src.qcow2', '-F', 'qcow2', top]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x55 512k 1M', '-c', 'write -z 10M 4k', top]);
  const want = await qemuGuestSha256(['-f', 'qcow2', top]);
  const unrelated = join(dir, 'other.raw');
  await writeFile(unrelated, new Uint8Array(24 * MiB - 1536).fill(0x77));
  for (const [backing, fmt, opts] of [['src.qcow2', 'qcow2', ''], ['other.raw', 'raw', ''], ['other.raw', 'raw', 'compat=0.10']]) {
    for (const compress of [false, true]) {
      const out = join(dir, 'out.qcow2');
      const r = await streamTo(out, ['-O', 'qcow2', '-B', backing!, '-F', fmt!, ...(opts ? ['-o', opts] : []), ...(compress ? ['-c'] : []), top], dir);
      assert.equal(r.code, 0, r.stderr);
      await qemuImg(['check', '-q', out]);
      assert.equal(await qemuGuestSha256(['-f', 'qcow2', out], dir), want, `${backing} ${opts} -c=${compress}`);
    }
  }
  // With the source's own backing file only the top's clusters are in the stream.
  const out = join(dir, 'small.qcow2');
  await streamTo(out, ['-O', 'qcow2', '-B', 'src.qcow2', '-F', 'qcow2', top], dir);
  assert.ok((await stat(out)).size < 2 * MiB);
});

test('a 1 TiB sparse source streams its few clusters only', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const src = join(dir, 'big.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', src, '1T']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 1G 3M', '-c', 'write -P 2 700G 1M', src]);
  const out = join(dir, 'out.qcow2');
  assert.equal((await streamTo(out, ['-O', 'qcow2', src], dir)).code, 0);
  await qemuImg(['check', '-q', out]);
  await qemuImg(['compare', '-q', src, out]);
  assert.ok((await stat(out)).size < 8 * MiB);
});

test('a reader that goes away, and what a stream cannot do: one line each, non-zero exit', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const src = await mixedSource(dir);
  const quoted = `'${QCOW_BIN}' convert -O raw '${src}' -`;
  const r = await run('bash', ['-c', `${quoted} | head -c 1000 > /dev/null; exit \${PIPESTATUS[0]}`]);
  assert.notEqual(r.code, 0);
  assert.equal(r.stderr.trim(), 'qcow: cannot write to standard output: the reader closed it before the image was complete');
  for (const [args, line] of [
    [['-n'], /-n cannot be used when writing to standard output/],
    [['-C'], /-C cannot be used/],
    [['-o', 'extended_l2=on'], /extended L2 entries cannot be written to a stream/],
    [['-o', 'preallocation=metadata'], /preallocation=metadata cannot be written to a stream/],
  ] as const) {
    const res = await streamTo(join(dir, 'x'), ['-O', 'qcow2', ...args, src], dir);
    assert.notEqual(res.code, 0);
    assert.match(res.stderr.trim(), line);
    assert.equal(res.stderr.trim().split('\n').length, 1);
  }
});

test('the library: a function, a Node Writable and a web WritableStream receive the same image', async () => {
  const store = new MemoryStore();
  await qcow2Format.create(store, { size: 5 * MiB + 512, options: { cluster_size: '65536' } });
  const dev = await qcow2Format.open(store);
  const data = randomBytes(MiB, 4);
  await dev.write(0, data);
  await dev.write(4 * MiB, data.subarray(0, 4096));
  const collect = async (make: (chunks: Uint8Array[]) => Promise<{ sink: (c: Uint8Array) => Promise<void>; end: () => Promise<void> }>) => {
    const chunks: Uint8Array[] = [];
    const { sink, end } = await make(chunks);
    await writeImageStream([dev], sink, { format: 'qcow2', compress: true, spill: memorySpill() });
    await end();
    return Buffer.concat(chunks);
  };
  const viaFunction = await collect(async (chunks) => ({ sink: async (c) => void chunks.push(c.slice()), end: async () => undefined }));
  const viaNode = await collect(async (chunks) => {
    const w = new Writable({ write: (c: Buffer, _e, cb) => (chunks.push(new Uint8Array(c)), cb()) });
    const s = nodeWritableSink(w);
    return { sink: s.sink, end: s.finish };
  });
  const viaWeb = await collect(async (chunks) => {
    const s = webStreamSink(new WritableStream<Uint8Array>({ write: (c) => void chunks.push(c.slice()) }));
    return { sink: s.sink, end: s.close };
  });
  assert.deepEqual(viaNode, viaFunction);
  assert.deepEqual(viaWeb, viaFunction);
  // The bytes are a qcow2 image with the source's content.
  const copy = await qcow2Format.open(new MemoryStore(new Uint8Array(viaFunction)), { readOnly: true });
  const got = new Uint8Array(dev.size);
  await copy.read(0, got);
  const want = new Uint8Array(dev.size);
  await dev.read(0, want);
  assert.deepEqual(got, want);
  await copy.close();
  await dev.close();
});

const NODE_ENTRY = fileURLToPath(new URL('../../dist/node.js', import.meta.url));

test('fdSink: a pipe (data spliced from the file, also when made non-blocking) and a file get the bytes a function sink gets', async (t) => {
  const dir = await scratch(t);
  // Data, a hole, more data, and an end inside a cluster: the stream pads the last cluster.
  const file = join(dir, 'src.raw');
  const size = 3 * MiB + 1000;
  await writeFile(file, new Uint8Array(size));
  const bytes = new Uint8Array(await readFile(file));
  bytes.set(randomBytes(MiB, 7), 0);
  bytes.set(randomBytes(MiB + 1000, 8).subarray(0, MiB + 1000), 2 * MiB);
  await writeFile(file, bytes);
  const { openImage } = (await import(NODE_ENTRY)) as typeof import('#src/node.js');
  for (const format of ['qcow2', 'raw']) {
    await using src = await openImage(file, { readOnly: true, format: 'raw' });
    const chunks: Uint8Array[] = [];
    await writeImageStream([src], async (c) => void chunks.push(c.slice()), { format });
    const want = sha256(new Uint8Array(Buffer.concat(chunks)));
    const script = `
      const { openImage, fdSink, writeImageStream } = await import(${JSON.stringify(NODE_ENTRY)});
      if (process.argv[1] === 'nonblocking') process.stdout; // libuv sets O_NONBLOCK on the pipe
      const src = await openImage(${JSON.stringify(file)}, { readOnly: true, format: 'raw' });
      const out = fdSink(1);
      await writeImageStream([src], out.sink, { format: ${JSON.stringify(format)} });
      await out.finish();
      await src.close();
    `;
    for (const how of ['blocking', 'nonblocking']) {
      const r = await run('bash', ['-c', `set -o pipefail; node --input-type=module -e "$0" ${how} | sha256sum`, script]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.split(' ')[0], want, `${format} into a ${how} pipe`);
    }
    const out = join(dir, 'out');
    const r = await run('bash', ['-c', `node --input-type=module -e "$0" > '${out}'`, script]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(sha256(new Uint8Array(await readFile(out))), want, `${format} into a file`);
  }
});
