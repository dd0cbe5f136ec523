// Stand-in for chalk's vendored supports-color, in the dist/ bundle only (scripts/build.mjs).
// qdedup never uses chalk's default instances: src/cli/output.ts builds its own Chalk with
// the level it decides (--color, FORCE_COLOR, NO_COLOR, the TTY). The real module loads
// node:tty and node:os and probes the terminal at load, ~10 ms of every start here.
export function createSupportsColor() {
  return false;
}

export default { stdout: false, stderr: false };
