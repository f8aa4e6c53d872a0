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

Written for speed, since an interpreter pays for every line per message: it
reads the batch field by field (`batch.payloads`, `batch.packed.ids`) rather
than a wrapper per message, keeps keys and values as bytes (nothing to
encode at the host call), makes the marker keys from one hex string of all
the ids, takes a
well-formed ASCII payload through a short path of C-implemented methods and
leaves every other payload to `parse`, which says what is wrong with it.
"""

from itertools import chain, repeat

import msmq_plugin as mp

I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1
# Amounts of at most 18 digits fit in an i64 without a range check.
FAST_AMOUNT_DIGITS_MAX = 18
MARKER = b"1"


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
    return transfer_id, src.encode(), dst.encode(), int(amount)


def parse_balance(key, raw):
    """The stored balance, or a reason (str) when it does not parse."""
    digits = raw[1:] if raw[:1] in (b"-", b"+") else raw
    if digits.isdigit():  # bytes.isdigit: ASCII digits only
        n = int(raw)
        if I64_MIN <= n <= I64_MAX:
            return n
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        return f"state key `{key.decode()}` does not hold UTF-8 text: {e}"
    return f"state key `{key.decode()}` holds `{text}`, which does not parse as a 64-bit integer"


def transfers(payloads, wanted):
    """Per message (from key, to key, amount) or the reason it is malformed;
    adds the balance keys to `wanted`."""
    out = []
    add = out.append
    for p in payloads:
        f = p.split(b"|")
        if len(f) == 4 and p.isascii():
            a = f[3]
            if (a.isdigit() and len(a) <= FAST_AMOUNT_DIGITS_MAX
                    and f[0].strip() and f[1].strip() and f[2].strip()):
                n = int(a)
                if n:
                    fk = b"bill/" + f[1]
                    tk = b"bill/" + f[2]
                    wanted[fk] = wanted[tk] = None
                    add((fk, tk, n))
                    continue
        t = parse(p)
        if type(t) is tuple:
            fk = b"bill/" + t[1]
            tk = b"bill/" + t[2]
            wanted[fk] = wanted[tk] = None
            t = (fk, tk, t[3])
        add(t)
    return out


# d.get(v, v) with this d: b"0" for None, anything else as it is.
MISSING_AS_ZERO = {None: b"0"}


def marker_keys(ids):
    """`seen/<32 hex digits of the id>` per message, from the batch's ids
    (16 bytes each): one hex string for all, then slices."""
    h = ids.hex().encode()
    n = len(h)
    return list(map(b"seen/".__add__,
                    map(h.__getitem__, map(slice, range(0, n, 32), range(32, n + 32, 32)))))


def plain_transfers(payloads):
    """(from keys, to keys, amounts) when every payload is a plain transfer
    (ASCII, no whitespace, four fields, none empty, an amount of digits that
    is not zero), else None. Each step runs over the whole
    batch in C: in an interpreter a pass over a list costs less than one
    Python-level step per message."""
    n = len(payloads)
    if list(map(bytes.count, payloads, repeat(b"|", n))).count(3) != n:
        return None
    joined = b"|".join(payloads)
    # Empty fields show as `||` or a `|` at either end, even across payloads.
    if (not joined.isascii() or b"||" in joined or joined[:1] == b"|" or joined[-1:] == b"|"
            or joined.split() != [joined]):  # any whitespace
        return None
    fields = joined.split(b"|")
    amounts = fields[3::4]
    if not b"".join(amounts).isdigit():
        return None
    amounts = list(map(int, amounts))
    # (Amounts past the i64 range fail plain_batch's overflow bound.)
    if min(amounts) == 0:
        return None
    return (list(map(b"bill/".__add__, fields[1::4])),
            list(map(b"bill/".__add__, fields[2::4])), amounts)


def plain_balances(stored):
    """The balances (ints) when every stored one is a plain decimal i64 or
    missing (0), else None."""
    stored = list(map(MISSING_AS_ZERO.get, stored, stored))
    joined = b"".join(stored)
    # int() also takes " 5" and "5_0"; what is left it takes, Rust's i64 does.
    if b"_" in joined or joined.split() != [joined]:
        return None
    try:
        return list(map(int, stored))
    except ValueError:
        return None


@mp.plugin
class Billing:
    def init(self, config):
        pass

    def handle(self, batch):
        if not len(batch):
            return []
        seen_keys = marker_keys(batch.packed.ids)
        payloads = batch.payloads
        plain = plain_transfers(payloads)
        if plain is not None:
            outcomes = self.plain_batch(seen_keys, *plain)
            if outcomes is not None:
                return outcomes
        return self.any_batch(payloads, seen_keys)

    def plain_batch(self, seen_keys, from_keys, to_keys, amounts):
        """The whole batch at once when nothing in it needs a message-by-
        message decision: every payload a plain transfer between two
        accounts, no message seen before or twice, every balance plain, and
        no sum that could pass the i64 range. None otherwise, having written
        nothing."""
        n = len(seen_keys)
        if any(map(bytes.__eq__, from_keys, to_keys)) or len(set(seen_keys)) != n:
            return None
        accounts = list(dict.fromkeys(chain(from_keys, to_keys)))
        values = mp.get_many(seen_keys + accounts)
        if values[:n].count(None) != n:
            return None
        balances = plain_balances(values[n:])
        if balances is None:
            return None
        # Bounds every balance along the way, so none can overflow.
        if max(map(abs, balances)) + sum(amounts) > I64_MAX:
            return None
        balance = dict(zip(accounts, balances))
        for fk, tk, amount in zip(from_keys, to_keys, amounts):
            balance[fk] -= amount
            balance[tk] += amount
        try:
            mp.put_many(accounts + seen_keys,
                        list(map(b"%d".__mod__, balance.values())) + [MARKER] * n)
        except mp.HostError as e:
            mp.warn(f"batch of {n}: state write refused, retrying it: {e}")
            return [mp.Retry(1000)] * n
        return [mp.ACK] * n

    def any_batch(self, payloads, seen_keys):
        """Message by message, for batches with anything unusual in them."""
        # Every key the batch may read, once each, in one host call.
        wanted = dict.fromkeys(seen_keys)
        parsed = transfers(payloads, wanted)
        names = list(wanted)
        # key -> stored bytes, a balance (int) computed here, or None
        view = dict(zip(names, mp.get_many(names)))

        writes = {}
        outcomes = []
        add = outcomes.append
        for seen, p in zip(seen_keys, parsed):
            if view[seen] is not None:  # processed before, or earlier in this batch
                add(mp.ACK)
                continue
            if type(p) is str:
                add(mp.DeadLetter("malformed transfer: " + p))
                continue
            fk, tk, amount = p
            if amount > I64_MAX:
                add(mp.DeadLetter("malformed transfer: amount_cents is too large"))
                continue
            # A transfer to the same account leaves its balance unchanged.
            # The two balance reads are written out, not a helper: a Python
            # call per balance costs more than the lines.
            if fk != tk:
                fb = view[fk]
                if type(fb) is not int:
                    fb = 0 if fb is None else parse_balance(fk, fb)
                    if type(fb) is str:
                        add(mp.DeadLetter(fb))
                        continue
                tb = view[tk]
                if type(tb) is not int:
                    tb = 0 if tb is None else parse_balance(tk, tb)
                    if type(tb) is str:
                        add(mp.DeadLetter(tb))
                        continue
                nf = fb - amount
                nt = tb + amount
                if nf < I64_MIN or nt > I64_MAX:
                    add(mp.DeadLetter("balance would overflow a 64-bit integer"))
                    continue
                view[fk] = writes[fk] = nf
                view[tk] = writes[tk] = nt
            # Marked at once: the same message id later in the batch is a duplicate.
            view[seen] = writes[seen] = MARKER
            add(mp.ACK)

        for k, v in writes.items():
            if type(v) is int:
                writes[k] = b"%d" % v
        try:
            mp.put_many(writes)
        except mp.HostError as e:
            mp.warn(f"batch of {len(payloads)}: state write refused, retrying it: {e}")
            return [mp.Retry(1000)] * len(payloads)
        return outcomes
