/**
 * Interop for writing: images we create (every create option) and write read identically in
 * qemu with `qemu-img check` clean; images qemu made stay clean after our writes; our check agrees
 * with qemu-img check on clean, leaky and corrupted images.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { needs, qemuGuestSha256, qemuImg, qemuIo, qcow, qcowOk, run, scratch, sha256 } from '../../support/qemu.js';

const IO = ['-c', 'write -P 0xab 0 1M', '-c', 'write -P 0x11 100k 3k', '-c', 'write -z 2M 128k', '-c', 'write -P 0x22 3M 64k', '-c', 'discard 3M 64k', '-c', 'write -P 0x44 3500k 1k', '-c', 'write -c -P 0x33 1M 128k', '-c', 'flush'];

/** The same writes on a raw file through qemu-io: the expected guest content. */
async function expected(dir: string, size: string, io: string[]): Promise<string> {
  const raw = join(dir, `expect-${Math.random().toString(36).slice(2)}.raw`);
  await qemuImg(['create', '-q', '-f', 'raw', raw, size]);
  await qemuIo(['-f', 'raw', ...io.map((a) => a.replace('write -c', 'write')), raw]);
  return sha256(await readFile(raw));
}

async function qemuCheckClean(file: string, extra: string[] = []): Promise<void> {
  const r = await run('qemu-img', ['check', ...extra, file]);
  assert.equal(r.code, 0, `qemu-img check ${file}: ${r.stdout}${r.stderr}`);
}

const OPTION_SETS = [
  '',
  'compat=0.10',
  'cluster_size=512',
  'cluster_size=4k',
  'cluster_size=2M',
  'refcount_bits=1',
  'refcount_bits=2',
  'refcount_bits=4',
  'refcount_bits=8',
  'refcount_bits=32',
  'refcount_bits=64',
  'lazy_refcounts=on',
  'extended_l2=on',
  'extended_l2=on,cluster_size=32k',
  'compression_type=zstd',
  'preallocation=metadata',
  'preallocation=full,cluster_size=4k',
];

for (const opts of OPTION_SETS) {
  test(`create -o '${opts}' + writes: qemu reads the same bytes and check is clean`, needs('qemu-img', 'qemu-io'), async (t) => {
    const dir = await scratch(t);
    const f = join(dir, 'img.qcow2');
    await qcowOk(['create', '-q', '-f', 'qcow2', ...(opts ? ['-o', opts] : []), f, '4M']);
    await qemuCheckClean(f);
    const info = JSON.parse((await qemuImg(['info', '--output=json', f])).stdout) as { 'format-specific': { data: Record<string, unknown> } };
    const data = info['format-specific'].data;
    if (opts.includes('compat=0.10')) assert.equal(data.compat, '0.10');
    if (opts.includes('lazy_refcounts=on')) assert.equal(data['lazy-refcounts'], true);
    if (opts.includes('extended_l2=on')) assert.equal(data['extended-l2'], true);
    if (opts.includes('zstd')) assert.equal(data['compression-type'], 'zstd');
    const rb = /refcount_bits=(\d+)/.exec(opts);
    if (rb) assert.equal(data['refcount-bits'], Number(rb[1]));
    // With 2 MiB clusters, 1M+128k cannot be written compressed (not whole clusters), and a
    // 64k discard frees nothing (content after a partial discard is unspecified): leave both out.
    const skip = (c: string | undefined) => c !== undefined && (c.startsWith('write -c') || c.startsWith('discard'));
    const io = opts.includes('2M') ? IO.flatMap((a, i) => (skip(a) || skip(IO[i + 1]) ? [] : [a])) : IO;
    await qcowOk(['io', ...io, f]);
    await qemuCheckClean(f);
    assert.equal(await qemuGuestSha256(['-f', 'qcow2', f]), await expected(dir, '4M', io));
  });
}

