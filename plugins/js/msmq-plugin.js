// msmq-plugin.js: a thin guest SDK for MSMQ consumer plugins written in
// JavaScript and built with componentize-js for the world
// `msmq:plugin/packed-consumer@1.3.0` (see ../../wit/plugin.wit).
//
// A plugin module does:
//
//   import { definePlugin, ack, deadLetter, state, log } from '../msmq-plugin.js';
//   export const { init, handlePacked } = definePlugin({
//     init(config) { ... },            // optional; throw to refuse the deploy
//     handle(batch) { return batch.messages.map(m => ack()); },
//   });
//
// Everything here is a wrapper over the `host` interface; the broker's
// contract (atomic commit with the outcomes, idempotency by message id) is
// described in plugins/README.md.

import * as host from 'msmq:plugin/host@1.3.0';

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder('utf-8', { fatal: true });
const lossyDecoder = new TextDecoder('utf-8');

// ------------------------------------------------------------------ bytes --

/** `value` as bytes: strings are UTF-8 encoded, byte arrays passed as is. */
export function bytes(value) {
  if (value instanceof Uint8Array) return value;
  if (typeof value === 'string') return encoder.encode(value);
  if (ArrayBuffer.isView(value)) {
    return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  }
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  throw new TypeError(`expected a string or bytes, got ${typeof value}`);
}

/**
 * UTF-8 text of `data`. Throws a TypeError on invalid UTF-8 unless `lossy`,
 * which replaces bad sequences with U+FFFD instead.
 */
export function text(data, lossy = false) {
  if (data === undefined || data === null) return data;
  return (lossy ? lossyDecoder : strictDecoder).decode(data);
}

// ---------------------------------------------------------------- outcomes --

const ACK = Object.freeze({ tag: 'ack' });

/** Done; the message is never delivered again. */
export function ack() {
  return ACK;
}

/** Deliver the message again after `ms` milliseconds (a u32). */
export function retry(ms) {
  if (!Number.isInteger(ms) || ms < 0 || ms > 0xffffffff) {
    throw new RangeError(`retry delay must be an integer 0..=4294967295 ms, got ${ms}`);
  }
  return { tag: 'retry', val: ms };
}

/** Move the message to the plugin's dead-letter topic with `reason`. */
export function deadLetter(reason) {
  return { tag: 'dead-letter', val: String(reason) };
}

// ------------------------------------------------------------ host errors --

/**
 * A refused publish or state write. `kind` is one of `not-allowed`,
 * `unknown-topic`, `too-large`, `other`; `detail` is the broker's text.
 */
export class HostError extends Error {
  constructor(kind, detail) {
    super(`${kind}: ${detail}`);
    this.name = 'HostError';
    this.kind = kind;
    this.detail = detail;
  }
}

// Imports returning `result<_, host-error>` throw an error whose `payload`
// is the variant; turn it into a HostError and let anything else through.
function call(fn, ...args) {
  try {
    return fn(...args);
  } catch (e) {
    const p = e && e.payload;
    if (p && typeof p === 'object' && typeof p.tag === 'string') {
      throw new HostError(p.tag, String(p.val));
    }
    throw e;
  }
}

// -------------------------------------------------------------------- log --

const LEVELS = ['trace', 'debug', 'info', 'warn', 'error'];

function format(args) {
  return args
    .map((a) => {
      if (typeof a === 'string') return a;
      if (a instanceof Error) return a.message;
      if (typeof a === 'bigint') return a.toString();
      try {
        return JSON.stringify(a, (_k, v) => (typeof v === 'bigint' ? v.toString() : v));
      } catch {
        return String(a);
      }
    })
    .join(' ');
}

/**
 * Lines in the broker's log, tagged with the plugin's name:
 * `log.info('x', 1)`, or `log.write(level, ...)`. Not part of the batch's
 * transaction: a redelivered batch logs again.
 */
export const log = {
  write(level, ...args) {
    if (!LEVELS.includes(level)) throw new RangeError(`unknown log level ${level}`);
    host.log(level, format(args));
  },
  trace: (...args) => host.log('trace', format(args)),
  debug: (...args) => host.log('debug', format(args)),
  info: (...args) => host.log('info', format(args)),
  warn: (...args) => host.log('warn', format(args)),
  error: (...args) => host.log('error', format(args)),
};

// ---------------------------------------------------------------- publish --

