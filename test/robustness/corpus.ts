/**
 * A named corpus of broken images, generated at test time from images qemu-img and qemu-io made:
 * truncated files, every header field at extreme values, overlapping tables, table entries past
 * the end, bad compressed data, backing chains that loop or run too deep, hostile LUKS headers and
 * wrong passwords. Each case says which commands must fail on it; the rest may succeed (a broken
 * data cluster does not stop `info`), but nothing may crash, hang, allocate without bound or write.
 */
import { readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, qemuIo, run } from '../support/qemu.js';

/** `bitmaps`: convert --bitmaps to qcow2, which reads every bitmap's table and data (qcow2/bitmaps cases). */
export type CorpusCommand = 'info' | 'convert' | 'map' | 'check' | 'bitmaps';

export interface CorpusCase {
  /** Unique, readable: `qcow2/header/l1_size=0xffffffff`. */
  name: string;
  /** File name inside the corpus folder (the top image). */
  file: string;
  format: 'qcow' | 'qcow2';
  /** Commands that must exit non-zero on this image. */
  mustFail: CorpusCommand[];
  /** Other files of the case (backing files) that the error line may name instead of `file`. */
  related?: string[];
  /** Extra CLI arguments (a password file). */
  args?: string[];
  /** The exit code failing commands must give (4 for passwords). */
  exitCode?: number;
}

const ALL: CorpusCommand[] = ['info', 'convert', 'map', 'check'];
const READS: CorpusCommand[] = ['convert'];

/** Byte offsets of the structures in the qemu-made base qcow2 image (checked when it is made). */
export const QCOW2 = { refcountTable: 0x10000, refcountBlock: 0x20000, l1: 0x30000, l2: 0x40000, data: 0x50000, compressed: 0x80000 };

function put(b: Uint8Array, off: number, width: 1 | 2 | 4 | 8, v: bigint): Uint8Array {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  if (width === 1) dv.setUint8(off, Number(v));
  else if (width === 2) dv.setUint16(off, Number(v));
  else if (width === 4) dv.setUint32(off, Number(v));
  else dv.setBigUint64(off, v);
  return b;
}

function get(b: Uint8Array, off: number): bigint {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(off);
}