test('a backing chain: partial writes copy the rest of the cluster from the backing file', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'base.raw');
  const top = join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'raw', base, '4M']);
  await qemuIo(['-f', 'raw', '-c', 'write -P 0x11 0 4M', base]);
  for (const o of ['', 'extended_l2=on', 'compat=0.10']) {
    await qcowOk(['create', '-q', '-f', 'qcow2', ...(o ? ['-o', o] : []), '-b', 'base.raw', '-F', 'raw', top]);
    const io = ['-c', 'write -P 0x22 10k 6k', '-c', 'write -P 0x33 1M 1k', '-c', 'write -z 2M 64k', '-c', 'discard 3M 64k'];
    await qcowOk(['io', ...io, top]);
    await qemuCheckClean(top);
    const ours = await qemuGuestSha256(['-f', 'qcow2', top]);
    // The same writes by qemu on a copy of the chain.
    const q = join(dir, 'q.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', ...(o ? ['-o', o] : []), '-b', 'base.raw', '-F', 'raw', q]);
    await qemuIo(['-f', 'qcow2', ...io, q]);
    assert.equal(ours, await qemuGuestSha256(['-f', 'qcow2', q]), `options '${o}'`);
  }
});

test('encrypted images (AES and LUKS) written by us read the same in qemu', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const pw = join(dir, 'pw');
  await writeFile(pw, 'hunter2\n');
  for (const o of ['encrypt.format=aes', 'encrypt.format=luks,encrypt.iter-time=10']) {
    const f = join(dir, 'enc.qcow2');
    await qcowOk(['create', '-q', '-f', 'qcow2', '--password-file', pw, '-o', o, f, '4M']);
    const io = ['-c', 'write -P 0xab 0 1M', '-c', 'write -P 0x11 100k 3k', '-c', 'write -P 0x44 3500k 1k'];
    await qcowOk(['io', '--password-file', pw, ...io, f]);
    const open = ['--object', 'secret,id=s,data=hunter2', '--image-opts', `driver=qcow2,file.filename=${f},encrypt.key-secret=s`];
    await qemuCheckClean(open[open.length - 1]!, open.slice(0, -1));
    const sha = await qemuGuestSha256(open);
    assert.equal(sha, await expected(dir, '4M', io), o);
  }
});

test('images qemu made (compressed, snapshots, zero clusters, subclusters) stay clean under our writes', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const src = join(dir, 'src.raw');
  await qemuImg(['create', '-q', '-f', 'raw', src, '4M']);
  await qemuIo(['-f', 'raw', '-c', 'write -P 0xab 0 1M', '-c', 'write -P 0xcd 2M 64k', src]);
  const variants: string[][] = [['-c'], ['-c', '-o', 'compression_type=zstd'], ['-o', 'extended_l2=on'], ['-o', 'compat=0.10'], ['-o', 'refcount_bits=1']];
  for (const v of variants) {
    const f = join(dir, 'q.qcow2');
    await qemuImg(['convert', '-O', 'qcow2', ...v, src, f]);
    if (!v.includes('refcount_bits=1')) await qemuImg(['snapshot', '-c', 's1', f]);
    const io = ['-c', 'write -P 0x77 32k 8k', '-c', 'write -z 512k 64k', '-c', 'discard 1M 128k', '-c', 'write -P 0x78 2M 4k'];
    await qcowOk(['io', ...io, f]);
    await qemuCheckClean(f);
    const raw = join(dir, 'exp.raw');
    await qemuImg(['convert', '-O', 'raw', src, raw]);
    await qemuIo(['-f', 'raw', ...io.map((a) => (a.startsWith('discard') ? 'write -z 1M 128k' : a)), raw]);
    assert.equal(await qemuGuestSha256(['-f', 'qcow2', f]), sha256(await readFile(raw)), v.join(' '));
  }
});

