// Internal snapshots as `qemu-img info` (7.2) shows them. Pure. The `snapshots` objects of
// --output json follow QEMU block/qapi.c bdrv_query_snapshot_info_list (keys in the order
// qemu-img prints them); the "Snapshot list:" table follows bdrv_snapshot_dump.

import type { SnapshotEntry } from '../format/snapshot.ts';
import { humanSize } from './parse.ts';

/** One `snapshots` element of `info --output json` (QAPI SnapshotInfo), in qemu-img's key order. */
export interface SnapshotInfo {
  /** Absent when the entry records none (extra data too short, or 2^64-1). */
  icount?: number | bigint;
  'vm-clock-nsec': number;
  name: string;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  id: string;
  'vm-state-size': number | bigint;
}

const NS_PER_S = 1_000_000_000n;
const U64_MAX = (1n << 64n) - 1n;

/** A QAPI int (int64) from a u64 field: a number when exact, else a bigint (toJson prints its digits). */
function int64(v: bigint): number | bigint {
  const s = BigInt.asIntN(64, v);
  return s >= BigInt(Number.MIN_SAFE_INTEGER) && s <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(s) : s;
}

/** qemu reads ID and name into NUL-terminated C strings: they end at the first NUL. */
function cString(s: string): string {
  const nul = s.indexOf('\0');
  return nul < 0 ? s : s.slice(0, nul);
}

/** The JSON object qemu-img shows for a snapshot table entry. */
export function snapshotInfo(e: SnapshotEntry): SnapshotInfo {
  const hasIcount = e.icount !== undefined && e.icount !== U64_MAX;
  return {
    ...(hasIcount ? { icount: int64(e.icount!) } : {}),
    'vm-clock-nsec': Number(e.vmClockNsec % NS_PER_S),
    name: cString(e.name),
    'date-sec': e.dateSec,
    'date-nsec': e.dateNsec,
    'vm-clock-sec': Number(e.vmClockNsec / NS_PER_S),
    id: cString(e.id),
    'vm-state-size': int64(e.vmStateSize),
  };
}

/** printf's %-Ns / %Ns: padding counts bytes (UTF-8), as C does; longer text is not cut. */
function padRight(s: string, width: number): string {
  return s + ' '.repeat(Math.max(0, width - Buffer.byteLength(s)));
}
function padLeft(s: string, width: number): string {
  return ' '.repeat(Math.max(0, width - Buffer.byteLength(s))) + s;
}
const two = (n: number) => String(n).padStart(2, '0');

/** "%Y-%m-%d %H:%M:%S" of a Unix time in the local time zone (TZ), as glib formats it for qemu-img. */
export function localDate(sec: number): string {
  const d = new Date(sec * 1000);
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

/** The VM CLOCK column: "%02d:%02d:%02d.%03d" of hours (not wrapped at 24), minutes, seconds, milliseconds. */
export function vmClock(sec: number, nsec: number): string {
  return `${two(Math.trunc(sec / 3600))}:${two(Math.trunc(sec / 60) % 60)}:${two(sec % 60)}.${String(Math.trunc(nsec / 1_000_000)).padStart(3, '0')}`;
}

/**
 * The lines qemu-img info prints for a snapshot list: "Snapshot list:", the column header
 * ("%-10s%-17s%8s%20s%13s%11s") and one row per snapshot ("%-9s %-16s %8s%20s%13s%11s").
 * Nothing when there are no snapshots. `date` formats the DATE column (local time).
 */
export function snapshotListLines(list: readonly SnapshotInfo[], date: (sec: number) => string = localDate): string[] {
  if (list.length === 0) return [];
  const lines = [
    'Snapshot list:',
    padRight('ID', 10) + padRight('TAG', 17) + padLeft('VM SIZE', 8) + padLeft('DATE', 20) + padLeft('VM CLOCK', 13) + padLeft('ICOUNT', 11),
  ];
  for (const s of list) {
    const size = humanSize(BigInt.asUintN(64, BigInt(s['vm-state-size']))); // size_to_str takes the u64
    const icount = s.icount === undefined ? '' : String(s.icount);
    lines.push(
      `${padRight(s.id, 9)} ${padRight(s.name, 16)} ` +
        `${padLeft(size, 8)}${padLeft(date(s['date-sec']), 20)}${padLeft(vmClock(s['vm-clock-sec'], s['vm-clock-nsec']), 13)}${padLeft(icount, 11)}`,
    );
  }
  return lines;
}
