// The check's public types — options, counters, the result qemu-img check reports, the hook
// a layer above the engine plugs into (CheckExtension) — and the exit code a result means.
// Also the few values every pass shares: the repair flags and the abort of a pass.

import type { Header } from '../../format/header.ts';
import type { BlockFile } from '../block-file.ts';
import type { LockRequest } from '../image-lock.ts';

/** BDRV_FIX_LEAKS / BDRV_FIX_ERRORS: what a pass may repair. */
export const FIX_LEAKS = 1;
export const FIX_ERRORS = 2;

/** Clusters a repair may add to the file to take in a refcount block that lies past its end. */
export const MAX_REPAIR_GROWTH_CLUSTERS = 1 << 20;

/** Problem lines kept in the result (all of them still go to onMessage, up to MAX_EMITTED_MESSAGES). */
export const MAX_STORED_MESSAGES = 100_000;
/** Problem lines emitted at most; a hostile image could otherwise print without end (I4). */
export const MAX_EMITTED_MESSAGES = 1_000_000;

/** The counters of one check, like QEMU's BdrvCheckResult plus its BlockFragInfo. */
export interface CheckCounts {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  /** End of the highest cluster with a stored refcount or a reference, in bytes. */
  imageEndOffset: number;
  /** Guest clusters of the virtual disk. */
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

export type RepairMode = 'leaks' | 'all';

export interface CheckOptions {
  /** Repair leaks only, or leaks and corruptions. Without it the file is never written. */
  repair?: RepairMode;
  /** Receives each problem line as it is found (qemu-img prints them on stderr). */
  onMessage?: (line: string) => void;
  /** QEMU's image locks to take (../image-lock.ts: LOCK_READ, or LOCK_WRITE to repair); none when absent. */
  lock?: LockRequest;
}

/**
 * A layer above the QCOW2 engine that keeps structures of its own in the image, vouched for
 * by an autoclear bit (the dedup store and bit 60). The engine does not know their layout:
 * the extension names their areas and its problems, the check counts the areas as
 * referenced while they are trusted (so they are not leaks), and `-r all` repairs the
 * problems by clearing the autoclear bit (the structures are then dropped, and their areas
 * become leaks that the same repair frees). `-r leaks` never drops them, and a repair keeps
 * the bit of structures that are trusted and sound. The pass: ./extension.ts.
 */
export interface CheckExtension {
  /** Key of the summary in the JSON document ("dedup"). */
  readonly key: string;
  /** The autoclear bits that vouch for the structures. */
  readonly autoclear: bigint;
  /** Inspects the structures as the header now says (called at the start of every pass); null when the image has none. Never writes. */
  inspect(): Promise<ExtensionReport | null>;
}

export interface ExtensionReport {
  /** True when the structures are in force: their areas then count as referenced. */
  trusted: boolean;
  /** Host ranges the structures own (counted once each while trusted). */
  areas: { offset: number; bytes: number; what: string }[];
  /** Problem lines that dropping the structures repairs (at most a bounded number kept). */
  problems: string[];
  /** The number of such problems (each a corruption), which may exceed problems.length. */
  problemCount: number;
  /** Problem lines no repair of the check can fix (each a corruption). */
  unfixable: string[];
  /** What the JSON document shows under `key`. */
  summary: Record<string, unknown>;
}

/** What `qemu-img check` reports: the final counts, and the repair summary when a repair fixed something. */
export interface ImageCheck extends CheckCounts {
  filename: string;
  format: 'qcow2';
  /** Present when a repair pass fixed something; the counts above then come from the check that followed it. */
  repaired?: { leaksFixed: number; corruptionsFixed: number };
  /** Set when the check could not be completed (QEMU's "Check failed: <reason>"). */
  failure?: string;
  /** The problem lines, in the order found (at most MAX_STORED_MESSAGES). */
  messages: string[];
  /** The extension's summary from the last pass, and whether a repair dropped its structures. */
  extension?: { key: string; summary: Record<string, unknown>; dropped: boolean };
}

/** What a pass runs on: the file, its header (updated in place by repairs) and the active L1. */
export interface CheckTarget {
  path: string;
  file: BlockFile;
  header: Header;
  /** The active L1 table in memory; repairs of L1 entries are applied to it too. */
  l1: Buffer;
  /** True when the file was opened for writing (required by a repair). */
  writable: boolean;
}

export function zeroCounts(): CheckCounts {
  return {
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
  };
}

/** Adds the problem and repair counters of `from` to `into`. */
export function addCounts(into: CheckCounts, from: CheckCounts): void {
  into.corruptions += from.corruptions;
  into.leaks += from.leaks;
  into.checkErrors += from.checkErrors;
  into.corruptionsFixed += from.corruptionsFixed;
  into.leaksFixed += from.leaksFixed;
}

/** qemu-img check's exit code: 1 not completed, 2 corruptions, 3 leaks only, 0 clean. */
export function checkExitCode(result: ImageCheck): number {
  if (result.failure !== undefined || result.checkErrors) return 1;
  if (result.corruptions) return 2;
  if (result.leaks) return 3;
  return 0;
}

/** Aborts a pass, like a negative return in QEMU; `reason` is what "Check failed: …" prints. */
export class CheckAborted extends Error {
  constructor(readonly reason: string) {
    super(reason);
  }
}

/** PRIx64 of a u64 given as hi/lo halves: lower-case hex, no prefix. */
export function hex64(hi: number, lo: number): string {
  return hi ? (hi >>> 0).toString(16) + (lo >>> 0).toString(16).padStart(8, '0') : (lo >>> 0).toString(16);
}

/** PRIx64 of the raw u64 entry `index` of a table (an L1, L2 or bitmap table). */
export function entryHex(table: Buffer, index: number): string {
  return hex64(table.readUInt32BE(index * 8), table.readUInt32BE(index * 8 + 4));
}

/** C's "%#x": "0" for zero, else 0x-prefixed hex. */
export function sharpHex(n: number | bigint): string {
  return n === 0 || n === 0n ? '0' : '0x' + n.toString(16);
}