test('convert -O qcow2 [-c] output is clean and identical in qemu', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const src = join(dir, 'src.raw');
  await qemuImg(['create', '-q', '-f', 'raw', src, '4M']);
  await qemuIo(['-f', 'raw', '-c', 'write -P 0xab 0 1M', '-c', 'write -P 0xcd 2M 64k', src]);
  for (const extra of [[], ['-c'], ['-c', '-o', 'compression_type=zstd'], ['-o', 'cluster_size=4k,refcount_bits=2']]) {
    const f = join(dir, 'out.qcow2');
    await qcowOk(['convert', '-f', 'raw', '-O', 'qcow2', ...extra, src, f]);
    await qemuCheckClean(f);
    assert.equal(await qemuGuestSha256(['-f', 'qcow2', f]), sha256(await readFile(src)), extra.join(' '));
  }
});

test('our check agrees with qemu-img check: exit codes and JSON on clean, leaky and corrupted images, and repairs', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const clean = join(dir, 'clean.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', clean, '8M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0xab 0 1M', '-c', 'write -c -P 1 4M 128k', clean]);
  const bytes = new Uint8Array(await readFile(clean));
  const leaky = bytes.slice();
  leaky[0x20000 + 2 * 3 + 1] = 2; // L1 cluster counted twice
  const broken = leaky.slice();
  broken[0x20000 + 2 * 5 + 1] = 0; // a data cluster counted zero times
  const cases: Array<[string, Uint8Array, number]> = [
    ['clean', bytes, 0],
    ['leaky', leaky, 3],
    ['broken', broken, 2],
  ];
  for (const [name, content, code] of cases) {
    const f = join(dir, `${name}.qcow2`);
    await writeFile(f, content);
    const q = await run('qemu-img', ['check', '--output=json', f]);
    const o = await qcow(['check', '--output=json', f]);
    assert.equal(q.code, code, name);
    assert.equal(o.code, code, name);
    assert.deepEqual(JSON.parse(o.stdout), JSON.parse(q.stdout), name);
    assert.equal(o.stderr, q.stderr, name);
  }
  for (const [mode, name] of [['leaks', 'leaky'], ['all', 'broken']]) {
    const f = join(dir, `${name}.qcow2`);
    const r = await qcow(['check', '-r', mode!, '--output=json', f]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    await qemuCheckClean(f);
  }
  const raw = join(dir, 'x.raw');
  await qemuImg(['create', '-q', '-f', 'raw', raw, '1M']);
  assert.equal((await qcow(['check', raw])).code, 63);
});

