// Stand-in for Node's `assert` in yargs' platform shim, in the dist/ bundle only
// (scripts/build.mjs). yargs uses two functions of it for its own sanity checks; loading
// node:assert from an ES module costs ~10–15 ms of every start here.
export function strictEqual(actual, expected, message) {
  if (actual !== expected) throw new Error(typeof message === 'string' ? message : `Expected values to be strictly equal: ${actual} !== ${expected}`);
}

export function notStrictEqual(actual, expected, message) {
  if (actual === expected) throw new Error(typeof message === 'string' ? message : `Expected "actual" to be strictly unequal to: ${expected}`);
}
