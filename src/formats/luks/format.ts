/**
 * The luks format's entry in the registry. The device and LUKS's crypto (luks.ts, src/crypto/) are
 * loaded when a LUKS image is opened or made: every image is probed against every format, and a
 * qcow2 or raw image's command set up ~13 crypto modules for nothing.
 */
import type { CreateOptions, ImageFormat, OpenOptions } from '../../core/block-device.js';
import type { ByteStore } from '../../storage/types.js';
import { LUKS_MAGIC } from '../../crypto/luks-header.js';

/** The luks format: a LUKS1 volume in a file (QEMU's `-f luks`). Probed by the LUKS magic. */
export const luksFormat: ImageFormat = {
  name: 'luks',
  probe(head: Uint8Array): number {
    return head.length >= 8 && LUKS_MAGIC.every((v, i) => head[i] === v) && head[6] === 0 && head[7] === 1 ? 100 : 0;
  },
  async open(store: ByteStore, options?: OpenOptions) {
    return (await import('./luks.js')).LuksDevice.open(store, options);
  },
  async create(store: ByteStore, options: CreateOptions) {
    return (await import('./luks.js')).createLuksImage(store, options);
  },
  amendOptions: {
    state: 'active: add a password to a key slot; inactive: erase key slots',
    keyslot: 'the key slot to add to or erase (0-7)',
    'old-secret': 'ID of the secret whose key slots to erase',
    'new-secret': 'ID of the secret holding the password to add',
    'iter-time': 'milliseconds of PBKDF2 for the new key slot',
  },
  createOptions: {
    size: 'Virtual disk size',
    'key-secret': 'ID of the secret that provides the keyslot passphrase (the password comes from --password-file)',
    'cipher-alg': 'aes-128 or aes-256 (default)',
    'cipher-mode': 'xts (default) or cbc',
    'ivgen-alg': 'plain64 (default) or essiv',
    'ivgen-hash-alg': 'sha256 (the ESSIV hash)',
    'hash-alg': 'sha256 (default), sha1, sha512',
    'iter-time': 'milliseconds of PBKDF2 per key slot unlock (default 2000)',
    preallocation: 'Preallocation mode of the payload (allowed values: off, falloc, full)',
  },
};
