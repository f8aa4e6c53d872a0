// Billing against the mock host (`npm test` builds it first).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { load, message, batch, stateText } from './harness.js';

const { init, handleBatch, host } = await load('billing');
const run = (msgs) => handleBatch(batch('transfers', msgs));

test('balances, markers, malformed payloads', () => {
  host.reset();
  assert.equal(init([]), undefined);
  const out = run([
    message('t1|alice|bob|1250'),
    message('t2|bob|carol|250'),
    message('garbage'),
    message('t3|alice|alice|5'),
    message('t4||bob|5'),
    message('t5|a|b|0'),
    message('t6|a|b|99999999999999999999'),
    message('t7|a|b|9223372036854775808'),
    message(new Uint8Array([0xff, 0x7c])),
  ]);
  assert.deepEqual(out.map((o) => o.tag), ['ack', 'ack', 'dead-letter', 'ack', 'dead-letter', 'dead-letter', 'dead-letter', 'dead-letter', 'dead-letter']);
  for (const o of out.filter((o) => o.tag === 'dead-letter')) assert.match(o.val, /^malformed transfer: /);
  assert.equal(out[2].val, 'malformed transfer: expected 4 `|`-separated fields transfer_id|from|to|amount_cents, got 1');
  assert.equal(out[7].val, 'malformed transfer: amount_cents is too large');
  assert.deepEqual(stateText(host, 'bill/'), { 'bill/alice': '-1250', 'bill/bob': '1000', 'bill/carol': '250' });
  assert.equal(Object.keys(stateText(host, 'seen/')).length, 3);
  assert.equal(host.knobs.calls.stateGetPacked, 1);
  assert.equal(host.knobs.calls.statePutPacked, 1);
});

test('same account and same message id twice in a batch', () => {
  host.reset();
  const dup = message('x1|a|b|7');
  const out = run([dup, message('x2|b|a|2'), message('x3|a|c|1'), { ...dup }]);
  assert.deepEqual(out.map((o) => o.tag), ['ack', 'ack', 'ack', 'ack']);
  assert.deepEqual(stateText(host, 'bill/'), { 'bill/a': '-6', 'bill/b': '5', 'bill/c': '1' });
  // Redelivered: nothing changes.
  run([{ ...dup, attempt: 2 }]);
  assert.deepEqual(stateText(host, 'bill/'), { 'bill/a': '-6', 'bill/b': '5', 'bill/c': '1' });
});

test('exact beyond 2^53 and overflow', () => {
  host.reset();
  const big = 9223372036854775807n; // i64::MAX
  const out = run([message(`b1|x|y|${big}`), message('b2|x|y|1'), message('b3|z|y|1')]);
  assert.deepEqual(out.map((o) => o.tag), ['ack', 'dead-letter', 'dead-letter']);
  assert.equal(out[1].val, 'balance would overflow a 64-bit integer');
  assert.deepEqual(stateText(host, 'bill/'), { 'bill/x': `-${big}`, 'bill/y': `${big}` });
});

test('blank and padded fields: the short path and the long one agree', () => {
  host.reset();
  const out = run([
    message('w1|\u00a0|b|5'),
    message('w2| a |b|5'),
    message('w3|a|\tb\n|5'),
    message(' |a|b|5'),
    message('w5|a|b|000'),
    message('w6|a|b|1234567890123456'),
  ]);
  assert.deepEqual(out.map((o) => o.tag), ['dead-letter', 'ack', 'ack', 'dead-letter', 'dead-letter', 'ack']);
  assert.equal(out[0].val, 'malformed transfer: field `from` is empty');
  assert.equal(out[3].val, 'malformed transfer: field `transfer_id` is empty');
  assert.equal(out[4].val, 'malformed transfer: amount_cents `000` is not a positive integer');
  assert.deepEqual(stateText(host, 'bill/'), {
    'bill/ a ': '-5',
    'bill/a': '-1234567890123461',
    'bill/b': '1234567890123461',
    'bill/\tb\n': '5',
  });
});

test('a stored balance that does not parse dead-letters the message', () => {
  host.reset();
  host.committed.set('bill/bad', new TextEncoder().encode('12x'));
  const out = run([message('p1|bad|ok|1')]);
  assert.equal(out[0].tag, 'dead-letter');
  assert.match(out[0].val, /bill\/bad/);
});

test('a refused put-many retries every message', () => {
  host.reset();
  host.knobs.refusePuts = true;
  const out = run([message('r1|a|b|1'), message('junk')]);
  assert.deepEqual(out, [{ tag: 'retry', val: 1000 }, { tag: 'retry', val: 1000 }]);
  assert.deepEqual(stateText(host), {});
  assert.ok(host.logs.some((l) => l.level === 'warn' && l.message.includes('refused')));
});

test('an empty batch', () => {
  host.reset();
  assert.deepEqual(run([]), []);
});