function headerList(headers) {
  if (!headers) return [];
  const list = Array.isArray(headers) ? headers : Object.entries(headers);
  return list.map((h) =>
    Array.isArray(h) ? { name: String(h[0]), value: String(h[1]) } : { name: String(h.name), value: String(h.value) },
  );
}

/**
 * Publish `payload` (string or bytes) to `topic`, visible only if the batch
 * commits. Options: `key` (string or bytes), `tag`, `headers` (an object or
 * a list of [name, value]). Throws HostError when refused.
 */
export function publish(topic, payload, { key, tag, headers } = {}) {
  call(host.publish, {
    topic: String(topic),
    payload: bytes(payload),
    key: key === undefined || key === null ? undefined : bytes(key),
    tag: tag === undefined || tag === null ? undefined : String(tag),
    headers: headerList(headers),
  });
}

/** Broker wall-clock time in ms since the Unix epoch, as a Number. */
export function nowMs() {
  return Number(host.nowMs());
}

// ------------------------------------------------------------------ state --

// Many keys or values as one `byte-strings` (WIT 1.2): the bindings copy it
// in two pieces, where a list of byte arrays costs several objects and calls
// per element. Strings that are all ASCII (the usual keys) take one join and
// one encode.
function pack(items) {
  const n = items.length;
  const ends = new Uint32Array(n);
  // String lengths as byte offsets, right if every string is ASCII.
  let end = 0;
  let i = 0;
  for (; i < n; i++) {
    const item = items[i];
    if (typeof item !== 'string') break;
    end += item.length;
    ends[i] = end;
  }
  if (i === n) {
    const data = encoder.encode(items.join(''));
    // UTF-8 is longer than UTF-16 for anything but ASCII.
    if (data.length === end) return { data, ends };
  }
  const parts = new Array(n);
  let total = 0;
  for (let i = 0; i < n; i++) {
    parts[i] = bytes(items[i]);
    total += parts[i].length;
    ends[i] = total;
  }
  const data = new Uint8Array(total);
  for (let i = 0, at = 0; i < n; i++) {
    data.set(parts[i], at);
    at += parts[i].length;
  }
  return { data, ends };
}

// The answer of `state-get-packed` as one value per key: views into one
// buffer, or `undefined` for a missing key.
function unpackValues({ values: { data, ends }, missing }) {
  const out = new Array(ends.length);
  for (let i = 0, start = 0; i < ends.length; i++) {
    out[i] = data.subarray(start, ends[i]);
    start = ends[i];
  }
  for (let j = 0; j < missing.length; j++) out[missing[j]] = undefined;
  return out;
}

/**
 * The plugin's key-value state. Keys and values are strings (UTF-8) or
 * bytes; reads return a Uint8Array (or undefined when missing), the `*Text`
 * variants a string. Reads see this batch's own writes; writes commit with
 * the batch. Writes throw HostError when refused.
 */
export const state = {
  get(key) {
    return host.stateGet(bytes(key));
  },
  getText(key) {
    return text(host.stateGet(bytes(key)));
  },
  /** One host call for many keys: one answer per key, in order. */
  getMany(keys) {
    if (keys.length === 0) return [];
    return unpackValues(host.stateGetPacked(pack(keys)));
  },
  /** `getMany` as strings; throws a TypeError if a value is not UTF-8. */
  getManyText(keys) {
    if (keys.length === 0) return [];
    const found = host.stateGetPacked(pack(keys));
    const { data, ends } = found.values;
    const all = strictDecoder.decode(data);
    const out = new Array(ends.length);
    if (all.length === data.length) {
      // ASCII: byte offsets are string offsets.
      for (let i = 0, start = 0; i < ends.length; i++) {
        out[i] = all.slice(start, ends[i]);
        start = ends[i];
      }
    } else {
      for (let i = 0, start = 0; i < ends.length; i++) {
        out[i] = strictDecoder.decode(data.subarray(start, ends[i]));
        start = ends[i];
      }
    }
    for (let j = 0; j < found.missing.length; j++) out[found.missing[j]] = undefined;
    return out;
  },
  contains(key) {
    return host.stateGet(bytes(key)) !== undefined;
  },
  put(key, value) {
    call(host.statePut, bytes(key), bytes(value));
  },
  /**
   * Write several entries in one call, all or none: `putMany(entries)`
   * with a list of [key, value] or a Map, or `putMany(keys, values)` with
   * two arrays of one length (the fastest: no pair per entry). Later
   * entries win over earlier ones with the same key.
   */
  putMany(entries, values) {
    let keys = entries;
    if (values === undefined) {
      keys = [];
      values = [];
      for (const [k, v] of entries) {
        keys.push(k);
        values.push(v);
      }
    } else if (keys.length !== values.length) {
      throw new RangeError(`putMany: ${keys.length} keys but ${values.length} values`);
    }
    if (keys.length > 0) call(host.statePutPacked, pack(keys), pack(values));
  },
  delete(key) {
    host.stateDelete(bytes(key));
  },
  /**
   * One page: up to `limit` [key, value] byte pairs under `prefix` in key
   * order, after `startAfter` when given.
   */
  scan(prefix, { startAfter, limit = 100 } = {}) {
    return host.stateScan(bytes(prefix), startAfter === undefined ? undefined : bytes(startAfter), limit);
  },
  /** Every [key, value] under `prefix`, fetched a page at a time. */
  *scanAll(prefix, { pageSize = 100 } = {}) {
    let after;
    for (;;) {
      const page = state.scan(prefix, { startAfter: after, limit: pageSize });
      yield* page;
      if (page.length < pageSize) return;
      after = page[page.length - 1][0];
    }
  },
};