test('check counts like qemu-img on an image of 143 360 clusters over 2 240 L2 tables, and repairs its leaks', needs('qemu-img'), async (t) => {
  // Past ~120 000 clusters the old counting failed outright; across L2 tables, qemu-img counts
  // fragmentation per table.
  const dir = await scratch(t);
  const raw = join(dir, 'r.raw');
  const data = new Uint8Array(70 * 1024 * 1024);
  for (let i = 0; i < data.length; i += 4096) data[i] = (i >>> 12) | 1;
  await writeFile(raw, data);
  const img = join(dir, 'many.qcow2');
  await qemuImg(['convert', '-q', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', raw, img]);
  const q = await run('qemu-img', ['check', '--output=json', img]);
  const o = await qcow(['check', '--output=json', img]);
  assert.equal(o.code, 0, o.stderr);
  assert.deepEqual(JSON.parse(o.stdout), JSON.parse(q.stdout));
  assert.equal(JSON.parse(o.stdout)['allocated-clusters'], 143360);
  // A leak far into the refcounts: the cluster of the last refcount block counted twice (it has
  // no COPIED flag to disagree). Found, and repaired.
  const bytes = new Uint8Array(await readFile(img));
  const header = new DataView(bytes.buffer);
  const tableOffset = Number(header.getBigUint64(48));
  const perBlock = 512 / 2;
  const entry = (i: number) => Number(header.getBigUint64(tableOffset + 8 * i));
  let last = 0;
  while (entry(last + 1) !== 0) last++;
  const leak = entry(last) / 512;
  assert.ok(leak > 100000, `the last refcount block is cluster ${leak}`);
  bytes[entry(Math.floor(leak / perBlock)) + 2 * (leak % perBlock) + 1] = 2;
  await writeFile(img, bytes);
  const leaky = await qcow(['check', '--output=json', img]);
  assert.equal(leaky.code, 3);
  assert.deepEqual(JSON.parse(leaky.stdout), JSON.parse((await run('qemu-img', ['check', '--output=json', img])).stdout));
  const fixed = await qcow(['check', '-r', 'leaks', img]);
  assert.equal(fixed.code, 0, fixed.stdout + fixed.stderr);
  await qemuCheckClean(img);
});

test('check on a bitmap table entry far past the end of the file: reported as qemu-img reports it, not counted', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'bitmap.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']);
  await qemuIo(['-c', 'write 0 1M', img]);
  await qemuImg(['bitmap', '--add', img, 'bm0']);
  const bytes = new Uint8Array(await readFile(img));
  const dv = new DataView(bytes.buffer);
  // Find the bitmaps header extension, its directory, and the first bitmap's table.
  let ext = dv.getUint32(100);
  while (dv.getUint32(ext) !== 0x23852875) ext += 8 + Math.ceil(dv.getUint32(ext + 4) / 8) * 8;
  const directory = Number(dv.getBigUint64(ext + 24));
  const table = Number(dv.getBigUint64(directory));
  // A cluster-aligned offset beyond 2^53 (not exact as a JavaScript number).
  dv.setBigUint64(table, 0x00ff_ffff_fff0_0000n);
  await writeFile(img, bytes);
  const q = await run('qemu-img', ['check', '--output=json', img]);
  const o = await qcow(['check', '--output=json', img]);
  assert.equal(o.code, q.code);
  assert.equal(o.code, 2);
  assert.deepEqual(JSON.parse(o.stdout), JSON.parse(q.stdout));
  assert.equal(o.stderr, q.stderr);
});

