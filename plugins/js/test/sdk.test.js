// The SDK's error and async paths, with testing/thrower and
// testing/asyncprobe (`npm test` builds them first).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { load, message, batch } from './harness.js';

const { init, handleBatch, host } = await load('thrower');

test('a throw is logged with its stack in one line, then fails the call', () => {
  host.reset();
  init([]);
  assert.deepEqual(handleBatch(batch('t', [message('fine')])), [{ tag: 'ack' }]);
  assert.throws(() => handleBatch(batch('t', [message('fine'), message('bad')])));
  const errors = host.logs.filter((l) => l.level === 'error');
  assert.equal(errors.length, 1);
  assert.match(errors[0].message, /^handle-batch failed \(2 messages; the batch is rolled back\): Error: bad amount \| stack: .*checkAmount/);
  assert.ok(!errors[0].message.includes('\n'));
});

// A trap poisons the instance (as in the broker), so trapping tests go last.
const probe = await load('asyncprobe');

test('async init and handle', () => {
  probe.host.reset();
  assert.equal(probe.init([]), undefined);
  assert.deepEqual(probe.handleBatch(batch('t', [message('a'), message('b')])), [{ tag: 'ack' }, { tag: 'retry', val: 5 }]);
});

test('the JS platform: console, random, clocks, timers', () => {
  probe.host.reset();
  probe.handleBatch(batch('platform', [message('a')]));
  assert.deepEqual(probe.host.logs.map((l) => l.message), ['platform: random=true crypto=4 dateSkewMs=true timerWaitedMs>=20:true']);
});

test('many-key state calls: every kind of key and value, missing keys, errors', () => {
  probe.host.reset();
  probe.handleBatch(batch('state', [message('a')]));
  const enc = (s) => [...new TextEncoder().encode(s)];
  assert.deepEqual(probe.host.logs.map((l) => l.message), [
    `state: ${JSON.stringify([enc('v1'), enc('значение'), [0xff], [], null, enc('B')])} ` +
      `${JSON.stringify(['v1', 'значение', '', null])} TypeError RangeError 0`,
  ]);
  assert.equal(probe.host.knobs.calls.stateGetPacked, 3);
  assert.equal(probe.host.knobs.calls.statePutPacked, 2);
});

test('an init throw refuses the deploy with its message', () => {
  probe.host.reset();
  // jco hands a host the err value as a thrown error's payload.
  assert.throws(() => probe.init([['fail', 'x']]), (e) => e.payload === 'init refused: x');
  assert.match(probe.host.logs[0].message, /^init failed: Error: init refused: x \| stack: /);
});

test('an async throw fails the call too', () => {
  probe.host.reset();
  assert.throws(() => probe.handleBatch(batch('boom', [message('a')])));
  assert.match(probe.host.logs[0].message, /^handle-batch failed \(1 message; the batch is rolled back\): Error: async boom/);
});
