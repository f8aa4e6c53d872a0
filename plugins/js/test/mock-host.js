// In-memory stand-in for the broker's `msmq:plugin/host` interface, used by
// harness.js. Keys are kept as strings (the plugins' keys are UTF-8).

const dec = new TextDecoder();
const k = (bytes) => dec.decode(bytes);

class Refusal extends Error {
  constructor(tag, val) {
    super(`${tag}: ${val}`);
    // jco turns a thrown error's `payload` into the result's err value.
    this.payload = { tag, val };
  }
}

export let committed = new Map();
let overlay = new Map();
export const logs = [];
export const published = [];
let pending = [];
export const knobs = { refusePuts: false, allowedTopics: new Set(), calls: {} };

export function reset() {
  committed = new Map();
  overlay = new Map();
  logs.length = 0;
  published.length = 0;
  pending = [];
  knobs.refusePuts = false;
  knobs.allowedTopics = new Set();
  knobs.calls = {};
}

function count(name) {
  knobs.calls[name] = (knobs.calls[name] ?? 0) + 1;
}

/** Runs one handle-batch call: commit its effects, or drop them on a throw. */
export function call(fn) {
  overlay = new Map();
  pending = [];
  try {
    const out = fn();
    for (const [key, v] of overlay) {
      if (v === undefined) committed.delete(key);
      else committed.set(key, v);
    }
    published.push(...pending);
    return out;
  } finally {
    overlay = new Map();
    pending = [];
  }
}

function read(key) {
  return overlay.has(key) ? overlay.get(key) : committed.get(key);
}

export function log(level, message) {
  logs.push({ level, message });
}

export function publish(m) {
  count('publish');
  if (!knobs.allowedTopics.has(m.topic)) throw new Refusal('not-allowed', `topic ${m.topic}`);
  pending.push({ topic: m.topic, key: m.key && k(m.key), payload: k(m.payload) });
}

export function stateGet(key) {
  count('stateGet');
  return read(k(key));
}

export function statePut(key, value) {
  count('statePut');
  if (knobs.refusePuts) throw new Refusal('too-large', 'refused by the test');
  overlay.set(k(key), value);
}

export function stateDelete(key) {
  count('stateDelete');
  overlay.set(k(key), undefined);
}

export function stateScan(prefix, startAfter, limit) {
  count('stateScan');
  const p = k(prefix);
  const after = startAfter === undefined ? undefined : k(startAfter);
  const keys = new Set([...committed.keys(), ...overlay.keys()]);
  return [...keys]
    .filter((key) => key.startsWith(p) && (after === undefined || key > after) && read(key) !== undefined)
    .sort()
    .slice(0, limit)
    .map((key) => [new TextEncoder().encode(key), read(key)]);
}

export function stateGetMany(keys) {
  count('stateGetMany');
  return keys.map((key) => read(k(key)));
}

export function statePutMany(entries) {
  count('statePutMany');
  if (knobs.refusePuts) throw new Refusal('too-large', 'entry 0: refused by the test');
  for (const [key, v] of entries) overlay.set(k(key), v);
}

export function nowMs() {
  return BigInt(Date.now());
}
