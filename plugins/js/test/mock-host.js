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

// A `byte-strings` as its list of byte arrays, checked as the broker does.
function unpack({ data, ends }) {
  const out = [];
  let start = 0;
  for (const end of ends) {
    if (end < start || end > data.length) throw new Error(`bad end ${end}`);
    out.push(data.slice(start, end));
    start = end;
  }
  if (start !== data.length) throw new Error(`ends at ${start} of ${data.length} bytes`);
  return out;
}

export function stateGetPacked(keys) {
  count('stateGetPacked');
  const values = unpack(keys).map((key) => read(k(key)));
  const parts = values.map((v) => v ?? new Uint8Array(0));
  const data = new Uint8Array(parts.reduce((n, v) => n + v.length, 0));
  const ends = new Uint32Array(parts.length);
  let at = 0;
  parts.forEach((v, i) => {
    data.set(v, at);
    at += v.length;
    ends[i] = at;
  });
  const missing = new Uint32Array(values.flatMap((v, i) => (v === undefined ? [i] : [])));
  return { values: { data, ends }, missing };
}

export function statePutPacked(keys, values) {
  count('statePutPacked');
  const ks = unpack(keys);
  const vs = unpack(values);
  if (ks.length !== vs.length) throw new Refusal('other', `${ks.length} keys but ${vs.length} values`);
  if (knobs.refusePuts) throw new Refusal('too-large', 'entry 0: refused by the test');
  ks.forEach((key, i) => overlay.set(k(key), vs[i]));
}

export function nowMs() {
  return BigInt(Date.now());
}
