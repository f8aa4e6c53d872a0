// billing: a balance per account from the `transfers` topic; the same
// behaviour as the Rust example plugins/examples/billing.
//
// Payload: UTF-8 `transfer_id|from|to|amount_cents`, a positive integer
// amount. State: `bill/<account>` = balance in cents as a signed decimal
// (missing = 0; a transfer takes the amount from `from` and adds it to `to`),
// and `seen/<32 hex digits of the message id>` = `1` for each processed
// message, so a redelivered message changes nothing. A malformed payload is
// dead-lettered with a reason starting `malformed transfer: `.
//
// Speed: a JS guest pays for every host call and, in the interpreter, for
// every object it makes, so a batch costs two host calls (one state read of
// all the markers and balances it needs, one write of everything it changed,
// all or none), reads the batch field by field (one decode of all its
// payloads, ids as hex from one buffer) with no object per message,
// and keeps amounts and balances as Numbers while they are safe integers
// (below 2^53), switching to BigInt past that so they stay exact over the
// whole i64 range.

import { definePlugin, ack, retry, deadLetter, state, log, text, HostError } from '../msmq-plugin.js';

const I64_MAX = (1n << 63n) - 1n;
const I64_MIN = -(1n << 63n);
const U64_MAX = (1n << 64n) - 1n;
const DIGITS = /^[0-9]+$/;
const SIGNED = /^[+-]?[0-9]+$/;
// Decimal strings this short are safe integers as Numbers.
const SAFE_DIGITS_MAX = 15;
const ACK = ack();

// A plain transfer: three fields with something but blanks in them, and an
// amount that is a safe integer. One match instead of a split, three trims
// and a digit test; anything else goes the long way, which says what is wrong.
const PLAIN = /^[^|]*[^|\s][^|]*\|([^|]*[^|\s][^|]*)\|([^|]*[^|\s][^|]*)\|([0-9]{1,15})$/;

/**
 * `{ from, to, amount }` (keys and a Number or BigInt), or `{ error }`, for a
 * payload's text (undefined when it is not UTF-8).
 */
function parse(s) {
  if (s === undefined) return { error: 'payload is not UTF-8 text' };
  const plain = PLAIN.exec(s);
  if (plain !== null) {
    const n = +plain[3];
    if (n !== 0) return { from: 'bill/' + plain[1], to: 'bill/' + plain[2], amount: n };
  }
  const fields = s.split('|');
  if (fields.length !== 4) {
    return {
      error: `expected 4 \`|\`-separated fields transfer_id|from|to|amount_cents, got ${fields.length}`,
    };
  }
  const amount = fields[3];
  if (fields[0].trim() === '') return { error: 'field `transfer_id` is empty' };
  if (fields[1].trim() === '') return { error: 'field `from` is empty' };
  if (fields[2].trim() === '') return { error: 'field `to` is empty' };
  if (!DIGITS.test(amount)) return { error: `amount_cents \`${amount}\` is not a positive integer` };
  let n;
  if (amount.length <= SAFE_DIGITS_MAX) {
    n = +amount;
    if (n === 0) return { error: `amount_cents \`${amount}\` is not a positive integer` };
  } else {
    n = BigInt(amount);
    if (n === 0n || n > U64_MAX) return { error: `amount_cents \`${amount}\` is not a positive integer` };
    if (n > I64_MAX) return { error: 'amount_cents is too large' };
  }
  return { from: 'bill/' + fields[1], to: 'bill/' + fields[2], amount: n };
}

/** A stored balance (Number when safe, else BigInt), or a string saying why it is not one. */
function balanceOf(key, stored) {
  if (stored === undefined) return 0;
  if (typeof stored === 'number' || typeof stored === 'bigint') return stored; // computed here
  if (typeof stored !== 'string') {
    try {
      stored = text(stored);
    } catch {
      return `state key \`${key}\` does not hold UTF-8 text`;
    }
  }
  if (SIGNED.test(stored)) {
    const digits = stored.length - (stored[0] === '-' || stored[0] === '+' ? 1 : 0);
    if (digits <= SAFE_DIGITS_MAX) return +stored;
    const v = BigInt(stored);
    if (v <= I64_MAX && v >= I64_MIN) return v;
  }
  return `state key \`${key}\` holds \`${stored}\`, which does not parse as a 64-bit integer`;
}

