/**
 * Tests that compare where a file has holes with what QEMU leaves: without the host addon
 * (QCOW_NO_NATIVE=1, the fallback run of CI, or no compiler at install) qcow neither punches holes
 * (it writes zeros) nor sees them (SEEK_DATA/HOLE), so such comparisons do not apply.
 */
import { hostAddon } from '#src/host/native.node.js';

export function needsHoles(): { skip?: string } {
  return hostAddon() ? {} : { skip: 'the host addon is not loaded (QCOW_NO_NATIVE=1 or not built): holes are neither punched nor seen' };
}

/** Whether holes are punched and seen here (see the top): false in the fallback run. */
export function holesWork(): boolean {
  return Boolean(hostAddon());
}
