/**
 * A tiny Linux guest for the interop tests that boot QEMU's system emulator on a disk served by
 * `qcow serve`: Debian's cloud kernel (vmlinuz and the virtio modules, taken from the
 * linux-image .deb with `dpkg-deb -x`, never installed into the host), and an initramfs built
 * here: a static busybox (Debian's busybox-static), the modules, and a per-boot `/init` script
 * with its payload files. The guest runs the script, prints result lines on the serial console,
 * and powers off.
 *
 * The kernel .deb and the files taken from it are cached in `.cache/guest/` at the top of the
 * repository (gitignored; `QCOW_GUEST_CACHE` names another folder), so only the first run
 * downloads (`apt-get download`, 27 MB) and extracts (a second or two). `.ci/run` downloads the
 * .deb there ahead of the tests; `QCOW_GUEST_KERNEL_DEB` names a .deb to use instead.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, readFile, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

/** The cache folder: `.cache/guest/` at the top of the repository (dist-test/support/../..). */
export const GUEST_CACHE = process.env.QCOW_GUEST_CACHE ?? fileURLToPath(new URL('../../.cache/guest/', import.meta.url));

/** The Debian metapackage whose dependency names the current cloud kernel package. */
const KERNEL_META = 'linux-image-cloud-amd64';
/** What the guest needs as modules (or built in): the PCI transport and the block driver. */
const WANTED_MODULES = ['virtio_pci', 'virtio_blk'];

export interface GuestKernel {
  /** The kernel image. */
  vmlinuz: string;
  /** The modules to load, in load order (dependencies first), as absolute paths. */
  modules: string[];
  /** The kernel package (file name of the .deb without `.deb`), for messages. */
  name: string;
}

function sh(cmd: string, args: string[], cwd?: string): string {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return r.stdout;
}

/** The kernel .deb: `QCOW_GUEST_KERNEL_DEB`, one already in the cache, or downloaded now. */
export async function kernelDeb(): Promise<string> {
  if (process.env.QCOW_GUEST_KERNEL_DEB) return process.env.QCOW_GUEST_KERNEL_DEB;
  await mkdir(GUEST_CACHE, { recursive: true });
  const cached = () => readdir(GUEST_CACHE).then((names) => names.filter((n) => /^linux-image-.*\.deb$/.test(n)).sort());
  let debs = await cached();
  if (debs.length === 0) {
    // The metapackage depends on the versioned package (linux-image-6.1.0-57-cloud-amd64); ask
    // apt which one, then fetch that .deb alone (no dependencies, nothing installed).
    const deps = sh('apt-cache', ['depends', KERNEL_META]);
    const pkg = /Depends:\s*(linux-image-\S+)/.exec(deps)?.[1];
    if (!pkg) throw new Error(`apt-cache depends ${KERNEL_META} names no kernel package:\n${deps}`);
    sh('apt-get', ['download', '-q', pkg], GUEST_CACHE);
    debs = await cached();
    if (debs.length === 0) throw new Error(`apt-get download ${pkg} left no .deb in ${GUEST_CACHE}`);
  }
  return join(GUEST_CACHE, debs[debs.length - 1]!);
}

/** `depends=` of a kernel module, read from its .modinfo strings. */
function moduleDepends(ko: Uint8Array): string[] {
  const key = Buffer.from('\0depends=');
  const buf = Buffer.from(ko.buffer, ko.byteOffset, ko.byteLength);
  const at = buf.indexOf(key);
  if (at < 0) return [];
  const start = at + key.length;
  const end = buf.indexOf(0, start);
  const list = buf.subarray(start, end).toString('latin1');
  return list ? list.split(',').map((s) => s.replace(/-/g, '_')) : [];
}

async function walk(dir: string, out: string[] = []): Promise<string[]> {
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) await walk(p, out);
    else out.push(p);
  }
  return out;
}

/**
 * Extract the kernel and the modules the guest needs (with their dependencies, ordered) from the
 * .deb into the cache, once; later calls read the cache.
 */