/** `a + b` exactly, as a Number while safe; undefined past the i64 range. */
function add(a, b) {
  if (typeof a === 'number' && typeof b === 'number') {
    const sum = a + b;
    if (Number.isSafeInteger(sum)) return sum;
  }
  const sum = BigInt(a) + BigInt(b);
  return sum > I64_MAX || sum < I64_MIN ? undefined : sum;
}

// Values as strings when they are all UTF-8 (one decode for the batch),
// else as bytes, which balanceOf decodes one by one.
function readAll(keys) {
  try {
    return state.getManyText(keys);
  } catch (e) {
    if (!(e instanceof TypeError)) throw e;
    return state.getMany(keys);
  }
}

class Billing {
  handle(batch) {
    const count = batch.length;
    const ids = batch.idHexes();
    const texts = batch.texts();
    const seen = new Array(count);
    const parsed = new Array(count);
    // Every key the batch may read, once each.
    const wanted = new Set();
    for (let i = 0; i < count; i++) {
      const key = 'seen/' + ids[i];
      seen[i] = key;
      wanted.add(key);
      const t = parse(texts[i]);
      parsed[i] = t;
      if (t.error === undefined && t.from !== t.to) {
        wanted.add(t.from);
        wanted.add(t.to);
      }
    }
    const keys = [...wanted];
    const values = readAll(keys);
    // key -> stored value, a balance computed here, or '1' (a marker
    // written here); undefined when missing.
    const view = new Map();
    for (let i = 0; i < keys.length; i++) view.set(keys[i], values[i]);
    // Balances changed, and the markers of the messages applied, in order.
    const dirty = new Set();
    const marked = [];

    const outcomes = new Array(count);
    for (let i = 0; i < count; i++) {
      outcomes[i] = this.apply(seen[i], parsed[i], view, dirty, marked);
    }

    if (marked.length === 0) return outcomes;
    const writeKeys = [...dirty];
    const writeValues = new Array(writeKeys.length);
    for (let i = 0; i < writeKeys.length; i++) writeValues[i] = String(view.get(writeKeys[i]));
    writeKeys.push(...marked);
    for (let i = 0; i < marked.length; i++) writeValues.push('1');
    try {
      state.putMany(writeKeys, writeValues);
    } catch (e) {
      if (!(e instanceof HostError)) throw e;
      // Nothing of the batch was written, and later outcomes were computed on
      // top of earlier ones: try all of it again.
      log.warn(`state write of ${writeKeys.length} keys refused (${e.message}); retrying ${count} messages`);
      return new Array(count).fill(retry(1000));
    }
    return outcomes;
  }

  apply(seen, t, view, dirty, marked) {
    if (view.get(seen) !== undefined) return ACK; // processed before, or earlier in this batch
    if (t.error !== undefined) return deadLetter(`malformed transfer: ${t.error}`);
    // A transfer to the same account leaves its balance unchanged.
    if (t.from !== t.to) {
      const from = balanceOf(t.from, view.get(t.from));
      if (typeof from === 'string') return deadLetter(from);
      const to = balanceOf(t.to, view.get(t.to));
      if (typeof to === 'string') return deadLetter(to);
      const newFrom = add(from, -t.amount);
      const newTo = add(to, t.amount);
      if (newFrom === undefined || newTo === undefined) {
        return deadLetter('balance would overflow a 64-bit integer');
      }
      view.set(t.from, newFrom);
      view.set(t.to, newTo);
      dirty.add(t.from);
      dirty.add(t.to);
    }
    view.set(seen, '1');
    marked.push(seen);
    return ACK;
  }
}

export const { init, handlePacked } = definePlugin(Billing);
