/**
 * HTTP servers on loopback for the HTTP store and browser tests: Debian's nginx (a real server
 * that honours ranges), and small Node servers that misbehave on purpose (ignore Range, fail
 * transiently). Each is stopped when the test ends.
 */
import { spawn } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { connect, type AddressInfo } from 'node:net';
import { join, normalize } from 'node:path';
import { hasTool, needs, randomBytes, run, runOk } from './qemu.js';

interface After {
  after(fn: () => Promise<void> | void): void;
}

/** Where nginx is: Debian puts it in /usr/sbin, which is not always on PATH. */
export function nginxPath(): string | undefined {
  if (hasTool('nginx')) return 'nginx';
  return hasTool('/usr/sbin/nginx') ? '/usr/sbin/nginx' : undefined;
}

/** needs('nginx'), for an nginx on PATH or in /usr/sbin. */
export function needsNginx(): { skip?: string } {
  return nginxPath() ? {} : needs('nginx');
}

export interface Nginx {
  /** Base URL, ending in '/'. */
  url: string;
  /** One entry per request served so far: method, status, body bytes sent, Range asked. */
  accessLog(): Promise<{ method: string; path: string; status: number; bytes: number; range: string }[]>;
}

/** nginx serving `root` on a free loopback port, in the foreground, with every file it writes in `work`. */
export async function startNginx(t: After, root: string, work: string): Promise<Nginx> {
  const bin = nginxPath();
  if (!bin) throw new Error('nginx is not installed (apt-get install nginx-light)');
  const port = await freePort();
  await mkdir(join(work, 'tmp'), { recursive: true });
  const log = join(work, 'access.log');
  const conf = join(work, 'nginx.conf');
  await writeFile(
    conf,
    `daemon off;
master_process off;
worker_processes 1;
pid ${join(work, 'nginx.pid')};
error_log ${join(work, 'error.log')} warn;
events { worker_connections 128; }
http {
  log_format ranges '$request_method\\t$uri\\t$status\\t$body_bytes_sent\\t$http_range';
  access_log ${log} ranges;
  client_body_temp_path ${join(work, 'tmp')};
  proxy_temp_path ${join(work, 'tmp')};
  fastcgi_temp_path ${join(work, 'tmp')};
  uwsgi_temp_path ${join(work, 'tmp')};
  scgi_temp_path ${join(work, 'tmp')};
  types { text/html html; text/javascript js mjs; application/wasm wasm; }
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:${port};
    root ${root};
  }
}
`,
  );
  const child = spawn(bin, ['-e', join(work, 'error.log'), '-p', work, '-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  t.after(async () => {
    if (child.exitCode === null) child.kill('SIGTERM');
    await exited;
  });
  await waitForPort(port, () => (child.exitCode !== null ? `nginx exited ${child.exitCode}: ${stderr}` : undefined));
  return {
    url: `http://127.0.0.1:${port}/`,
    accessLog: async () =>
      (await readFile(log, 'utf8').catch(() => ''))
        .split('\n')
        .filter((l) => l !== '')
        .map((l) => {
          const [method, path, status, bytes, range] = l.split('\t');
          return { method: method!, path: path!, status: Number(status), bytes: Number(bytes), range: range === '-' ? '' : range! };
        }),
  };
}

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const port = (srv.address() as AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

/** Poll until something accepts connections on `port` (at most ~10 s), or `failed()` says why not. */
async function waitForPort(port: number, failed: () => string | undefined): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const why = failed();
    if (why) throw new Error(why);
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`nothing listens on port ${port}`);
}

export interface NodeServer {
  url: string;
  /** Requests received so far. */
  requests: { method: string; path: string; range: string | undefined }[];
}

type Handler = (req: IncomingMessage, res: ServerResponse, file: string | undefined) => void | Promise<void>;

/**
 * A Node HTTP server serving files of `root` through `handler`, closed when the test ends; with
 * `tls`, an HTTPS server presenting that certificate.
 */
export async function startNodeServer(t: After, root: string, handler: Handler, tls?: { cert: string; key: string }): Promise<NodeServer> {
  const requests: NodeServer['requests'] = [];
  const serve = (req: IncomingMessage, res: ServerResponse) => {
    const path = decodeURIComponent(new URL(req.url ?? '/', 'http://x').pathname);
    requests.push({ method: req.method ?? '', path, range: req.headers.range });
    const file = normalize(join(root, path));
    Promise.resolve(handler(req, res, file.startsWith(root) ? file : undefined)).catch(() => {
      res.statusCode = 500;
      res.end();
    });
  };
  const srv = tls ? createHttpsServer(tls, serve) : createServer(serve);
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  t.after(
    () =>
      new Promise<void>((resolve) => {
        srv.closeAllConnections();
        srv.close(() => resolve());
      }),
  );
  return { url: `${tls ? 'https' : 'http'}://127.0.0.1:${(srv.address() as AddressInfo).port}/`, requests };
}

async function fileSize(file: string | undefined): Promise<number | undefined> {
  if (!file) return undefined;
  try {
    const st = await stat(file);
    return st.isFile() ? st.size : undefined;
  } catch {
    return undefined;
  }
}

