// asyncprobe: async init and handle, for the SDK's tests. Config `fail`
// makes init throw; a batch from topic `boom` makes handle throw; one from
// `platform` logs what the JS platform offers (console, random, clocks,
// timers) and one from `fetch` calls fetch; otherwise every other message is
// retried after 5 ms.

import { definePlugin, ack, retry, log, nowMs } from '../../msmq-plugin.js';

async function platform() {
  console.log('asyncprobe: console.log reaches stdout');
  console.error('asyncprobe: console.error reaches stderr');
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  const t0 = performance.now();
  await new Promise((resolve) => setTimeout(resolve, 20));
  const waited = Math.round(performance.now() - t0);
  log.info(`platform: random=${Math.random() < 1} crypto=${bytes.length} dateSkewMs=${Math.abs(Date.now() - nowMs()) < 5000} timerWaitedMs>=20:${waited >= 20}`);
}

export const { init, handleBatch } = definePlugin({
  async init(config) {
    await null;
    if (config.has('fail')) throw new Error(`init refused: ${config.get('fail')}`);
  },
  async handle(batch) {
    await Promise.resolve();
    if (batch.topic === 'boom') throw new Error('async boom');
    if (batch.topic === 'platform') await platform();
    if (batch.topic === 'fetch') await fetch('http://127.0.0.1:9/');
    return batch.messages.map((_m, i) => (i % 2 ? retry(5) : ack()));
  },
});
