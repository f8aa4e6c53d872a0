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
  assert.match(errors[0].message, /^handle failed \(2 messages; the batch is rolled back\): Error: bad amount \| stack: .*checkAmount/);
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

test('every field of a packed batch reads back through the views', () => {
  probe.host.reset();
  const msgs = [
    message('plain', { id: 0x10n, key: 'k1', tag: 't1', headers: [{ name: 'h', value: 'v' }, { name: 'h', value: 'w' }] }),
    message(new Uint8Array([0xff, 0x41]), { id: 0xfedcba9876543210n, attempt: 3 }),
    message('ünïcode', { id: 0x12n, key: '', tag: '' }),
  ];
  msgs[1].id.hi = 0xffffffffffffffffn;
  msgs[1].partition = 7;
  msgs[1].offset = 1n << 60n;
  msgs[1].timestampMs = 1_700_000_000_123n;
  probe.handleBatch(batch('fields', msgs));
  const got = JSON.parse(probe.host.logs[0].message.slice('fields: '.length));
  const hex = (hi, lo) => hi.toString(16).padStart(16, '0') + lo.toString(16).padStart(16, '0');
  assert.equal(got.length, 3);
  assert.deepEqual(got.ids, [hex(0x0123456789abcdefn, 0x10n), hex((1n << 64n) - 1n, 0xfedcba9876543210n), hex(0x0123456789abcdefn, 0x12n)]);
  assert.deepEqual(got.texts, ['plain', null, 'ünïcode']);
  assert.deepEqual(got.each.map((m) => m.idHex), got.ids);
  assert.deepEqual(got.each[0], {
    topic: 'fields', id: '123456789abcdef:10', idHex: got.ids[0], partition: 0, offset: '16',
    timestampMs: '0', attempt: 1, redelivery: false, payload: [...new TextEncoder().encode('plain')],
    text: 'plain', key: 'k1', tag: 't1', headers: [{ name: 'h', value: 'v' }, { name: 'h', value: 'w' }], header: 'v',
  });
  assert.deepEqual(got.each[1], {
    topic: 'fields', id: 'ffffffffffffffff:fedcba9876543210', idHex: got.ids[1], partition: 7,
    offset: String(1n << 60n), timestampMs: '1700000000123', attempt: 3, redelivery: true,
    payload: [0xff, 0x41], text: '\ufffdA', key: null, tag: null, headers: [], header: null,
  });
  assert.equal(got.each[2].key, '');
  assert.equal(got.each[2].tag, '');
  assert.equal(got.each[2].text, 'ünïcode');
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
  assert.match(probe.host.logs[0].message, /^handle failed \(1 message; the batch is rolled back\): Error: async boom/);
});
