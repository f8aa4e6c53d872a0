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
// Speed: a JS guest pays for every host call, so a batch costs two of them:
// one state.getMany for all the markers and balances it needs, then one
// state.putMany with everything it changed, all or none. Balances are BigInts
// so they stay exact over the whole i64 range.

import { definePlugin, ack, retry, deadLetter, state, log, text, HostError } from '../msmq-plugin.js';

const I64_MAX = (1n << 63n) - 1n;
const I64_MIN = -(1n << 63n);
const U64_MAX = (1n << 64n) - 1n;
const DIGITS = /^[0-9]+$/;
const SIGNED = /^[+-]?[0-9]+$/;

/** `{ transferId, from, to, amount }` or `{ error }`. */
function parse(msg) {
  let textPayload;
  try {
    textPayload = msg.text();
  } catch {
    return { error: 'payload is not UTF-8 text' };
  }
  const fields = textPayload.split('|');
  if (fields.length !== 4) {
    return {
      error: `expected 4 \`|\`-separated fields transfer_id|from|to|amount_cents, got ${fields.length}`,
    };
  }
  const [transferId, from, to, amount] = fields;
  for (const [name, value] of [['transfer_id', transferId], ['from', from], ['to', to]]) {
    if (value.trim() === '') return { error: `field \`${name}\` is empty` };
  }
  const n = DIGITS.test(amount) ? BigInt(amount) : 0n;
  if (n <= 0n || n > U64_MAX) {
    return { error: `amount_cents \`${amount}\` is not a positive integer` };
  }
  if (n > I64_MAX) return { error: 'amount_cents is too large' };
  return { transferId, from, to, amount: n };
}

/** A stored balance as a BigInt, or a string saying why it is not one. */
function balanceOf(key, raw) {
  if (raw === undefined) return 0n;
  if (typeof raw === 'bigint') return raw;
  let s;
  try {
    s = text(raw);
  } catch {
    return `state key \`${key}\` does not hold UTF-8 text`;
  }
  const v = SIGNED.test(s) ? BigInt(s) : undefined;
  if (v === undefined || v > I64_MAX || v < I64_MIN) {
    return `state key \`${key}\` holds \`${s}\`, which does not parse as a 64-bit integer`;
  }
  return v;
}

class Billing {
  handle(batch) {
    const msgs = batch.messages;
    const parsed = msgs.map(parse);

    // Every key the batch may read, once each.
    const wanted = new Set();
    msgs.forEach((m, i) => {
      wanted.add(`seen/${m.idHex}`);
      const t = parsed[i];
      if (!t.error && t.from !== t.to) {
        wanted.add(`bill/${t.from}`);
        wanted.add(`bill/${t.to}`);
      }
    });
    const keys = [...wanted];
    const values = state.getMany(keys);
    // key -> Uint8Array (as stored), BigInt (a balance computed here), or
    // '1' (a marker written here); undefined when missing.
    const view = new Map();
    keys.forEach((k, i) => view.set(k, values[i]));
    const dirty = new Set();

    const outcomes = msgs.map((m, i) => {
      const seen = `seen/${m.idHex}`;
      if (view.get(seen) !== undefined) return ack(); // processed before, or earlier in this batch
      const t = parsed[i];
      if (t.error) return deadLetter(`malformed transfer: ${t.error}`);
      // A transfer to the same account leaves its balance unchanged.
      if (t.from !== t.to) {
        const fromKey = `bill/${t.from}`;
        const toKey = `bill/${t.to}`;
        const from = balanceOf(fromKey, view.get(fromKey));
        if (typeof from === 'string') return deadLetter(from);
        const to = balanceOf(toKey, view.get(toKey));
        if (typeof to === 'string') return deadLetter(to);
        const newFrom = from - t.amount;
        const newTo = to + t.amount;
        if (newFrom < I64_MIN || newTo > I64_MAX) {
          return deadLetter('balance would overflow a 64-bit integer');
        }
        view.set(fromKey, newFrom);
        view.set(toKey, newTo);
        dirty.add(fromKey);
        dirty.add(toKey);
      }
      view.set(seen, '1');
      dirty.add(seen);
      return ack();
    });

    if (dirty.size === 0) return outcomes;
    const writes = [...dirty].map((k) => {
      const v = view.get(k);
      return [k, typeof v === 'bigint' ? v.toString() : v];
    });
    try {
      state.putMany(writes);
    } catch (e) {
      if (!(e instanceof HostError)) throw e;
      // Nothing of the batch was written, and later outcomes were computed on
      // top of earlier ones: try all of it again.
      log.warn(`state write of ${writes.length} keys refused (${e.message}); retrying ${msgs.length} messages`);
      return msgs.map(() => retry(1000));
    }
    return outcomes;
  }
}

export const { init, handleBatch } = definePlugin(Billing);
