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

/**
 * Tests of QEMU's image locks: qcow takes them through the host addon (OFD byte-range locks); the
 * fallback run (QCOW_NO_NATIVE=1) has none to test. Without the addon outside CI the suite skips
 * them too; in CI a missing addon is an error the tests should show.
 */
export function needsQemuLocks(): { skip?: string } {
  if (process.env.QCOW_NO_NATIVE === '1') return { skip: 'QCOW_NO_NATIVE=1: no QEMU-compatible locks to test' };
  if (!hostAddon() && process.env.CI !== 'true') return { skip: 'the host addon is not built' };
  return {};
}
