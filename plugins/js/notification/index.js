// notification: tells account holders about the points they earned; the
// same behaviour as the Rust example plugins/examples/notification.
//
// Consumes `notify` (written by the points plugin). Payload: UTF-8
// `transfer_id|account|points_added|total_points`. The text
// `notified <account>: transfer <id> earned <n> points (total <m>)` is
// published to config `outbox_topic` with key = account when that is set,
// else written to the broker's log at info level. Idempotent by transfer id:
// `sent/<transfer_id>` = `1` once sent. Malformed payloads are dead-lettered
// with a reason starting `malformed notification: `.
//
// A batch reads all its markers with one state.getMany and writes them with
// one state.putMany at the end.

import { definePlugin, ack, retry, deadLetter, state, log, publish, HostError } from '../msmq-plugin.js';

const DIGITS = /^[0-9]+$/;
const U64_MAX = (1n << 64n) - 1n;

/** `{ transferId, account, pointsAdded, totalPoints }` or `{ error }`. */
function parse(msg) {
  let s;
  try {
    s = msg.text();
  } catch {
    return { error: 'payload is not UTF-8 text' };
  }
  const fields = s.split('|');
  if (fields.length !== 4) {
    return {
      error: `expected 4 \`|\`-separated fields transfer_id|account|points_added|total_points, got ${fields.length}`,
    };
  }
  const [transferId, account, pointsAdded, totalPoints] = fields;
  for (const [name, value] of [['transfer_id', transferId], ['account', account]]) {
    if (value.trim() === '') return { error: `field \`${name}\` is empty` };
  }
  for (const [name, value] of [['points_added', pointsAdded], ['total_points', totalPoints]]) {
    if (!DIGITS.test(value) || BigInt(value) > U64_MAX) {
      return { error: `${name} \`${value}\` is not a non-negative integer` };
    }
  }
  // Printed as parsed numbers, like the Rust plugin (no leading zeros).
  return { transferId, account, pointsAdded: BigInt(pointsAdded), totalPoints: BigInt(totalPoints) };
}

class Notification {
  init(config) {
    const topic = config.get('outbox_topic');
    this.outbox = topic ? topic : undefined;
  }

  handle(batch) {
    const msgs = batch.messages;
    const parsed = msgs.map(parse);
    const keys = [...new Set(parsed.filter((n) => !n.error).map((n) => `sent/${n.transferId}`))];
    const values = keys.length > 0 ? state.getMany(keys) : [];
    const sent = new Set(keys.filter((_k, i) => values[i] !== undefined));
    const marks = [];
    const lines = []; // logged only once the markers are written
    let published = false;

    const outcomes = msgs.map((m, i) => {
      const n = parsed[i];
      if (n.error) return deadLetter(`malformed notification: ${n.error}`);
      const key = `sent/${n.transferId}`;
      if (sent.has(key)) return ack(); // sent before, or earlier in this batch
      const line = `notified ${n.account}: transfer ${n.transferId} earned ${n.pointsAdded} points (total ${n.totalPoints})`;
      if (this.outbox !== undefined) {
        try {
          publish(this.outbox, line, { key: n.account });
        } catch (e) {
          if (!(e instanceof HostError)) throw e;
          log.warn(`message ${m.idHex}: publish to \`${this.outbox}\` refused: ${e.message}`);
          return retry(1000);
        }
        published = true;
      } else {
        lines.push(line);
      }
      sent.add(key);
      marks.push([key, '1']);
      return ack();
    });

    try {
      state.putMany(marks);
    } catch (e) {
      if (!(e instanceof HostError)) throw e;
      // Publishes cannot be taken back: fail the call so the broker rolls
      // the whole batch back and delivers it again.
      if (published) throw new Error(`state write refused after publishing: ${e.message}`);
      log.warn(`state write of ${marks.length} markers refused (${e.message}); retrying ${msgs.length} messages`);
      return msgs.map(() => retry(1000));
    }
    for (const line of lines) log.info(line);
    return outcomes;
  }
}

export const { init, handlePacked } = definePlugin(Notification);