export async function prepareKernel(): Promise<GuestKernel> {
  const deb = await kernelDeb();
  const name = deb.replace(/^.*\//, '').replace(/\.deb$/, '');
  const dir = join(GUEST_CACHE, name);
  const orderFile = join(dir, 'modules.order');
  if (!existsSync(orderFile)) {
    await mkdir(GUEST_CACHE, { recursive: true });
    const tmp = await mkdtemp(join(GUEST_CACHE, 'extract-'));
    try {
      const root = join(tmp, 'root');
      sh('dpkg-deb', ['-x', deb, root]);
      const boot = await readdir(join(root, 'boot'));
      const vmlinuz = boot.find((n) => n.startsWith('vmlinuz-'));
      const config = boot.find((n) => n.startsWith('config-'));
      if (!vmlinuz) throw new Error(`${deb} holds no boot/vmlinuz-*`);
      const configText = config ? await readFile(join(root, 'boot', config), 'utf8') : '';
      const kos = new Map<string, string>();
      for (const p of await walk(join(root, 'lib', 'modules'))) {
        const m = /([^/]+)\.ko$/.exec(p);
        if (m) kos.set(m[1]!.replace(/-/g, '_'), p);
      }
      // Depth-first over depends=, dependencies before dependents.
      const order: string[] = [];
      const seen = new Set<string>();
      const visit = async (mod: string, chain: string[]): Promise<void> => {
        if (seen.has(mod)) return;
        seen.add(mod);
        const path = kos.get(mod);
        if (!path) {
          if (new RegExp(`^CONFIG_${mod.toUpperCase()}=y$`, 'm').test(configText)) return; // built in
          throw new Error(`${name}: module ${mod} (needed by ${chain.join(' <- ') || 'the guest'}) is neither a .ko nor built in`);
        }
        for (const dep of moduleDepends(await readFile(path))) await visit(dep, [mod, ...chain]);
        order.push(mod);
      };
      for (const mod of WANTED_MODULES) await visit(mod, []);
      const out = join(tmp, 'out');
      await mkdir(out);
      await copyFile(join(root, 'boot', vmlinuz), join(out, 'vmlinuz'));
      for (const mod of order) await copyFile(kos.get(mod)!, join(out, `${mod}.ko`));
      await writeFile(join(out, 'modules.order'), order.map((m) => `${m}\n`).join(''));
      await rm(dir, { recursive: true, force: true });
      await rename(out, dir);
    } finally {
      await rm(tmp, { recursive: true, force: true });
    }
  }
  const order = (await readFile(orderFile, 'utf8')).split('\n').filter(Boolean);
  return { vmlinuz: join(dir, 'vmlinuz'), modules: order.map((m) => join(dir, `${m}.ko`)), name };
}

/** True when an ELF executable has no program interpreter (is statically linked). */
function isStaticElf(elf: Buffer): boolean {
  if (elf.length < 64 || elf.readUInt32BE(0) !== 0x7f454c46 || elf[4] !== 2) return false; // ELF64 only
  const phoff = Number(elf.readBigUInt64LE(0x20));
  const phentsize = elf.readUInt16LE(0x36);
  const phnum = elf.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    if (elf.readUInt32LE(phoff + i * phentsize) === 3) return false; // PT_INTERP
  }
  return true;
}

/** The host's static busybox (Debian's busybox-static), to run inside the guest. */
export async function staticBusybox(): Promise<Buffer> {
  for (const p of [process.env.QCOW_GUEST_BUSYBOX, '/bin/busybox', '/usr/bin/busybox']) {
    if (!p || !existsSync(p)) continue;
    const elf = await readFile(p);
    if (isStaticElf(elf)) return elf;
  }
  throw new Error('no static busybox: install Debian package busybox-static (or set QCOW_GUEST_BUSYBOX)');
}

export interface CpioEntry {
  path: string;
  /** File content; absent for directories and device nodes. */
  data?: Uint8Array;
  /** Full st_mode (type and permissions). */
  mode: number;
  /** Device number of a character or block device node. */
  rdev?: [number, number];
}

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFCHR = 0o020000;