test('check of a file cut short inside a run of data clusters: JSON, messages and exit code as qemu-img', needs('qemu-img', 'qemu-io'), async (t) => {
  // Check takes a run of contiguous data clusters in one step; the run must stop at the end of
  // the file, and each cluster past it be reported (and not counted) as qemu-img does.
  const dir = await scratch(t);
  const img = join(dir, 'cut.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '8M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 7 0 2M', img]);
  const size = (await stat(img)).size;
  await truncate(img, size - 3 * 4096 - 100);
  for (const extra of [[], ['--output=json']]) {
    const q = await run('qemu-img', ['check', ...extra, img]);
    const o = await qcow(['check', ...extra, img]);
    assert.equal(o.code, 2);
    assert.equal(o.code, q.code);
    assert.equal(o.stdout, q.stdout);
    assert.equal(o.stderr, q.stderr);
    assert.match(o.stderr, /^ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x202000 size 0x1000$/m);
  }
});

test('check of a data cluster past the end of the file still checks its COPIED flag, as qemu-img; -r all repairs it alike', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const img = join(dir, 'far.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '8M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 7 0 64k', img]);
  // Point the fifth L2 entry (COPIED set) 1 GiB away: far past the end of the file.
  const bytes = new Uint8Array(await readFile(img));
  const dv = new DataView(bytes.buffer);
  const l1 = Number(dv.getBigUint64(40));
  const l2 = Number(dv.getBigUint64(l1) & 0x00fffffffffffe00n);
  dv.setBigUint64(l2 + 4 * 8, (1n << 63n) | 0x4140_0000n);
  await writeFile(img, bytes);
  for (const extra of [[], ['--output=json']]) {
    const q = await run('qemu-img', ['check', ...extra, img]);
    const o = await qcow(['check', ...extra, img]);
    assert.equal(o.code, q.code);
    assert.equal(o.stdout, q.stdout);
    assert.equal(o.stderr, q.stderr);
  }
  assert.match((await qcow(['check', img])).stderr, /OFLAG_COPIED data cluster: l2_entry=8000000041400000 refcount=0/);
  // Repaired by each tool, the two images check the same with qemu-img (the cluster itself stays
  // out of reach: one error left in both).
  const theirs = join(dir, 'theirs.qcow2');
  await writeFile(theirs, bytes);
  await run('qemu-img', ['check', '-r', 'all', theirs]);
  await qcow(['check', '-r', 'all', img]);
  const a = await run('qemu-img', ['check', '--output=json', img]);
  const b = await run('qemu-img', ['check', '--output=json', theirs]);
  assert.equal(a.code, b.code);
  assert.deepEqual({ ...JSON.parse(a.stdout), filename: '' }, { ...JSON.parse(b.stdout), filename: '' });
  assert.equal(a.stderr, b.stderr);
});

test('check -r all rebuilds around a refcount table or block named far outside the file, growing it by a few clusters', needs('qemu-img', 'qemu-io'), async (t) => {
  // Repairing in place would write counts at the offset the corrupt entry names: terabytes into
  // the file. The rebuild puts new structures in free clusters instead.
  const dir = await scratch(t);
  const good = join(dir, 'good.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', good, '8M']);
  await qemuIo(['-c', 'write -P 0x11 0 1M', good]);
  const bytes = new Uint8Array(await readFile(good));
  const dv = new DataView(bytes.buffer);
  const tableOffset = Number(dv.getBigUint64(48));
  const cases: Array<[string, (v: DataView) => void]> = [
    ['block', (v) => v.setBigUint64(tableOffset, 0x0000_db28_0000_0000n)],
    ['table', (v) => v.setBigUint64(48, 0x0000_db28_0000_0000n)],
  ];
  for (const [name, corrupt] of cases) {
    const f = join(dir, `${name}.qcow2`);
    const copy = bytes.slice();
    corrupt(new DataView(copy.buffer));
    await writeFile(f, copy);
    const r = await qcow(['check', '-r', 'all', f]);
    assert.equal(r.code, 0, `${name}: ${r.stderr}`);
    assert.match(r.stderr, /Rebuilding refcount structure/, name);
    assert.ok((await readFile(f)).length <= bytes.length + 4 * 65536, `${name}: the file grew by a few clusters at most`);
    assert.equal((await run('qemu-img', ['check', f])).code, 0, `${name}: qemu-img finds the repaired image clean`);
    await qemuIo(['-r', '-c', 'read -P 0x11 0 1M', f]);
  }
});

test('a snapshot that would overflow 2-bit refcounts fails as qemu-img fails it: counts as they were, the L1 copy leaked', needs('qemu-img', 'qemu-io'), async (t) => {
  // Counts are changed in runs of host-contiguous clusters: whatever overflows, what was added
  // before it is taken back. As in QEMU, the snapshot's copy of the L1 table is written first and
  // stays allocated: qemu-img snapshot leaves the same single leak on the same image.
  const dir = await scratch(t);
  const img = join(dir, 'narrow.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=2,cluster_size=4k', img, '8M']);
  await qemuIo(['-c', 'write -P 0x11 0 2M', '-c', 'write -P 0x22 4M 1M', img]);
  for (const name of ['s1', 's2']) assert.equal((await qcow(['snapshot', '-c', name, img])).code, 0);
  const theirs = join(dir, 'theirs.qcow2');
  await writeFile(theirs, await readFile(img));
  // A third snapshot would count 4 for every data cluster: refcount_bits=2 holds 3.
  const r = await qcow(['snapshot', '-c', 's3', img]);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /Could not create snapshot 's3': Refcount overflow/);
  const q = await run('qemu-img', ['snapshot', '-c', 's3', theirs]);
  assert.notEqual(q.code, 0);
  const report = async (f: string) => JSON.parse((await run('qemu-img', ['check', '--output=json', f])).stdout) as Record<string, unknown>;
  const [ours, qemu] = [await report(img), await report(theirs)];
  assert.equal(ours['corruptions'] ?? 0, 0);
  assert.equal(ours['leaks'], 1);
  assert.equal(ours['leaks'], qemu['leaks']);
  assert.deepEqual(await readFile(img), await readFile(theirs), 'the same bytes as qemu-img leaves');
  const list = (await qcow(['snapshot', '-l', img])).stdout;
  assert.match(list, /s1/);
  assert.match(list, /s2/);
  assert.doesNotMatch(list, /s3/);
  // Deleting both takes the counts back down; the leak stays a leak.
  for (const name of ['s2', 's1']) assert.equal((await qcow(['snapshot', '-d', name, img])).code, 0);
  const after = await report(img);
  assert.equal(after['corruptions'] ?? 0, 0);
  assert.equal(after['leaks'], 1);
});

