/**
 * Images of every layout the stream readers meet, made by qemu-img and qemu-io: the stream tests
 * convert each one from a stream and compare with qemu-img's convert of the file.
 */
import { join } from 'node:path';
import { qemuImg, qemuIo } from './qemu.js';

/** The layouts, by name: file paths in `dir`. */
export interface StreamLayouts {
  /** qemu-img create, then guest writes (tables before the data they map). */
  guest: string;
  /** qemu-img convert of `guest`. */
  converted: string;
  zlib: string;
  /** zstd with 2 MiB clusters. */
  zstd2m: string;
  /** 512-byte clusters. */
  c512: string;
  /** Extended L2, 128 KiB clusters. */
  extl2: string;
  /** compat=0.10. */
  v2: string;
  /** An internal snapshot: clusters it still names come before the tables that name them (held). */
  snap: string;
  /** qcow (v1): 4 KiB clusters, each L2 table just before the data it maps. */
  v1: string;
}

/** Make every layout in `dir`, each `sizeMiB` (32 or more) of virtual size. */
export async function makeStreamLayouts(dir: string, sizeMiB: number): Promise<StreamLayouts> {
  const p = (n: string) => join(dir, n);
  const size = `${sizeMiB}M`;
  const at = (eighths: number) => `${(sizeMiB * eighths) / 8}M`;
  const io = (img: string, ...cmds: string[]) => qemuIo(['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), img]);
  const l: StreamLayouts = {
    guest: p('guest.qcow2'),
    converted: p('converted.qcow2'),
    zlib: p('zlib.qcow2'),
    zstd2m: p('zstd-2m.qcow2'),
    c512: p('c512.qcow2'),
    extl2: p('extl2.qcow2'),
    v2: p('v2.qcow2'),
    snap: p('snap.qcow2'),
    v1: p('v1.qcow'),
  };
  await qemuImg(['create', '-q', '-f', 'qcow2', l.guest, size]);
  for (const i of [9, 3, 7, 1, 5]) await io(l.guest, `write -P ${i} ${i}M 512k`);
  await io(l.guest, 'write -z 20M 1M', 'write -P 0x22 30M 4k', 'write -P 0x33 31M 700k');
  await qemuImg(['convert', '-O', 'qcow2', l.guest, l.converted]);
  await qemuImg(['convert', '-c', '-O', 'qcow2', l.guest, l.zlib]);
  await qemuImg(['convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=2M', l.guest, l.zstd2m]);
  await qemuImg(['convert', '-O', 'qcow2', '-o', 'cluster_size=512', l.guest, l.c512]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', l.extl2, size]);
  await io(l.extl2, 'write -P 5 4k 8k', 'write -P 6 1M 300k', 'write -z 2M 64k');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', l.v2, size]);
  await io(l.v2, 'write -P 8 0 1M', `write -P 9 ${at(4)} 64k`);
  await qemuImg(['create', '-q', '-f', 'qcow2', l.snap, size]);
  await io(l.snap, 'write -P 1 0 4M', `write -P 2 ${at(5)} 1M`);
  await qemuImg(['snapshot', '-c', 'one', l.snap]);
  await io(l.snap, 'write -P 3 1M 1M', `write -P 4 ${at(7.5)} 64k`, `discard ${at(5)} 512k`);
  await qemuImg(['create', '-q', '-f', 'qcow', l.v1, size]);
  await qemuIo(['-f', 'qcow', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 17M 300k', '-c', 'write -P 3 7M 4k', '-c', 'write -P 4 31M 70000', l.v1]);
  return l;
}
