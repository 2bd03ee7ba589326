/**
 * The passwords an image's QEMU options name: `encrypt.key-secret` (qcow2, qcow; `key-secret` for
 * the luks format) names a `--object secret` for the image, `backing.encrypt.key-secret` for its
 * backing file, `backing.backing.…` for the one below. Each layer of a chain may have its own.
 */
import { QcowError } from '../node.js';

export interface ImagePasswords {
  /** The top image's password. */
  password: string | undefined;
  /** A layer's own password, by depth (0 = the top image). */
  passwordAt: (depth: number) => string | undefined;
}

const SECRET_KEYS = ['encrypt.key-secret', 'encryption.key-secret', 'key-secret'];

/** The secret id the options give the layer at `depth`, if any. */
function secretIdAt(o: Record<string, string>, depth: number): string | undefined {
  const prefix = 'backing.'.repeat(depth);
  for (const k of SECRET_KEYS) if (o[prefix + k] !== undefined) return o[prefix + k];
  return undefined;
}

/** The passwords of `o`'s layers; a secret id with no `--object secret` of that id is QEMU's error. */
export function passwordsOf(o: Record<string, string>, secrets: ReadonlyMap<string, string>): ImagePasswords {
  const byDepth: (string | undefined)[] = [];
  const deepest = Math.max(0, ...Object.keys(o).map((k) => /^(?:backing\.)*/.exec(k)![0].length / 'backing.'.length));
  for (let d = 0; d <= deepest; d++) {
    const id = secretIdAt(o, d);
    if (id === undefined) continue;
    const password = secrets.get(id);
    if (password === undefined) throw new QcowError('QCOW_INVALID_ARGUMENT', `No secret with id '${id}'`);
    byDepth[d] = password;
  }
  return { password: byDepth[0], passwordAt: (depth) => byDepth[depth] };
}
