/**
 * Extra CA certificates whose loading the `qcow` launcher (bin/qcow) moved from Node's start-up to
 * the first https request.
 *
 * Node 20 reads and parses the file named by NODE_EXTRA_CA_CERTS before running any JavaScript:
 * 38 ms for a system bundle of ~140 certificates on our 2-core VM, more than half of a small
 * command's run, and paid by every command although only https images use it. The launcher passes
 * the name on as QCOW_DEFERRED_CA_CERTS instead; here it becomes an https client that trusts what
 * Node would have trusted: Node's own root store plus that file.
 */
import { readFileSync } from 'node:fs';
import type { Agent } from 'undici';

export const DEFERRED_CA_ENV = 'QCOW_DEFERRED_CA_CERTS';

/**
 * An undici Agent that trusts the deferred certificates (made on the first call), or undefined
 * when none were deferred (then undici's default already trusts whatever Node loaded at start-up).
 */
export function deferredCaAgent(env: NodeJS.ProcessEnv = process.env, warn: (line: string) => void = (l) => process.stderr.write(l + '\n')): (() => Promise<Agent>) | undefined {
  const file = env[DEFERRED_CA_ENV];
  if (!file) return undefined;
  let agent: Promise<Agent> | undefined;
  const load = async () => {
    // node:tls costs ~6 ms to load: only now, when an https request is to be made.
    const { rootCertificates } = await import('node:tls');
    const ca = [...rootCertificates];
    try {
      ca.push(readFileSync(file, 'utf8'));
    } catch (e) {
      // What Node does at start-up with an unreadable file: warn and go on with its own roots.
      warn(`qcow: warning: ignoring extra certs from \`${file}\`, load failed: ${(e as Error).message}`);
    }
    // undici is the client inside Node's own fetch; only it takes a CA list per connection.
    const undici = await import('undici');
    return new undici.Agent({ connect: { ca } });
  };
  return () => (agent ??= load());
}

/**
 * A fetch that trusts the deferred certificates, or undefined when none were deferred (then the
 * global fetch already trusts whatever Node loaded at start-up).
 */
export function deferredCaFetch(env: NodeJS.ProcessEnv = process.env, warn: (line: string) => void = (l) => process.stderr.write(l + '\n')): typeof fetch | undefined {
  const agent = deferredCaAgent(env, warn);
  if (!agent) return undefined;
  return async (input, init) => {
    const dispatcher = await agent();
    const undici = await import('undici');
    return undici.fetch(input as string, { ...init, dispatcher } as Parameters<typeof undici.fetch>[1]) as unknown as Response;
  };
}
