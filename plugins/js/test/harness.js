// Runs a built plugin component in Node, without a broker: jco transpiles
// target/NAME.wasm to JS, and its `msmq:plugin/host` import is mapped to an
// in-memory host that keeps the broker's batch semantics (writes become
// visible to later batches only when the call returns; a throw discards
// them). WASI imports, if any, go to jco's preview2 shims.

import { transpile } from '@bytecodealliance/jco';
import { mkdir, writeFile, copyFile, readFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const enc = new TextEncoder();
const dec = new TextDecoder();

/**
 * Loads target/NAME.wasm; returns `{ init, handleBatch, host }` where
 * `handleBatch` calls the component's `handle-packed` with a batch made by
 * `batch` and `host` is the mock host module (state, logs, published, knobs).
 */
export async function load(name) {
  const wasm = await readFile(join(root, 'target', `${name}.wasm`));
  const dir = join(root, 'target', 'test', name);
  await mkdir(dir, { recursive: true });
  const { files } = await transpile(wasm, {
    name,
    map: { 'msmq:plugin/host': './mock-host.js' },
    noTypescript: true,
  });
  for (const [file, bytes] of Object.entries(files)) {
    await mkdir(dirname(join(dir, file)), { recursive: true });
    await writeFile(join(dir, file), bytes);
  }
  await copyFile(join(root, 'test', 'mock-host.js'), join(dir, 'mock-host.js'));
  const host = await import(pathToFileURL(join(dir, 'mock-host.js')).href);
  const mod = await import(pathToFileURL(join(dir, `${name}.js`)).href);
  host.reset();
  return { init: mod.init, handleBatch: (b) => unpackOutcomes(host.call(() => mod.handlePacked(b))), host };
}

let nextId = 1n;

/** A WIT `message` record with a fresh id (or `opts.id`, a BigInt). */
export function message(payload, opts = {}) {
  const id = opts.id ?? nextId++;
  return {
    id: { hi: 0x0123456789abcdefn, lo: id },
    partition: 0,
    offset: id,
    timestampMs: 0n,
    attempt: opts.attempt ?? 1,
    key: opts.key === undefined ? undefined : enc.encode(opts.key),
    tag: opts.tag,
    headers: opts.headers ?? [],
    payload: typeof payload === 'string' ? enc.encode(payload) : payload,
  };
}

// Little-endian, as Wasm and the broker lay them out.
function littleEndian(values, Type) {
  const typed = Type.from(values);
  return new Uint8Array(typed.buffer);
}

function flat(items) {
  const ends = [];
  let total = 0;
  for (const item of items) {
    total += item.length;
    ends.push(total);
  }
  const data = new Uint8Array(total);
  let at = 0;
  for (const item of items) {
    data.set(item, at);
    at += item.length;
  }
  return { data, ends: littleEndian(ends, Uint32Array) };
}

/** A WIT `packed-batch` of `message` records, laid out as the broker does. */
export function batch(topic, messages) {
  const ids = new Uint8Array(16 * messages.length);
  const view = new DataView(ids.buffer);
  messages.forEach((m, i) => {
    view.setBigUint64(16 * i, m.id.hi);
    view.setBigUint64(16 * i + 8, m.id.lo);
  });
  return {
    topic,
    count: messages.length,
    ids,
    partitions: littleEndian(messages.map((m) => m.partition), Uint32Array),
    offsets: littleEndian(messages.map((m) => m.offset), BigUint64Array),
    timestampsMs: littleEndian(messages.map((m) => m.timestampMs), BigUint64Array),
    attempts: littleEndian(messages.map((m) => m.attempt), Uint32Array),
    payloads: flat(messages.map((m) => m.payload)),
    keys: flat(messages.map((m) => m.key ?? new Uint8Array())),
    tags: flat(messages.map((m) => enc.encode(m.tag ?? ''))),
    present: new Uint8Array(messages.map((m) => (m.key !== undefined ? 1 : 0) | (m.tag !== undefined ? 2 : 0))),
    headers: messages.flatMap((m, i) => m.headers.map((h) => [i, h])),
  };
}

/** The outcomes a `packed-outcomes` stands for, as the broker reads it. */
export function unpackOutcomes({ kinds, retryMs, reasons }) {
  let r = 0;
  let d = 0;
  const out = [...kinds].map((kind, i) => {
    if (kind === 0) return { tag: 'ack' };
    if (kind === 1 && r < retryMs.length) return { tag: 'retry', val: retryMs[r++] };
    if (kind === 2 && d < reasons.length) return { tag: 'dead-letter', val: reasons[d++] };
    throw new Error(`outcome ${i}: kind ${kind} without its value`);
  });
  if (r !== retryMs.length || d !== reasons.length) throw new Error('more retry delays or reasons than outcomes');
  return out;
}

/** The mock host's committed state as a plain object of strings. */
export function stateText(host, prefix = '') {
  const out = {};
  for (const [k, v] of host.committed) if (k.startsWith(prefix)) out[k] = dec.decode(v);
  return out;
}
