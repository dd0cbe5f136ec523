// Where a qdedup process spends its CPU, thread by thread (Linux): preload it with
//   node -r ./scripts/thread-cpu.cjs bin/qdedup write -q -i data.raw disk.qcow2 0
// and at exit it prints on stderr the CPU time (user + system, from /proc, 10 ms resolution)
// of the main thread, of every other thread still alive, in creation order, and of the
// threads that ended before (worker threads are terminated at close), plus the process's
// total. In Node 20 the other threads are, in creation order: V8's platform threads
// (TurboFan's background compiles, GC helpers), then libuv's thread pool (file I/O and its
// syncs). docs/PERFORMANCE.md "Where the CPU goes" reads such a run.
'use strict';
const fs = require('node:fs');

const CLOCK_TICKS = 100; // USER_HZ on Linux

function threadSeconds(tid) {
  try {
    const stat = fs.readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS; // utime, stime
  } catch {
    return 0; // ended meanwhile
  }
}

process.on('exit', () => {
  const tids = fs
    .readdirSync('/proc/self/task')
    .map(Number)
    .sort((a, b) => a - b);
  const main = threadSeconds(process.pid);
  const others = tids.filter((t) => t !== process.pid).map(threadSeconds);
  const usage = process.cpuUsage();
  const total = (usage.user + usage.system) / 1e6;
  const live = main + others.reduce((a, b) => a + b, 0);
  process.stderr.write(
    `thread CPU (s): main ${main.toFixed(2)}; others ${others.map((s) => s.toFixed(2)).join(' ')}; ` +
      `ended threads ${Math.max(0, total - live).toFixed(2)}; process ${total.toFixed(2)} (user ${(usage.user / 1e6).toFixed(2)}, system ${(usage.system / 1e6).toFixed(2)})\n`,
  );
});
