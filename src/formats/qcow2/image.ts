/**
 * The state of an open qcow2 image and its one owner: the header, the geometry, the stores (the
 * image file and the data file, which is the image file unless an external one is named), the
 * file's length, the virtual size, the snapshot list, the encryption. Everything else reads these
 * through getters; whatever changes them calls a method here, so there is one place where each
 * changes and a header on disk and in memory cannot drift apart.
 *
 * The L1 table and the L2 cache belong to the cluster map (cluster-map.ts), refcounts to the
 * allocator (alloc.ts); this module does no mapping and no allocation.
 */
import type { ByteStore } from '../../storage/types.js';
import { encodeHeader, type Qcow2Header } from './header.js';
import { AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2, hasFeature } from './features.js';
import { qcow2Geometry, type Qcow2Geometry } from './layout.js';
import type { L2Context } from './l2-entry.js';
import type { Qcow2Snapshot } from './snapshot-table.js';
import type { Qcow2Encryption } from './encryption.js';
import { CorruptionSignals } from './corruption.js';

/** Where the virtual size lives (the device: DeviceBase keeps it for range checks). */
export interface VirtualSize {
  size: number;
}

export class Qcow2Image {
  readonly geometry: Qcow2Geometry;
  readonly clusterSize: number;
  readonly l2Context: L2Context;
  private readonly current: Qcow2Header;
  private length: number;
  private data: ByteStore;
  private snapshotList: Qcow2Snapshot[] = [];
  private opened: Qcow2Snapshot | undefined;
  private cipher: Qcow2Encryption | null = null;
  /** The corruption events of this session and who is told them (see corruption.ts). */
  readonly corruption = new CorruptionSignals();

  constructor(
    readonly store: ByteStore,
    header: Qcow2Header,
    fileSize: number,
    readonly readOnly: boolean,
    private readonly virtual: VirtualSize,
  ) {
    this.current = header;
    this.length = fileSize;
    this.data = store;
    this.geometry = qcow2Geometry(header.clusterBits, hasFeature(header.incompatibleFeatures, INCOMPAT_EXTL2));
    this.clusterSize = this.geometry.clusterSize;
    this.l2Context = {
      clusterBits: header.clusterBits,
      extendedL2: this.geometry.extendedL2,
      externalDataFile: hasFeature(header.incompatibleFeatures, INCOMPAT_DATA_FILE),
    };
  }

  // --- reading the state --------------------------------------------------------------------------

  get header(): Readonly<Qcow2Header> {
    return this.current;
  }

  /** The image file's length as far as this image knows (it grows as clusters are allocated). */
  get fileSize(): number {
    return this.length;
  }

  /** Guest bytes' store: the image file, or the external data file. */
  get dataStore(): ByteStore {
    return this.data;
  }

  /** Guest data lives in an external data file. */
  get external(): boolean {
    return this.data !== this.store;
  }

  /** Autoclear bit 1: the external data file is a raw image of the guest (offsets are guest offsets). */
  get dataFileRaw(): boolean {
    return hasFeature(this.current.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW);
  }

  /** Incompatible bit 0: refcounts may be stale (lazy refcounts and no clean close). */
  get dirty(): boolean {
    return hasFeature(this.current.incompatibleFeatures, INCOMPAT_DIRTY);
  }

  get size(): number {
    return this.virtual.size;
  }

  get snapshots(): readonly Qcow2Snapshot[] {
    return this.snapshotList;
  }

  /** The snapshot opened with OpenOptions.snapshot, if any (the image is then read-only). */
  get openedSnapshot(): Qcow2Snapshot | undefined {
    return this.opened;
  }

  get encryption(): Qcow2Encryption | null {
    return this.cipher;
  }

  // --- changing it ----------------------------------------------------------------------------------

  /**
   * Write the header (one cluster at offset 0), after `change` edits a copy of it; the copy's
   * fields become the header's only once written, so a failed write leaves memory as the disk is.
   * (The header object stays the same one: a reader holding it sees the change.) No flush: the
   * caller orders it against its other writes.
   */
  async writeHeader(change?: (h: Qcow2Header) => void): Promise<void> {
    const next: Qcow2Header = { ...this.current };
    change?.(next);
    await this.store.write(0, encodeHeader(next, this.clusterSize));
    Object.assign(this.current, next);
  }

  /**
   * Take header fields the caller has already written to disk itself (the allocator rewrites the
   * refcount table's fields in place when it moves the table; a repair rewrites the header whole).
   */
  noteHeaderWritten(change: (h: Qcow2Header) => void): void {
    change(this.current);
  }

  /** The file reaches at least `end` now (an allocation past the old end). */
  noteFileEnd(end: number): void {
    if (end > this.length) this.length = end;
  }

  /** The file's length after it was cut or rebuilt. */
  setFileSize(n: number): void {
    this.length = n;
  }

  /** The guest-visible size (resize, snapshot apply, shrink). The header is the caller's to write. */
  setSize(n: number): void {
    this.virtual.size = n;
  }

  setSnapshots(list: Qcow2Snapshot[]): void {
    this.snapshotList = list;
  }

  /** Opening only: the snapshot whose tables are read instead of the active ones. */
  openSnapshot(snap: Qcow2Snapshot): void {
    this.opened = snap;
    if (snap.diskSize !== undefined) this.virtual.size = snap.diskSize;
  }

  /** Opening only: the external data file. */
  setDataStore(store: ByteStore): void {
    this.data = store;
  }

  /** Opening only: the cipher of an encrypted image. */
  setEncryption(e: Qcow2Encryption): void {
    this.cipher = e;
  }
}
