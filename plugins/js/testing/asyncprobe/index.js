// asyncprobe: async init and handle, for the SDK's tests. Config `fail`
// makes init throw; a batch from topic `boom` makes handle throw; one from
// `platform` logs what the JS platform offers (console, random, clocks,
// timers), one from `fetch` calls fetch, one from `state` logs what the
// SDK's many-key state calls read back and one from `fields` logs every
// field of every message as the SDK's views read it; otherwise every other
// message is retried after 5 ms.

import { definePlugin, ack, retry, log, nowMs, state } from '../../msmq-plugin.js';

// Keys and values of every kind the SDK packs: ASCII, non-ASCII, bytes,
// empty; missing keys; both forms of putMany and their errors.
function stateCalls() {
  const raw = new Uint8Array([1, 2]);
  state.putMany([['ascii', 'v1'], ['ключ', 'значение'], [raw, new Uint8Array([0xff])], ['empty', '']]);
  state.putMany(['pair-a', 'pair-b'], ['A', 'B']);
  const got = state.getMany(['ascii', 'ключ', raw, 'empty', 'missing', 'pair-b']);
  const text = state.getManyText(['ascii', 'ключ', 'empty', 'missing']);
  const errorName = (f) => {
    try {
      f();
      return 'none';
    } catch (e) {
      return e.name;
    }
  };
  const notText = errorName(() => state.getManyText([raw]));
  const unequal = errorName(() => state.putMany(['k'], []));
  const bytes = got.map((v) => (v === undefined ? null : [...v]));
  log.info(`state: ${JSON.stringify(bytes)} ${JSON.stringify(text)} ${notText} ${unequal} ${state.getMany([]).length}`);
}

// Every field through the Message views, and the batch-wide accessors.
function fields(batch) {
  const each = batch.messages.map((m) => ({
    topic: m.topic,
    id: `${m.id.hi.toString(16)}:${m.id.lo.toString(16)}`,
    idHex: m.idHex,
    partition: m.partition,
    offset: String(m.offset),
    timestampMs: String(m.timestampMs),
    attempt: m.attempt,
    redelivery: m.isRedelivery,
    payload: [...m.payload],
    text: m.text(true),
    key: m.key === undefined ? null : m.keyText(),
    tag: m.tag ?? null,
    headers: m.headers,
    header: m.header('h') ?? null,
  }));
  const texts = batch.texts().map((t) => t ?? null);
  log.info(`fields: ${JSON.stringify({ each, texts, ids: batch.idHexes(), length: batch.length })}`);
}

async function platform() {
  console.log('asyncprobe: console.log reaches stdout');
  console.error('asyncprobe: console.error reaches stderr');
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  const t0 = performance.now();
  await new Promise((resolve) => setTimeout(resolve, 20));
  const waited = Math.round(performance.now() - t0);
  log.info(`platform: random=${Math.random() < 1} crypto=${bytes.length} dateSkewMs=${Math.abs(Date.now() - nowMs()) < 5000} timerWaitedMs>=20:${waited >= 20}`);
}

export const { init, handlePacked } = definePlugin({
  async init(config) {
    await null;
    if (config.has('fail')) throw new Error(`init refused: ${config.get('fail')}`);
  },
  async handle(batch) {
    await Promise.resolve();
    if (batch.topic === 'boom') throw new Error('async boom');
    if (batch.topic === 'platform') await platform();
    if (batch.topic === 'fetch') await fetch('http://127.0.0.1:9/');
    if (batch.topic === 'state') stateCalls();
    if (batch.topic === 'fields') fields(batch);
    return batch.messages.map((_m, i) => (i % 2 ? retry(5) : ack()));
  },
});
