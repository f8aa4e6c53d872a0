// Notification against the mock host (`npm test` builds it first).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { load, message, batch, stateText } from './harness.js';

const { init, handleBatch, host } = await load('notification');
const run = (msgs) => handleBatch(batch('notify', msgs));

test('without an outbox: logs once per transfer', () => {
  host.reset();
  init([]);
  const out = run([message('t1|alice|10|010'), message('t1|alice|10|10'), message('bad|x'), message('t2|bob|x|1')]);
  assert.deepEqual(out.map((o) => o.tag), ['ack', 'ack', 'dead-letter', 'dead-letter']);
  assert.equal(out[3].val, 'malformed notification: points_added `x` is not a non-negative integer');
  assert.deepEqual(host.logs.filter((l) => l.level === 'info').map((l) => l.message), ['notified alice: transfer t1 earned 10 points (total 10)']);
  assert.deepEqual(stateText(host), { 'sent/t1': '1' });
  run([message('t1|alice|10|10')]);
  assert.equal(host.logs.filter((l) => l.level === 'info').length, 1);
});

test('with an outbox: publishes with key = account', () => {
  host.reset();
  init([['outbox_topic', 'outbox']]);
  host.knobs.allowedTopics.add('outbox');
  const out = run([message('t9|carol|5|15'), message('t9|carol|5|15')]);
  assert.deepEqual(out.map((o) => o.tag), ['ack', 'ack']);
  assert.deepEqual(host.published, [{ topic: 'outbox', key: 'carol', payload: 'notified carol: transfer t9 earned 5 points (total 15)' }]);
  assert.equal(host.knobs.calls.stateGetPacked, 1);
});

test('a refused publish retries the message and marks nothing', () => {
  host.reset();
  init([['outbox_topic', 'elsewhere']]);
  const out = run([message('t3|dan|1|1')]);
  assert.deepEqual(out, [{ tag: 'retry', val: 1000 }]);
  assert.deepEqual(stateText(host), {});
});

test('a refused marker write after publishing fails the whole call', () => {
  host.reset();
  init([['outbox_topic', 'outbox']]);
  host.knobs.allowedTopics.add('outbox');
  host.knobs.refusePuts = true;
  assert.throws(() => run([message('t4|erin|1|1')]));
  assert.deepEqual(host.published, []);
  assert.ok(host.logs.some((l) => l.level === 'error' && l.message.includes('state write refused after publishing')));
});
