// Guest byte ranges against the virtual disk: the error for I/O that goes past its end.

import { QdedupError } from '../errors.ts';

/**
 * The error for guest I/O beyond the virtual disk: exit 1 naming the image, not a usage
 * error (qemu-io reports it as an I/O error: "write failed: Input/output error").
 */
export function pastTheEnd(file: string, offset: number, length: number, virtualSize: number): QdedupError {
  return new QdedupError(`offset ${offset} + length ${length} is past the end of the disk (virtual size ${virtualSize})`, 'ERANGE', 1, { path: file });
}
