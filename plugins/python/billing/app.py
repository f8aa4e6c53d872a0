"""billing: keeps a balance per account from the `transfers` topic.

Same behaviour as the Rust example `plugins/examples/billing`:

* payload: UTF-8 `transfer_id|from|to|amount_cents`, amount a positive integer;
* state `bill/<account>`: balance in cents, a signed decimal (missing = 0);
  a transfer subtracts the amount from `from` and adds it to `to`;
* state `seen/<32 hex digits of the message id>`: the message was applied;
  a message already applied is acked and changes nothing;
* a malformed payload is dead-lettered, reason `malformed transfer: ...`.

One `state-get-many` per batch reads every marker and balance it needs; the
batch is applied in memory in message order and written with one
`state-put-many`. If that write is refused nothing was written, so every
message of the batch is retried a second later.
"""

import msmq_plugin as mp

I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1


def parse(payload):
    """(transfer_id, from, to, amount) or the reason it is malformed."""
    try:
        text = payload.decode()
    except UnicodeDecodeError as e:
        return f"payload is not UTF-8 text: {e}"
    fields = text.split("|")
    if len(fields) != 4:
        return ("expected 4 `|`-separated fields transfer_id|from|to|amount_cents, "
                f"got {len(fields)}")
    transfer_id, src, dst, amount = fields
    for name, value in (("transfer_id", transfer_id), ("from", src), ("to", dst)):
        if not value.strip():
            return f"field `{name}` is empty"
    # ASCII digits only: int() would also take "+5", " 5", "5_0" or "٥".
    if not (amount.isascii() and amount.isdigit()) or int(amount) == 0 \
            or int(amount) > 0xFFFF_FFFF_FFFF_FFFF:
        return f"amount_cents `{amount}` is not a positive integer"
    return transfer_id, src, dst, int(amount)


def parse_balance(key, raw):
    """The stored balance, or a reason (str) when it does not parse."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        return f"state key `{key}` does not hold UTF-8 text: {e}"
    s = text[1:] if text[:1] in ("-", "+") else text
    if s.isascii() and s.isdigit():
        n = int(text)
        if I64_MIN <= n <= I64_MAX:
            return n
    return f"state key `{key}` holds `{text}`, which does not parse as a 64-bit integer"


@mp.plugin
class Billing:
    def init(self, config):
        pass

    def handle(self, batch):
        msgs = batch.messages
        parsed = [parse(m.payload) for m in msgs]
        seen_keys = ["seen/" + m.id_hex for m in msgs]

        # Every key the batch may read, once each, in one host call.
        keys = dict.fromkeys(seen_keys)
        for p in parsed:
            if type(p) is tuple:
                keys["bill/" + p[1]] = None
                keys["bill/" + p[2]] = None
        names = list(keys)
        values = dict(zip(names, mp.get_many(names)))

        balances = {}  # bill key -> int, or reason str if the stored value is bad
        writes = {}
        outcomes = []
        for seen, p in zip(seen_keys, parsed):
            if values[seen] is not None:
                outcomes.append(mp.Ack())
                continue
            if type(p) is str:
                outcomes.append(mp.DeadLetter("malformed transfer: " + p))
                continue
            _, src, dst, amount = p
            if amount > I64_MAX:
                outcomes.append(mp.DeadLetter("malformed transfer: amount_cents is too large"))
                continue
            # A transfer to the same account leaves its balance unchanged.
            if src != dst:
                fk, tk = "bill/" + src, "bill/" + dst
                fb, tb = self.balance(fk, values, balances), self.balance(tk, values, balances)
                if type(fb) is str or type(tb) is str:
                    outcomes.append(mp.DeadLetter(fb if type(fb) is str else tb))
                    continue
                nf, nt = fb - amount, tb + amount
                if nf < I64_MIN or nt > I64_MAX:
                    outcomes.append(mp.DeadLetter("balance would overflow a 64-bit integer"))
                    continue
                balances[fk] = nf
                balances[tk] = nt
                writes[fk] = str(nf)
                writes[tk] = str(nt)
            # Marked at once: the same message id later in the batch is a duplicate.
            values[seen] = b"1"
            writes[seen] = "1"
            outcomes.append(mp.Ack())

        try:
            mp.put_many(writes)
        except mp.HostError as e:
            mp.warn(f"batch of {len(msgs)}: state write refused, retrying it: {e}")
            return [mp.Retry(1000)] * len(msgs)
        return outcomes

    @staticmethod
    def balance(key, values, balances):
        b = balances.get(key)
        if b is None:
            raw = values[key]
            b = 0 if raw is None else parse_balance(key, raw)
            balances[key] = b
        return b