/** Answer with the whole file and 200, whatever Range says (as some static hosts do). */
export const ignoreRange: Handler = async (req, res, file) => {
  const size = await fileSize(file);
  if (size === undefined) {
    res.writeHead(404).end();
    return;
  }
  res.writeHead(200, { 'Content-Length': size, 'Content-Type': 'application/octet-stream' });
  if (req.method === 'HEAD') res.end();
  else createReadStream(file!).pipe(res);
};

/** Honour a single `bytes=a-b` range (206) as a conforming server does. */
export const honourRange: Handler = async (req, res, file) => {
  const size = await fileSize(file);
  if (size === undefined) {
    res.writeHead(404).end();
    return;
  }
  const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
  if (!m) return ignoreRange(req, res, file);
  const start = Number(m[1]);
  const end = Math.min(m[2] ? Number(m[2]) : size - 1, size - 1);
  if (start >= size) {
    res.writeHead(416, { 'Content-Range': `bytes */${size}` }).end();
    return;
  }
  res.writeHead(206, { 'Content-Length': end - start + 1, 'Content-Range': `bytes ${start}-${end}/${size}`, 'Accept-Ranges': 'bytes' });
  if (req.method === 'HEAD') res.end();
  else createReadStream(file!, { start, end }).pipe(res);
};

/**
 * Fail the first `failures` requests (in turn: 503 with Retry-After: 0, a dropped connection,
 * 429), then behave as `then`.
 */
export function failFirst(failures: number, then: Handler): Handler {
  let seen = 0;
  return (req, res, file) => {
    seen++;
    if (seen > failures) return then(req, res, file);
    if (seen % 3 === 1) res.writeHead(503, { 'Retry-After': '0' }).end();
    else if (seen % 3 === 2) req.socket.destroy();
    else res.writeHead(429).end();
  };
}

export interface SiteImage {
  /** Path under the site root, as it goes into a URL. */
  path: string;
  format: string;
  /** qemu-img arguments that open the same image from the file system. */
  qemuArgs: string[];
}

/**
 * Test images made by qemu-img under `www`, from a 4 MiB source with patterns, zeros and an
 * incompressible MiB (as in the spec's recipes): plain, zlib- and zstd-compressed qcow2, a chain
 * whose backing files are named relative to the naming image (one in a sibling folder, '..'),
 * and qcow v1 plain and compressed.
 */
export async function buildImageSite(www: string): Promise<SiteImage[]> {
  const MiB = 2 ** 20;
  const src = new Uint8Array(4 * MiB);
  src.fill(0xab, 0, MiB);
  src.fill(0xcd, 2 * MiB, 2 * MiB + 64 * 1024);
  src.set(randomBytes(MiB, 11), 3 * MiB);
  await mkdir(join(www, 'images'), { recursive: true });
  await mkdir(join(www, 'bases'), { recursive: true });
  await writeFile(join(www, 'src.raw'), src);
  const img = (...args: string[]) => runOk('qemu-img', args, { cwd: www });
  await img('convert', '-O', 'qcow2', 'src.raw', 'plain.qcow2');
  await img('convert', '-c', '-O', 'qcow2', 'src.raw', 'zlib.qcow2');
  await img('convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', 'src.raw', 'zstd.qcow2');
  // bases/base.qcow2 -> bases/src.raw ; images/top.qcow2 -> ../bases/base.qcow2
  await writeFile(join(www, 'bases', 'src.raw'), src);
  await img('create', '-q', '-f', 'qcow2', '-b', 'src.raw', '-F', 'raw', 'bases/base.qcow2');
  await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 512k 256k', 'bases/base.qcow2'], { cwd: www });
  await img('create', '-q', '-f', 'qcow2', '-b', '../bases/base.qcow2', '-F', 'qcow2', 'images/top.qcow2');
  await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5e 1536k 128k', '-c', 'write -z 3M 64k', 'images/top.qcow2'], { cwd: www });
  await img('convert', '-O', 'qcow', 'src.raw', 'v1.qcow');
  // qemu 7.2's "convert -c -O qcow" exits 1 after writing everything (see the spec); check it.
  await run('qemu-img', ['convert', '-c', '-O', 'qcow', 'src.raw', 'v1-comp.qcow'], { cwd: www });
  await img('compare', '-f', 'raw', '-F', 'qcow', 'src.raw', 'v1-comp.qcow');
  const at = (p: string) => join(www, p);
  return [
    { path: 'src.raw', format: 'raw', qemuArgs: ['-f', 'raw', at('src.raw')] },
    { path: 'plain.qcow2', format: 'qcow2', qemuArgs: ['-f', 'qcow2', at('plain.qcow2')] },
    { path: 'zlib.qcow2', format: 'qcow2', qemuArgs: ['-f', 'qcow2', at('zlib.qcow2')] },
    { path: 'zstd.qcow2', format: 'qcow2', qemuArgs: ['-f', 'qcow2', at('zstd.qcow2')] },
    { path: 'images/top.qcow2', format: 'qcow2', qemuArgs: ['-f', 'qcow2', at('images/top.qcow2')] },
    { path: 'v1.qcow', format: 'qcow', qemuArgs: ['-f', 'qcow', at('v1.qcow')] },
    { path: 'v1-comp.qcow', format: 'qcow', qemuArgs: ['-f', 'qcow', at('v1-comp.qcow')] },
  ];
}