/** Build the corpus in `dir`; returns its cases. Needs qemu-img and qemu-io. */
export async function buildCorpus(dir: string): Promise<CorpusCase[]> {
  const cases: CorpusCase[] = [];
  const add = async (c: CorpusCase, bytes?: Uint8Array) => {
    if (bytes) await writeFile(join(dir, c.file), bytes);
    cases.push(c);
  };
  let n = 0;
  const fileFor = (ext: string) => `case${String(n++).padStart(3, '0')}.${ext}`;

  // ---- qcow2 (v3, 64 KiB clusters): data, a 128 KiB run, a compressed cluster ----
  const base2 = join(dir, 'base.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base2, '4M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x22 0 64k', '-c', 'write -P 0x33 1M 128k', '-c', 'write -c -P 0x44 2M 64k', base2]);
  const q2 = new Uint8Array(await readFile(base2));
  if (get(q2, 40) !== BigInt(QCOW2.l1) || get(q2, 48) !== BigInt(QCOW2.refcountTable) || (get(q2.subarray(QCOW2.l1), 0) & 0xffffffffffffn) !== BigInt(QCOW2.l2)) {
    throw new Error('qemu-img laid the base qcow2 image out differently than the corpus expects');
  }
  const q2case = (name: string, mutate: (b: Uint8Array) => Uint8Array, mustFail: CorpusCommand[]) => {
    const file = fileFor('qcow2');
    return add({ name: `qcow2/${name}`, file, format: 'qcow2', mustFail }, mutate(q2.slice()));
  };

  // Cut in the header or before the end of the L1 table: nothing opens it. Cut in the L2 table or
  // the data: it opens, but reading (and checking) fails. QEMU reads past the end as zeros there.
  // Cut just inside the refcount block, qemu-img check finds the image clean (what lies past the
  // end reads as zeros and is within one cluster of it), and so does ours.
  for (const at of [0, 3, 50, 71, 103, 4095, QCOW2.refcountTable + 4, QCOW2.refcountBlock + 10, QCOW2.l1 + 4]) await q2case(`truncated at ${at}`, (b) => b.slice(0, at), at === QCOW2.refcountBlock + 10 ? ALL.filter((c) => c !== 'check') : ALL);
  await q2case(`truncated at ${QCOW2.l2 + 16} (in L2)`, (b) => b.slice(0, QCOW2.l2 + 16), ['convert', 'map', 'check']);
  // check passes it, as qemu-img's does: a last cluster partly past the end of the file is allowed.
  await q2case(`truncated at ${QCOW2.data + 100} (in data)`, (b) => b.slice(0, QCOW2.data + 100), ['convert']);
  await q2case(`truncated at ${QCOW2.compressed + 20} (in compressed data)`, (b) => b.slice(0, QCOW2.compressed + 20), READS);

  // Header fields at extreme values: [name, offset, width, values that must make opening fail, values that may pass].
  const fields2: [string, number, 1 | 2 | 4 | 8, bigint[], bigint[]][] = [
    ['magic', 0, 4, [0n, 0xffffffffn], []],
    ['version', 4, 4, [0n, 1n, 4n, 0xffffffffn], []],
    ['backing_file_offset', 8, 8, [0xffffffffffffffffn, 1n << 62n, 1n << 40n], []],
    ['cluster_bits', 20, 4, [0n, 8n, 22n, 63n, 0xffffffffn], []],
    ['size', 24, 8, [1n << 62n, 0xffffffffffffffffn], [0n]],
    ['crypt_method', 32, 4, [3n, 0xffffffffn], []],
    ['l1_size', 36, 4, [0n, 0xffffffffn, 0x7fffffffn], []],
    ['l1_table_offset', 40, 8, [0n, 1n, 0xffffffffffffffffn, 1n << 40n], []],
    ['refcount_table_offset', 48, 8, [1n, 0xffffffffffffffffn], []],
    ['nb_snapshots', 60, 4, [0xffffffffn, 65537n], []],
    ['snapshots_offset', 64, 8, [], [0xffffffffffffffffn, 1n]],
    ['incompatible_features', 72, 8, [0xffffffffffffffffn, 1n << 40n], []],
    ['compatible_features', 80, 8, [], [0xffffffffffffffffn]],
    ['autoclear_features', 88, 8, [], [0xffffffffffffffffn]],
    ['refcount_order', 96, 4, [7n, 0xffffffffn], []],
    ['header_length', 100, 4, [0n, 71n, 0xffffffffn, 65537n], []],
    ['compression_type', 104, 1, [2n, 0xffn], []],
  ];
  for (const [field, off, width, bad, odd] of fields2) {
    // `qcow check` does not validate the encryption method or feature bits yet (see corpus.test.ts).
    const checkToo = field !== 'crypt_method' && field !== 'incompatible_features';
    for (const v of bad) await q2case(`header/${field}=0x${v.toString(16)}`, (b) => put(b, off, width, v), checkToo ? ALL : ['info', 'convert', 'map']);
    for (const v of odd) await q2case(`header/${field}=0x${v.toString(16)}`, (b) => put(b, off, width, v), []);
  }
  // A backing file name longer than 1023 bytes, or running past the end of the file.
  await q2case('header/backing_file_size=0xffffffff', (b) => put(put(b, 8, 8, 0x1000n), 16, 4, 0xffffffffn), ALL);
  await q2case('header/backing_file_size=1024', (b) => put(put(b, 8, 8, 0x1000n), 16, 4, 1024n), ALL);
  // Encrypted (AES) without a password: described, but its data cannot be read.
  await q2case('header/crypt_method=1', (b) => put(b, 32, 4, 1n), ['convert']);
  // The refcount structures are only used for writing and checking (as QEMU's read path, which
  // does refuse a table over 8 MiB at open; we refuse it when the table is loaded).
  for (const [field, off, width, v] of [
    ['refcount_table_offset', 48, 8, 0n],
    ['refcount_table_offset', 48, 8, 1n << 40n],
    ['refcount_table_clusters', 56, 4, 0n],
    ['refcount_table_clusters', 56, 4, 0xffffffffn],
  ] as const) {
    await q2case(`header/${field}=0x${v.toString(16)}`, (b) => put(b, off, width, v), ['check']);
  }
  // Snapshot table pointing into garbage, and one past the end (which QEMU reads as zeros: the
  // image opens, and only check, which finds the table outside the file, fails).
  await q2case('snapshot table in garbage', (b) => put(put(b, 60, 4, 3n), 64, 8, BigInt(QCOW2.data)), ['info', 'convert', 'map', 'check']);
  await q2case('snapshot table past the end', (b) => put(put(b, 60, 4, 1n), 64, 8, 1n << 40n), ['check']);
  // A header extension claiming 4 GiB.
  await q2case('header extension of 4 GiB', (b) => put(put(b, 112, 4, 0x12345678n), 116, 4, 0xffffffffn), ALL);

  // Overlapping and misplaced tables.
  await q2case('L1 overlapping the refcount table', (b) => put(b, 40, 8, BigInt(QCOW2.refcountTable)), ['convert', 'check']);
  await q2case('L1 overlapping the header', (b) => put(b, 40, 8, 0n), ALL);
  await q2case('L1 entry: L2 at the header', (b) => put(b, QCOW2.l1, 8, 1n << 63n), []);
  await q2case('L1 entry: L2 is the refcount table', (b) => put(b, QCOW2.l1, 8, (1n << 63n) | BigInt(QCOW2.refcountTable)), ['check']);
  await q2case('L1 entry: L2 is the L1 table itself', (b) => put(b, QCOW2.l1, 8, (1n << 63n) | BigInt(QCOW2.l1)), ['check']);
  await q2case('L1 entry past the end', (b) => put(b, QCOW2.l1, 8, (1n << 63n) | (1n << 40n)), ['convert', 'map', 'check']);
  await q2case('L1 entry unaligned', (b) => put(b, QCOW2.l1, 8, (1n << 63n) | BigInt(QCOW2.l2 + 512)), ['convert', 'map', 'check']);
  await q2case('L2 entry: data at the header', (b) => put(b, QCOW2.l2, 8, (1n << 63n) | 0n | 0n), []);
  await q2case('L2 entry: data is the L1 table', (b) => put(b, QCOW2.l2, 8, (1n << 63n) | BigInt(QCOW2.l1)), ['check']);
  await q2case('L2 entry past the end', (b) => put(b, QCOW2.l2, 8, (1n << 63n) | (1n << 40n)), ['convert', 'check']);
  await q2case('L2 entry unaligned', (b) => put(b, QCOW2.l2, 8, (1n << 63n) | BigInt(QCOW2.data + 512)), ['convert', 'map', 'check']);
  // Reserved bits in a data entry: QEMU's read path ignores them (qemu-img check reports them).
  await q2case('L2 entry with reserved bits', (b) => put(b, QCOW2.l2, 8, (1n << 63n) | (0x3fn << 56n) | BigInt(QCOW2.data)), []);
  await q2case('refcount table entry past the end', (b) => put(b, QCOW2.refcountTable, 8, 1n << 40n), ['check']);
  await q2case('refcount table entry at the header', (b) => put(b, QCOW2.refcountTable, 8, 0n), ['check']);
  // Compressed data: garbage instead of a deflate stream; a descriptor reaching past the end.
  const l2Compressed = QCOW2.l2 + (2 * 2 ** 20 / 65536) * 8;
  await q2case('compressed cluster: garbage', (b) => (b.fill(0xff, QCOW2.compressed, QCOW2.compressed + 79), b), ['convert']);
  await q2case('compressed cluster: short stream', (b) => (b.fill(0, QCOW2.compressed + 8, QCOW2.compressed + 79), b), ['convert']);
  // A descriptor whose sector count reaches past the end: the stream itself is whole, the rest is zeros.
  await q2case('compressed descriptor reaching past the end', (b) => put(b, l2Compressed, 8, (1n << 62n) | (0xffn << 54n) | BigInt(QCOW2.compressed)), ['check']);
  await q2case('compressed descriptor past the end', (b) => put(b, l2Compressed, 8, (1n << 62n) | (1n << 40n)), ['convert', 'check']);

  // Persistent bitmaps: a qemu-made directory and table, then each field made hostile. `info`
  // reads the directory (and must fail on a broken one, as QEMU's open does); a broken table or
  // data cluster only makes the bitmap unusable, which nothing here reads.
  {
    const bm = join(dir, 'bitmaps.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', bm, '4M']);
    await qemuImg(['bitmap', '--add', '-g', '512', bm, 'b0']);
    await qemuImg(['bitmap', '--add', bm, 'b1']);
    await qemuIo(['-f', 'qcow2', '-c', 'write 0 64k', '-c', 'write 1M 4k', bm]);
    const img = new Uint8Array(await readFile(bm));
    // Find the bitmaps extension (type 0x23852875) among the header extensions.
    let ext = 112;
    while (ext + 8 < 65536 && new DataView(img.buffer).getUint32(ext) !== 0x23852875) ext += 8 + Math.ceil(new DataView(img.buffer).getUint32(ext + 4) / 8) * 8;
    if (ext + 8 >= 65536) throw new Error('qemu-img wrote no bitmaps extension');
    const dirAt = Number(get(img, ext + 8 + 16));
    const table0 = Number(get(img, dirAt));
    // A directory that cannot be read fails info (QEMU's open fails), check and convert --bitmaps.
    const bmCase = (name: string, mutate: (b: Uint8Array) => Uint8Array, mustFail: CorpusCommand[]) =>
      add({ name: `qcow2/bitmaps/${name}`, file: fileFor('qcow2'), format: 'qcow2', mustFail: mustFail.includes('info') ? [...mustFail, 'check', 'bitmaps'] : mustFail }, mutate(img.slice()));
    // A bitmap that cannot be used (bad table, fields, flags) leaves the image readable: convert
    // --bitmaps refuses it (as qemu-img), and check reports what breaks the image's own metadata.
    const unusable: CorpusCommand[] = ['bitmaps'];
    const broken: CorpusCommand[] = ['check', 'bitmaps'];
    await bmCase('the unpatched image', (b) => b, []);
    await bmCase('nb_bitmaps=0xffffffff', (b) => put(b, ext + 8, 4, 0xffffffffn), ['info']);
    await bmCase('nb_bitmaps=0', (b) => put(b, ext + 8, 4, 0n), ['info']);
    await bmCase('nb_bitmaps=3 (more than the directory holds)', (b) => put(b, ext + 8, 4, 3n), ['info']);
    await bmCase('directory_size=2^40', (b) => put(b, ext + 8 + 8, 8, 1n << 40n), ['info']);
    await bmCase('directory_size=64M (within the limit, past the end)', (b) => put(b, ext + 8 + 8, 8, 64n << 20n), ['info']);
    await bmCase('directory_offset past the end', (b) => put(b, ext + 8 + 16, 8, 1n << 50n), ['info']);
    await bmCase('directory_offset=0 (the header)', (b) => put(b, ext + 8 + 16, 8, 0n), ['info']);
    await bmCase('directory_offset unaligned', (b) => put(b, ext + 8 + 16, 8, BigInt(dirAt + 8)), ['info']);
    await bmCase('name_size=0', (b) => put(b, dirAt + 18, 2, 0n), ['info']);
    await bmCase('name_size=0xffff', (b) => put(b, dirAt + 18, 2, 0xffffn), ['info']);
    await bmCase('extra_data_size=0xffffffff', (b) => put(b, dirAt + 20, 4, 0xffffffffn), ['info']);
    await bmCase('both bitmaps named alike', (b) => put(b, dirAt + 24 + 1, 1, 0x31n), ['info']);
    await bmCase('table_size=0xffffffff', (b) => put(b, dirAt + 8, 4, 0xffffffffn), broken);
    await bmCase('table_offset past the end', (b) => put(b, dirAt, 8, 1n << 50n), broken);
    await bmCase('table entry past the end', (b) => put(b, table0, 8, 1n << 40n), broken);
    await bmCase('table entry with reserved bits', (b) => put(b, table0, 8, get(b, table0) | 0x1fen), broken);
    await bmCase('table entry pointing at the L1 table', (b) => put(b, table0, 8, BigInt(QCOW2.l1)), ['check']);
    await bmCase('granularity_bits=63', (b) => put(b, dirAt + 17, 1, 63n), unusable);
    await bmCase('unknown flags', (b) => put(b, dirAt + 12, 4, 0xfffffff0n), unusable);
    // More of the same kinds: counts, sizes and offsets at absurd values, overlaps with the
    // image's own metadata, and flags that make a bitmap unusable rather than the image.
    await bmCase('nb_bitmaps=65536 (one past the limit)', (b) => put(b, ext + 8, 4, 65536n), ['info']);
    await bmCase('directory_size=0', (b) => put(b, ext + 8 + 8, 8, 0n), ['info']);
    await bmCase('directory_size=2^64-1', (b) => put(b, ext + 8 + 8, 8, 0xffffffffffffffffn), ['info']);
    await bmCase('directory_offset at the L1 table', (b) => put(b, ext + 8 + 16, 8, BigInt(QCOW2.l1)), ['info']);
    await bmCase('extension length 4 GiB', (b) => put(b, ext + 4, 4, 0xffffffffn), ['info']);
    await bmCase('extension length 8 (too short for its fields)', (b) => put(b, ext + 4, 4, 8n), ['info']);
    await bmCase('name_size running past the directory', (b) => put(b, dirAt + 18, 2, 1000n), ['info']);
    await bmCase('table_size=0', (b) => put(b, dirAt + 8, 4, 0n), broken);
    await bmCase('table_offset=0', (b) => put(b, dirAt, 8, 0n), broken);
    await bmCase('table_offset unaligned', (b) => put(b, dirAt, 8, BigInt(table0 + 8)), broken);
    await bmCase('table_offset at the refcount table', (b) => put(b, dirAt, 8, BigInt(QCOW2.refcountTable)), ['check']);
    await bmCase('granularity_bits=0', (b) => put(b, dirAt + 17, 1, 0n), unusable);
    await bmCase('type=2', (b) => put(b, dirAt + 16, 1, 2n), unusable);
    await bmCase('in use (left by a crash)', (b) => put(b, dirAt + 12, 4, (get(b, dirAt + 8) & 0xffffffffn) | 1n), unusable);
    await bmCase('table entry with an offset and the all-ones flag', (b) => put(b, table0, 8, get(b, table0) | 1n), broken);
    await bmCase('table entry all ones (valid)', (b) => put(b, table0, 8, 1n), []);
    await bmCase('autoclear bit cleared (stale bitmaps, ignored)', (b) => put(b, 88, 8, 0n), []);
  }

  // Backing chains: a self-reference, a loop of two, one deeper than the limit.
  {
    const self = fileFor('qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', self, '-F', 'qcow2', join(dir, 'tmp.qcow2'), '4M']);
    await rename(join(dir, 'tmp.qcow2'), join(dir, self));
    await add({ name: 'qcow2/backing file is itself', file: self, format: 'qcow2', mustFail: ['info', 'convert', 'map'] });
    const a = fileFor('qcow2');
    const b = fileFor('qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', b, '-F', 'qcow2', join(dir, a), '4M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', a, '-F', 'qcow2', join(dir, b), '4M']);
    await add({ name: 'qcow2/backing loop of two', file: a, format: 'qcow2', related: [b], mustFail: ['info', 'convert', 'map'] });
    let prev = 'deep-0.qcow2';
    await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, prev), '1M']);
    const chain = [prev];
    for (let i = 1; i <= 70; i++) {
      const name = `deep-${i}.qcow2`;
      await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', prev, '-F', 'qcow2', join(dir, name), '1M']);
      chain.push(name);
      prev = name;
    }
    await add({ name: 'qcow2/backing chain of 71 images', file: prev, format: 'qcow2', related: chain, mustFail: ['info', 'convert', 'map'] });
  }

  // Encryption: a wrong password, no password, and a LUKS header asking for 2^32 - 1 PBKDF2 iterations.
  {
    const enc = fileFor('qcow2');
    // A short iteration time keeps this fast (run() retries qemu-img's PBKDF2 timing flake).
    const luksArgs = ['create', '-q', '-f', 'qcow2', '--object', 'secret,id=s0,data=right', '-o', 'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=50', join(dir, enc), '1M'];
    const r = await run('qemu-img', luksArgs);
    if (r.code !== 0) throw new Error(`qemu-img ${luksArgs.join(' ')}: ${r.stderr}`);
    await writeFile(join(dir, 'wrong.pw'), 'wrong\n');
    await writeFile(join(dir, 'right.pw'), 'right\n');
    await add({ name: 'qcow2/LUKS, wrong password', file: enc, format: 'qcow2', args: ['--password-file', 'wrong.pw'], mustFail: ['info', 'convert', 'map'], exitCode: 4 });
    await add({ name: 'qcow2/LUKS, no password', file: enc, format: 'qcow2', mustFail: ['convert'], exitCode: 4 });
    const bytes = new Uint8Array(await readFile(join(dir, enc)));
    const luks = Buffer.from(bytes).indexOf(Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]));
    if (luks < 0) throw new Error('no LUKS header in the encrypted image');
    const hostile = bytes.slice();
    put(hostile, luks + 200, 4, 0xffffffffn); // master key digest iterations
    for (let slot = 0; slot < 8; slot++) put(hostile, luks + 208 + slot * 48 + 4, 4, 0xffffffffn); // key slot iterations
    const file = fileFor('qcow2');
    await add({ name: 'qcow2/LUKS, 2^32-1 iterations', file, format: 'qcow2', args: ['--password-file', 'right.pw'], mustFail: ['convert'] }, hostile);
  }

  // ---- qcow v1: data, a compressed cluster, and what the v1 header holds ----
  const base1 = join(dir, 'base.qcow');
  await qemuImg(['create', '-q', '-f', 'qcow', base1, '4M']);
  await qemuIo(['-f', 'qcow', '-c', 'write -P 0x22 0 64k', '-c', 'write -c -P 0x44 2M 4k', base1]);
  const q1 = new Uint8Array(await readFile(base1));
  const l1v1 = Number(get(q1, 40));
  const l2v1 = Number(get(q1, l1v1));
  const q1case = (name: string, mutate: (b: Uint8Array) => Uint8Array, mustFail: CorpusCommand[]) => {
    const file = fileFor('qcow');
    return add({ name: `qcow/${name}`, file, format: 'qcow', mustFail }, mutate(q1.slice()));
  };
  // qcow v1 reads bytes past the end of the file as zeros, as QEMU does (a crash during an
  // allocation leaves entries pointing there): cuts after the header still open and read.
  for (const at of [0, 3, 20, 47]) await q1case(`truncated at ${at}`, (b) => b.slice(0, at), ['info', 'convert', 'map']);
  for (const at of [l1v1 + 4, l2v1 + 8]) await q1case(`truncated at ${at}`, (b) => b.slice(0, at), []);
  const fields1: [string, number, 1 | 2 | 4 | 8, bigint[], bigint[]][] = [
    ['magic', 0, 4, [0n, 0xffffffffn], []],
    ['version', 4, 4, [0n, 2n, 0xffffffffn], []],
    ['backing_file_offset', 8, 8, [0xffffffffffffffffn, 1n << 40n], []],
    ['mtime', 20, 4, [], [0xffffffffn]],
    ['size', 24, 8, [1n << 62n, 0xffffffffffffffffn, 1n << 50n], [0n]],
    ['cluster_bits', 32, 1, [0n, 8n, 17n, 0xffn], []],
    ['l2_bits', 33, 1, [0n, 5n, 0xffn], []],
    ['crypt_method', 36, 4, [2n, 0xffffffffn], []],
    ['l1_table_offset', 40, 8, [0xffffffffffffffffn, 1n << 40n], []],
  ];
  for (const [field, off, width, bad, odd] of fields1) {
    for (const v of bad) await q1case(`header/${field}=0x${v.toString(16)}`, (b) => put(b, off, width, v), ['info', 'convert', 'map']);
    for (const v of odd) await q1case(`header/${field}=0x${v.toString(16)}`, (b) => put(b, off, width, v), []);
  }
  await q1case('header/backing_file_size=0xffffffff', (b) => put(put(b, 8, 8, 0x30n), 16, 4, 0xffffffffn), ['info', 'convert', 'map']);
  await q1case('header/backing_file_size=1024', (b) => put(put(b, 8, 8, 0x30n), 16, 4, 1024n), ['info', 'convert', 'map']);
  await q1case('L1 overlapping the header', (b) => put(b, 40, 8, 0n), ['convert', 'map']);
  await q1case('L1 entry past the end (reads as zeros)', (b) => put(b, l1v1, 8, 1n << 40n), []);
  await q1case('L1 entry beyond 2^53', (b) => put(b, l1v1, 8, 1n << 60n), ['convert', 'map']);
  await q1case('L2 entry past the end (reads as zeros)', (b) => put(b, l2v1, 8, 1n << 40n), []);
  await q1case('L2 entry not sector-aligned', (b) => put(b, l2v1, 8, get(b, l2v1) + 1n), ['convert']);
  // Guest offset 2M in 4 KiB clusters with 512-entry L2 tables: L1 entry 1, L2 entry 0.
  const l2Second = Number(get(q1, l1v1 + 8));
  await q1case('compressed cluster: garbage', (b) => {
    const d = get(b, l2Second);
    const off = Number(d & ((1n << 51n) - 1n)); // 4 KiB clusters: the offset is bits 0..50
    return b.fill(0xff, off, Math.min(b.length, off + 64));
  }, ['convert']);
  await q1case('compressed descriptor past the end', (b) => put(b, l2Second, 8, (1n << 63n) | (0x7fn << 51n) | (1n << 40n)), ['convert']);
  {
    const self = fileFor('qcow');
    await qemuImg(['create', '-q', '-f', 'qcow', '-u', '-b', self, '-F', 'qcow', join(dir, 'tmp.qcow'), '4M']);
    await rename(join(dir, 'tmp.qcow'), join(dir, self));
    await add({ name: 'qcow/backing file is itself', file: self, format: 'qcow', mustFail: ['info', 'convert', 'map'] });
  }
  return cases;
}