// ------------------------------------------------------- batch and message --

// Two hex digits per byte value.
const HEX = Array.from({ length: 256 }, (_, b) => b.toString(16).padStart(2, '0'));

function hexOf(bytes, start, end) {
  let out = '';
  for (let i = start; i < end; i++) out += HEX[bytes[i]];
  return out;
}

/** A message id (`{ hi, lo }`, two BigInts) as 32 lowercase hex digits. */
export function idHex(id) {
  return id.hi.toString(16).padStart(16, '0') + id.lo.toString(16).padStart(16, '0');
}

// A flat column of a `packed-batch` as a typed array of its little-endian
// numbers (Wasm is little-endian), copied first if it is not aligned.
function numbers(bytes, Type) {
  const aligned = bytes.byteOffset % Type.BYTES_PER_ELEMENT === 0 ? bytes : bytes.slice();
  return new Type(aligned.buffer, aligned.byteOffset, aligned.byteLength / Type.BYTES_PER_ELEMENT);
}

/** The strings of a `flat-strings`, as views into its data. */
function split({ data, ends }) {
  const at = numbers(ends, Uint32Array);
  const out = new Array(at.length);
  for (let i = 0, start = 0; i < at.length; i++) {
    out[i] = data.subarray(start, at[i]);
    start = at[i];
  }
  return out;
}

// Bits of `packed-batch.present`.
const HAS_KEY = 1;
const HAS_TAG = 2;

/** One message of a batch: a view of entry `index` of the packed batch. */
export class Message {
  constructor(batch, index) {
    this.batch = batch;
    this.index = index;
  }
  get topic() {
    return this.batch.topic;
  }
  /** `{ hi, lo }`, two BigInts. */
  get id() {
    const ids = this.batch.packed.ids;
    const view = new DataView(ids.buffer, ids.byteOffset + 16 * this.index, 16);
    return { hi: view.getBigUint64(0), lo: view.getBigUint64(8) };
  }
  /** The id as 32 lowercase hex digits, `hi` then `lo` (big-endian). */
  get idHex() {
    return hexOf(this.batch.packed.ids, 16 * this.index, 16 * this.index + 16);
  }
  get partition() {
    return this.batch.partitions[this.index];
  }
  /** BigInt. */
  get offset() {
    return this.batch.offsets[this.index];
  }
  /** BigInt, ms since the Unix epoch. */
  get timestampMs() {
    return this.batch.timestampsMs[this.index];
  }
  get attempt() {
    return this.batch.attempts[this.index];
  }
  get isRedelivery() {
    return this.attempt > 1;
  }
  /** Uint8Array. */
  get payload() {
    return this.batch.payloads[this.index];
  }
  /** The payload as UTF-8 text; throws a TypeError if it is not. */
  text(lossy = false) {
    return text(this.payload, lossy);
  }
  /** Uint8Array or undefined. */
  get key() {
    return this.batch.keys[this.index];
  }
  keyText(lossy = false) {
    return text(this.key, lossy);
  }
  /** String or undefined. */
  get tag() {
    return this.batch.tags[this.index];
  }
  /** A list of `{ name, value }`. */
  get headers() {
    return this.batch.headersOf(this.index);
  }
  /** The first header named `name`, or undefined. */
  header(name) {
    const h = this.headers.find((h) => h.name === name);
    return h === undefined ? undefined : h.value;
  }
}

