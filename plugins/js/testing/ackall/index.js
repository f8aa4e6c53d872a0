// ackall (bench plugin): acks every message without looking at it and
// without the SDK, so `msmq bench plugin` on it measures what a JavaScript
// component pays to receive a batch (the engine lifting the WIT records into
// JS objects) apart from any plugin logic.

export function init(_config) {}

export function handleBatch(batch) {
  return batch.messages.map(() => ({ tag: 'ack' }));
}
