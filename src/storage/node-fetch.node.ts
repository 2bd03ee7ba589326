/**
 * The fetch HttpStore uses on Node: undici's request API instead of the global fetch.
 *
 * undici is the client Node's fetch runs on; its request API hands the body over as a Node stream
 * rather than a WHATWG one. Reading 1 GiB in 4 MiB ranges over loopback took 1.3–1.9 s that way
 * against 2.3–2.5 s through fetch, whose per-piece promises and garbage were most of a convert
 * over HTTP. The answer is shaped as the part of a fetch Response that HttpStore uses (status,
 * headers, a body it can cancel) with the Node stream as `nodeBody`, which readBodyCapped reads
 * directly. Like fetch, it follows redirects and reports network failures as a TypeError whose
 * cause is the error.
 */
import type { Readable } from 'node:stream';
import type { Agent } from 'undici';

/** A Response as HttpStore reads it, with the body also as a Node stream. */
export type NodeResponse = Response & { nodeBody?: Readable };

/**
 * `agent`: gives the undici Agent to send requests through (one trusting extra CAs, see
 * deferred-ca.node.ts), or undefined for undici's default.
 */
export function nodeFetch(agent?: () => Promise<Agent>): typeof fetch {
  let undici: ReturnType<typeof loadUndici> | undefined;
  return (async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
    // Loaded on the first request: only commands on http(s) images pay for them.
    const { request, STATUS_CODES, Readable } = await (undici ??= loadUndici());
    const signal = init?.signal ?? undefined;
    let res: Awaited<ReturnType<typeof request>>;
    try {
      res = await request(String(input), {
        method: (init?.method ?? 'GET') as 'GET' | 'HEAD',
        headers: init?.headers as Record<string, string> | undefined,
        signal,
        maxRedirections: 10,
        dispatcher: agent ? await agent() : undefined,
      });
    } catch (e) {
      // As fetch: an aborted request fails with the signal's reason, anything else is a TypeError.
      if (signal?.aborted) throw signal.reason;
      throw new TypeError('fetch failed', { cause: e });
    }
    return replyOf(res.statusCode, STATUS_CODES[res.statusCode] ?? '', res.headers, res.body as unknown as Readable, Readable);
  }) as typeof fetch;
}

const loadUndici = async () => {
  const [undici, http, stream] = await Promise.all([import('undici'), import('node:http'), import('node:stream')]);
  return { request: undici.request, STATUS_CODES: http.STATUS_CODES, Readable: stream.Readable };
};

function replyOf(status: number, statusText: string, raw: Record<string, string | string[] | undefined>, body: Readable, streams: typeof Readable): NodeResponse {
  const headers = new Headers();
  for (const [name, value] of Object.entries(raw)) {
    if (value === undefined) continue;
    for (const v of Array.isArray(value) ? value : [value]) headers.append(name, v);
  }
  // Errors after the reply (a connection lost mid-body) surface where the body is read.
  body.on('error', () => undefined);
  const reply = {
    status,
    statusText,
    ok: status >= 200 && status < 300,
    headers,
    nodeBody: body,
    body: {
      cancel: async () => {
        body.destroy();
      },
      getReader: () => (streams.toWeb(body) as ReadableStream<Uint8Array>).getReader(),
    },
  };
  return reply as unknown as NodeResponse;
}
