/**
 * The NBD client, in a module of its own so that nbd-store.ts can load it when it connects: the
 * qemu-img persona imports nbd-store.ts for its file-name checks on every command, and the client
 * brings node:net (~110 page faults of every start) that only NBD exports need.
 */
export { NbdClient } from '../node.js';