/**
 * The messages of one call, from `topic`. Iterable. The broker hands a
 * batch over field by field (WIT `packed-batch`, kept as `packed`), and the
 * whole-batch accessors read it that way, with no object per message:
 * `payloads`, `texts()`, `idHexes()`, `keys`, `tags`. `messages` (and
 * iterating) gives a `Message` view per message, handier and slower.
 */
export class Batch {
  constructor(packed) {
    this.topic = packed.topic;
    this.packed = packed;
    this.length = packed.count;
    this._messages = undefined;
    this._payloads = undefined;
    this._keys = undefined;
    this._tags = undefined;
    this._headers = undefined;
  }
  /** Partitions, a Uint32Array. */
  get partitions() {
    return numbers(this.packed.partitions, Uint32Array);
  }
  /** Offsets, a BigUint64Array. */
  get offsets() {
    return numbers(this.packed.offsets, BigUint64Array);
  }
  /** Append times, ms since the Unix epoch, a BigUint64Array. */
  get timestampsMs() {
    return numbers(this.packed.timestampsMs, BigUint64Array);
  }
  /** Delivery attempts (1 on first delivery), a Uint32Array. */
  get attempts() {
    return numbers(this.packed.attempts, Uint32Array);
  }
  /** The payloads, Uint8Array views, in message order. */
  get payloads() {
    if (this._payloads === undefined) this._payloads = split(this.packed.payloads);
    return this._payloads;
  }
  /**
   * The payloads as UTF-8 text, in message order (one decode for the whole
   * batch when it is ASCII); `undefined` for a payload that is not UTF-8.
   */
  texts() {
    const data = this.packed.payloads.data;
    const ends = numbers(this.packed.payloads.ends, Uint32Array);
    const out = new Array(ends.length);
    let all;
    try {
      all = strictDecoder.decode(data);
    } catch {
      all = undefined;
    }
    if (all !== undefined && all.length === data.length) {
      // ASCII: byte offsets are string offsets.
      for (let i = 0, start = 0; i < ends.length; i++) {
        out[i] = all.slice(start, ends[i]);
        start = ends[i];
      }
      return out;
    }
    for (let i = 0, start = 0; i < ends.length; i++) {
      try {
        out[i] = strictDecoder.decode(data.subarray(start, ends[i]));
      } catch {
        out[i] = undefined;
      }
      start = ends[i];
    }
    return out;
  }
  /** The ids as 32 lowercase hex digits each, in message order. */
  idHexes() {
    const ids = this.packed.ids;
    const out = new Array(this.length);
    // One broker's ids share their first 8 bytes (its store id).
    let hiHex = '';
    let hiAt = -1;
    for (let i = 0; i < this.length; i++) {
      const at = 16 * i;
      if (hiAt < 0 || !sameBytes(ids, hiAt, at, 8)) {
        hiHex = hexOf(ids, at, at + 8);
        hiAt = at;
      }
      out[i] = hiHex + hexOf(ids, at + 8, at + 16);
    }
    return out;
  }
  /** The keys, Uint8Array views or `undefined` for a message without one. */
  get keys() {
    if (this._keys === undefined) {
      this._keys = split(this.packed.keys);
      const present = this.packed.present;
      for (let i = 0; i < present.length; i++) if (!(present[i] & HAS_KEY)) this._keys[i] = undefined;
    }
    return this._keys;
  }
  /** The tags, strings or `undefined` for an untagged message. */
  get tags() {
    if (this._tags === undefined) {
      const present = this.packed.present;
      this._tags = split(this.packed.tags).map((t, i) => (present[i] & HAS_TAG ? text(t) : undefined));
    }
    return this._tags;
  }
  /** The headers of message `index`, a list of `{ name, value }`. */
  headersOf(index) {
    if (this._headers === undefined) {
      this._headers = new Map();
      for (const [i, h] of this.packed.headers) {
        if (!this._headers.has(i)) this._headers.set(i, []);
        this._headers.get(i).push(h);
      }
    }
    return [...(this._headers.get(index) ?? [])];
  }
  /** The messages as `Message` views, made on first use. */
  get messages() {
    if (this._messages === undefined) {
      this._messages = Array.from({ length: this.length }, (_, i) => new Message(this, i));
    }
    return this._messages;
  }
  [Symbol.iterator]() {
    return this.messages[Symbol.iterator]();
  }
}

function sameBytes(bytes, a, b, n) {
  for (let i = 0; i < n; i++) if (bytes[a + i] !== bytes[b + i]) return false;
  return true;
}