test('snapshots we create are listed and applied by qemu-img; qemu-made ones by us', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  for (const compat of ['1.1', '0.10']) {
    const f = join(dir, `snap-${compat}.qcow2`);
    await qcowOk(['create', '-q', '-f', 'qcow2', '-o', `compat=${compat}`, f, '4M']);
    await qcowOk(['io', '-c', 'write -P 1 0 1M', f]);
    await qcowOk(['snapshot', '-c', 'ours', f]);
    await qcowOk(['io', '-c', 'write -P 2 0 64k', f]);
    await qemuImg(['snapshot', '-c', 'theirs', f]);
    await qcowOk(['io', '-c', 'write -P 3 64k 64k', f]);
    await qemuCheckClean(f);
    assert.match((await qemuImg(['snapshot', '-l', f])).stdout, /ours[\s\S]*theirs/);
    // qemu applies ours; we apply theirs; both deletions work either way.
    await qemuImg(['snapshot', '-a', 'ours', f]);
    await qemuIo(['-f', 'qcow2', '-c', 'read -P 1 0 1M', f]);
    await qcowOk(['snapshot', '-a', 'theirs', f]);
    await qemuCheckClean(f);
    await qemuIo(['-f', 'qcow2', '-c', 'read -P 2 0 64k', '-c', 'read -P 1 64k 960k', f]);
    await qcowOk(['snapshot', '-d', 'ours', f]);
    await qemuImg(['snapshot', '-d', 'theirs', f]);
    await qemuCheckClean(f);
    assert.equal((await qemuImg(['snapshot', '-l', f])).stdout.trim(), '');
  }
});

test('a dirty lazy-refcounts image is repaired when we open it for writing', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const f = join(dir, 'dirty.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', f, '4M']);
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', '-c', 'abort', f]);
  assert.equal((await run('qemu-img', ['check', f])).code, 2, 'the crash left stale refcounts');
  await qcowOk(['io', '-c', 'write -P 1 64k 64k', f]);
  await qemuCheckClean(f);
  await qemuIo(['-f', 'qcow2', '-c', 'read -P 0x5a 0 64k', '-c', 'read -P 1 64k 64k', f]);
});

test('resize grows the image (moving the L1 table when it must grow) and refuses to shrink without --shrink', needs('qemu-img', 'qemu-io'), async (t) => {
  const dir = await scratch(t);
  const f = join(dir, 'rz.qcow2');
  await qcowOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', f, '1M']);
  await qcowOk(['io', '-c', 'write -P 1 0 64k', f]);
  await qcowOk(['resize', f, '+7M']);
  await qcowOk(['io', '-c', 'write -P 2 7M 64k', f]);
  await qemuCheckClean(f);
  const info = JSON.parse((await qemuImg(['info', '--output=json', f])).stdout) as { 'virtual-size': number };
  assert.equal(info['virtual-size'], 8 * 2 ** 20);
  await qemuIo(['-f', 'qcow2', '-c', 'read -P 1 0 64k', '-c', 'read -P 0 64k 6M', '-c', 'read -P 2 7M 64k', f]);
  const r = await qcow(['resize', f, '1M']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /--shrink/);
});
