// The refcount table in memory (QEMU's IMRT): the references the check counts, one counter
// per host cluster, of the image's refcount width, so it never holds more than the width
// can store (the check reports overflows). Filled by the passes through CheckRun.addReferences.

export class RefcountArray {
  private data: Uint8Array | Uint16Array | Uint32Array | Float64Array;
  size: number;

  constructor(
    private readonly refcountOrder: number,
    size: number,
  ) {
    this.size = size;
    this.data = this.alloc(size);
  }

  private alloc(n: number): Uint8Array | Uint16Array | Uint32Array | Float64Array {
    if (this.refcountOrder <= 3) return new Uint8Array(n);
    if (this.refcountOrder === 4) return new Uint16Array(n);
    if (this.refcountOrder === 5) return new Uint32Array(n);
    return new Float64Array(n);
  }

  get(clusterIndex: number): number {
    return clusterIndex < this.size ? this.data[clusterIndex] : 0;
  }

  set(clusterIndex: number, value: number): void {
    if (clusterIndex >= this.size) this.grow(clusterIndex + 1);
    this.data[clusterIndex] = value;
  }

  /** Makes the array cover `size` clusters (never shrinks). */
  grow(size: number): void {
    if (size <= this.size) return;
    if (size > this.data.length) {
      const next = this.alloc(Math.max(size, this.data.length + (this.data.length >>> 3) + 64));
      next.set(this.data.subarray(0, this.size));
      this.data = next;
    }
    this.size = size;
  }

  clear(): void {
    this.data.fill(0);
  }
}
