/** Which metadata contexts a client's queries name, for listing and for selection. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { allocationDepthContext, baseAllocationContext, matchContexts } from '#src/nbd/contexts.js';

const both = [baseAllocationContext, allocationDepthContext];
const names = (l: { name: string }[]) => l.map((c) => c.name);

test('listing: no query names every context, a namespace wildcard names its own, full names name themselves', () => {
  assert.deepEqual(names(matchContexts(both, [], true)), ['base:allocation', 'qemu:allocation-depth']);
  assert.deepEqual(names(matchContexts(both, ['qemu:'], true)), ['qemu:allocation-depth']);
  assert.deepEqual(names(matchContexts(both, ['base:'], true)), ['base:allocation']);
  assert.deepEqual(names(matchContexts(both, ['qemu:dirty-bitmap:x', 'base:allocation'], true)), ['base:allocation']);
});

test('selecting: only full names select, in the export order; wildcards and unknown names select nothing', () => {
  assert.deepEqual(names(matchContexts(both, ['qemu:allocation-depth', 'base:allocation'], false)), ['base:allocation', 'qemu:allocation-depth']);
  assert.deepEqual(names(matchContexts(both, ['qemu:', 'base:'], false)), []);
  assert.deepEqual(names(matchContexts(both, [], false)), []);
  assert.deepEqual(names(matchContexts([baseAllocationContext], ['qemu:allocation-depth'], false)), []);
});
