"""notification: tells account holders about the points they earned.

Same behaviour as the Rust example `plugins/examples/notification`:

* payload: UTF-8 `transfer_id|account|points_added|total_points`;
* state `sent/<transfer_id>` = `1` once a transfer's notification went out;
  a transfer already marked is acked and sends nothing;
* the text `notified <account>: transfer <id> earned <n> points (total <t>)`
  is published to config `outbox_topic` with key = account, or, without
  that key, written to the broker's log at info level;
* a malformed payload is dead-lettered, reason `malformed notification: ...`.

The batch's markers are read with one `state-get-many` and written with one
`state-put-many` at the end. Publishes cannot be taken back, so if that write
is refused after something was published, the call fails and the whole
batch rolls back.
"""

import msmq_plugin as mp


def parse(payload):
    """(transfer_id, account, points_added, total_points) or the reason it is malformed."""
    try:
        text = payload.decode()
    except UnicodeDecodeError as e:
        return f"payload is not UTF-8 text: {e}"
    fields = text.split("|")
    if len(fields) != 4:
        return ("expected 4 `|`-separated fields transfer_id|account|points_added|total_points, "
                f"got {len(fields)}")
    transfer_id, account, added, total = fields
    for name, value in (("transfer_id", transfer_id), ("account", account)):
        if not value.strip():
            return f"field `{name}` is empty"
    for name, value in (("points_added", added), ("total_points", total)):
        if not (value.isascii() and value.isdigit()) or int(value) > 0xFFFF_FFFF_FFFF_FFFF:
            return f"{name} `{value}` is not a non-negative integer"
    return transfer_id, account, int(added), int(total)


class RolledBack(Exception):
    """Published already, but the markers could not be written."""


@mp.plugin
class Notification:
    def init(self, config):
        self.outbox = config.get("outbox_topic") or None

    def handle(self, batch):
        msgs = batch.messages
        parsed = [parse(m.payload) for m in msgs]
        keys = list(dict.fromkeys("sent/" + p[0] for p in parsed if type(p) is tuple))
        sent = {k for k, v in zip(keys, mp.get_many(keys)) if v is not None}

        outcomes = []
        marks = {}      # sent key -> "1", written at the end
        logged = []     # texts to log once the markers are written
        pending = []    # indexes of messages acked only if the markers are written
        published = False
        for i, (msg, p) in enumerate(zip(msgs, parsed)):
            if type(p) is str:
                outcomes.append(mp.DeadLetter("malformed notification: " + p))
                continue
            transfer_id, account, added, total = p
            key = "sent/" + transfer_id
            if key in sent:
                outcomes.append(mp.Ack())
                continue
            text = (f"notified {account}: transfer {transfer_id} "
                    f"earned {added} points (total {total})")
            if self.outbox is not None:
                # Publish first: a refused publish leaves no marker behind.
                try:
                    mp.publish(self.outbox, text, key=account)
                except mp.HostError as e:
                    mp.warn(f"message {msg.id_hex}: publish to `{self.outbox}` refused: {e}")
                    outcomes.append(mp.Retry(1000))
                    continue
                published = True
            else:
                logged.append(text)
            sent.add(key)
            marks[key] = "1"
            pending.append(i)
            outcomes.append(mp.Ack())

        try:
            mp.put_many(marks)
        except mp.HostError as e:
            if published:
                raise RolledBack(f"state write refused after publishing: {e}") from None
            mp.warn(f"batch of {len(msgs)}: state write refused: {e}")
            for i in pending:
                outcomes[i] = mp.Retry(1000)
            return outcomes
        for text in logged:
            mp.info(text)
        return outcomes
