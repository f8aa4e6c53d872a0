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
 * `host` is the mock host module (state, logs, published, knobs).
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
  return { init: mod.init, handleBatch: (b) => host.call(() => mod.handleBatch(b)), host };
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

export function batch(topic, messages) {
  return { topic, messages };
}

/** The mock host's committed state as a plain object of strings. */
export function stateText(host, prefix = '') {
  const out = {};
  for (const [k, v] of host.committed) if (k.startsWith(prefix)) out[k] = dec.decode(v);
  return out;
}
