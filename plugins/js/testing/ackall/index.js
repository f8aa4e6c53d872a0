// ackall (bench plugin): acks every message without looking at it and
// without the SDK, so `msmq bench plugin` on it measures what a JavaScript
// component pays to receive a batch (the engine lifting the WIT
// `packed-batch` into JS objects) apart from any plugin logic.

export function init(_config) {}

const NONE = new Uint32Array(0);

export function handlePacked(batch) {
  return { kinds: new Uint8Array(batch.count), retryMs: NONE, reasons: [] };
}
