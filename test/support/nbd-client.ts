/** The NBD client now ships (compat/qemu-io reads NBD exports through it); tests use it as before. */
export * from '#src/nbd/client.js';