/** A cpio archive in the "newc" format the kernel unpacks as initramfs. */
export function cpioNewc(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let size = 0;
  const push = (b: Buffer) => {
    parts.push(b);
    size += b.length;
    const pad = (4 - (size % 4)) % 4;
    if (pad) {
      parts.push(Buffer.alloc(pad));
      size += pad;
    }
  };
  const hex = (n: number) => n.toString(16).padStart(8, '0');
  let ino = 1;
  for (const e of [...entries, { path: 'TRAILER!!!', mode: 0 } as CpioEntry]) {
    const name = Buffer.from(`${e.path.replace(/^\/+/, '')}\0`);
    const data = e.data ?? new Uint8Array(0);
    const fields = [ino++, e.mode, 0, 0, (e.mode & 0o170000) === S_IFDIR ? 2 : 1, 0, data.length, 0, 0, e.rdev?.[0] ?? 0, e.rdev?.[1] ?? 0, name.length, 0];
    push(Buffer.concat([Buffer.from(`070701${fields.map(hex).join('')}`, 'latin1'), name]));
    if (data.length) push(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  }
  return Buffer.concat(parts);
}

/**
 * The `/init` the guest runs: mounts the pseudo filesystems, loads the modules, waits for
 * /dev/vda, runs `/test.sh` under `sh -e` and prints `GUEST-EXIT <status>`, then powers off.
 * Result lines are the script's own; everything goes to the serial console.
 */
function initScript(moduleNames: string[]): string {
  return `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in ${moduleNames.join(' ')}; do insmod /lib/modules/$m.ko || echo "GUEST-FAIL insmod $m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
echo GUEST-START
sh -e /test.sh
echo "GUEST-EXIT $?"
poweroff -f
`;
}

/**
 * An initramfs (gzip-compressed newc cpio) holding busybox, the modules, `/init`, `script` as
 * `/test.sh`, and `files` (path inside the guest, e.g. `/payload/a`, to content).
 */
export async function buildInitrd(kernel: GuestKernel, script: string, files: Record<string, Uint8Array> = {}): Promise<Buffer> {
  const names = kernel.modules.map((p) => p.replace(/^.*\//, '').replace(/\.ko$/, ''));
  const entries: CpioEntry[] = [];
  const dirs = new Set(['bin', 'dev', 'proc', 'sys', 'mnt', 'tmp', 'lib', 'lib/modules']);
  for (const p of Object.keys(files)) {
    const segs = p.replace(/^\/+/, '').split('/');
    for (let i = 1; i < segs.length; i++) dirs.add(segs.slice(0, i).join('/'));
  }
  for (const d of [...dirs].sort()) entries.push({ path: d, mode: S_IFDIR | 0o755 });
  entries.push({ path: 'dev/console', mode: S_IFCHR | 0o600, rdev: [5, 1] });
  entries.push({ path: 'bin/busybox', mode: S_IFREG | 0o755, data: await staticBusybox() });
  for (let i = 0; i < names.length; i++) entries.push({ path: `lib/modules/${names[i]}.ko`, mode: S_IFREG | 0o644, data: await readFile(kernel.modules[i]!) });
  entries.push({ path: 'init', mode: S_IFREG | 0o755, data: Buffer.from(initScript(names)) });
  entries.push({ path: 'test.sh', mode: S_IFREG | 0o755, data: Buffer.from(script) });
  for (const [p, data] of Object.entries(files)) entries.push({ path: p, mode: S_IFREG | 0o644, data });
  return gzipSync(cpioNewc(entries), { level: 1 });
}

export interface BootResult {
  /** Console lines (carriage returns and terminal escapes removed). */
  lines: string[];
  /** The whole console output, for failure messages. */
  log: string;
  /** QEMU's exit code, or the signal that ended it. */
  exit: number | string;
}

export interface Boot {
  /** Resolves when QEMU has ended (by itself, by kill(), or by the timeout: then it rejects). */
  done: Promise<BootResult>;
  /** SIGKILL QEMU. */
  kill(): void;
}

/**
 * Boot QEMU (TCG, no network) on `initrd` with one virtio-blk disk: the NBD export on Unix socket
 * `socket`, with discards passed through (`discard=unmap`). `onLine` sees each console line as it
 * arrives. A boot that runs longer than `timeoutMs` is killed and `done` rejects with the log.
 */
export function bootGuest(options: { kernel: GuestKernel; initrd: string; socket: string; timeoutMs: number; onLine?: (line: string) => void }): Boot {
  const args = [
    '-nographic',
    '-no-reboot',
    '-m', '256',
    '-nic', 'none',
    '-kernel', options.kernel.vmlinuz,
    '-initrd', options.initrd,
    // no_timer_check: under TCG on a busy host the guest's check that the IO-APIC timer ticks
    // can time out, and the kernel then panics at boot ("IO-APIC + timer doesn't work"), which
    // failed this test under load without anything of ours involved.
    '-append', 'console=ttyS0 panic=-1 quiet no_timer_check',
    '-blockdev', `driver=nbd,node-name=disk0,server.type=unix,server.path=${options.socket},discard=unmap`,
    '-device', 'virtio-blk-pci,drive=disk0',
  ];
  const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  let partial = '';
  const lines: string[] = [];
  const take = (d: Buffer) => {
    const text = d.toString('latin1');
    log += text;
    partial += text;
    const cut = partial.lastIndexOf('\n');
    if (cut < 0) return;
    for (const raw of partial.slice(0, cut).split('\n')) {
      // eslint-disable-next-line no-control-regex
      const line = raw.replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1bc|\r/g, '');
      lines.push(line);
      options.onLine?.(line);
    }
    partial = partial.slice(cut + 1);
  };
  child.stdout.on('data', take);
  child.stderr.on('data', (d: Buffer) => (log += d.toString('latin1')));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, options.timeoutMs);
  const done = new Promise<BootResult>((resolve, reject) => {
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (partial) lines.push(partial);
      if (timedOut) reject(new Error(`guest still running after ${options.timeoutMs} ms, killed; console:\n${log.slice(-6000)}`));
      else resolve({ lines, log, exit: code ?? signal ?? -1 });
    });
  });
  return { done, kill: () => void child.kill('SIGKILL') };
}

// `node dist-test/support/guest.js` fetches and extracts the kernel into the cache (as .ci/run
// does ahead of the tests) and prints what it holds.
if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  prepareKernel().then(
    (k) => console.log(`${k.name}: ${k.vmlinuz}, modules ${k.modules.map((m) => m.replace(/^.*\//, '')).join(' ')}`),
    (e: Error) => {
      console.error(e.message);
      process.exit(1);
    },
  );
}