/** The deploy-time `--config key=value` pairs. */
export class Config {
  constructor(pairs) {
    this.map = new Map(pairs);
  }
  get(key) {
    return this.map.get(key);
  }
  getOr(key, fallback) {
    return this.map.has(key) ? this.map.get(key) : fallback;
  }
  has(key) {
    return this.map.has(key);
  }
  /** The value, or an Error that refuses the deploy. */
  require(key) {
    if (!this.map.has(key)) throw new Error(`missing config key \`${key}\``);
    return this.map.get(key);
  }
  entries() {
    return this.map.entries();
  }
}

// ---------------------------------------------------------------- exports --

// One log line: the broker log is line-oriented, so the stack's newlines go.
function describe(e) {
  if (e instanceof Error) {
    // Frames of the generated bindings name a build-time temp file: drop them.
    const frames = (e.stack || '').split('\n').filter((f) => f.trim() && !f.includes('initializer.js'));
    const stack = frames.join(' <- ');
    return `${e.name}: ${e.message}${stack ? ` | stack: ${stack}` : ''}`;
  }
  return `thrown value: ${format([e])}`;
}

const NO_RETRIES = new Uint32Array(0);

/** `outcomes` checked and packed as WIT `packed-outcomes`. */
function packOutcomes(outcomes, count) {
  if (!Array.isArray(outcomes)) {
    throw new TypeError(`handle must return an array of outcomes, got ${typeof outcomes}`);
  }
  if (outcomes.length !== count) {
    throw new Error(`handle returned ${outcomes.length} outcomes for ${count} messages`);
  }
  const kinds = new Uint8Array(count);
  const retryMs = [];
  const reasons = [];
  for (let i = 0; i < count; i++) {
    const o = outcomes[i];
    if (o === ACK) continue;
    switch (o?.tag) {
      case 'ack':
        break;
      case 'retry':
        if (!Number.isInteger(o.val) || o.val < 0 || o.val > 0xffffffff) {
          throw new RangeError(`outcome ${i}: retry needs milliseconds in 0..=4294967295, got ${o.val}`);
        }
        kinds[i] = 1;
        retryMs.push(o.val);
        break;
      case 'dead-letter':
        if (typeof o.val !== 'string') {
          throw new TypeError(`outcome ${i}: deadLetter needs a string reason, got ${typeof o.val}`);
        }
        kinds[i] = 2;
        reasons.push(o.val);
        break;
      default:
        throw new TypeError(`outcome ${i}: expected ack(), retry(ms) or deadLetter(reason), got ${format([o])}`);
    }
  }
  return { kinds, retryMs: retryMs.length ? Uint32Array.from(retryMs) : NO_RETRIES, reasons };
}

/**
 * The component's exports for `plugin`: an object (or a class, constructed
 * without arguments) with `handle(batch) -> outcome[]` and an optional
 * `init(config)`. Either may be async.
 *
 * A throw from `init` is logged and refuses the deploy with its message. A
 * throw from `handle` (or a wrong number of outcomes) is logged at error
 * level with its stack, then rethrown: the call traps, the broker rolls the
 * whole batch back (state, publishes) and delivers it again.
 */
export function definePlugin(plugin) {
  let instance = typeof plugin === 'function' ? null : plugin;

  function initFailed(e) {
    host.log('error', `init failed: ${describe(e)}`);
    return { tag: 'err', val: e instanceof Error ? e.message : format([e]) };
  }

  function init(pairs) {
    try {
      if (instance === null) instance = new plugin();
      const config = new Config(pairs);
      const r = typeof instance.init === 'function' ? instance.init(config) : undefined;
      if (r && typeof r.then === 'function') {
        return r.then(() => ({ tag: 'ok' }), initFailed);
      }
      return { tag: 'ok' };
    } catch (e) {
      return initFailed(e);
    }
  }

  function batchFailed(e, count) {
    const what = `${count} message${count === 1 ? '' : 's'}`;
    host.log('error', `handle failed (${what}; the batch is rolled back): ${describe(e)}`);
    throw e;
  }

  function handlePacked(packed) {
    const count = packed.count;
    try {
      if (instance === null) throw new Error('handle-packed called before init');
      const r = instance.handle(new Batch(packed));
      if (r && typeof r.then === 'function') {
        return r.then((o) => packOutcomes(o, count)).catch((e) => batchFailed(e, count));
      }
      return packOutcomes(r, count);
    } catch (e) {
      return batchFailed(e, count);
    }
  }

  return { init, handlePacked };
}
