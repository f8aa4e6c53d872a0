"""Native tests of the SDK and the example plugins against a fake host.

Run: ./build.sh --bindings && python3 -m unittest discover -s tests
"""

import sys
import unittest

from fakehost import FakeHost, batch, load_app, message
from componentize_py_types import Err
import msmq_plugin as mp

billing = load_app("billing")
notification = load_app("notification")


def world(mod, config=()):
    w = mod.WitWorld()
    w.init(list(config))
    return w


def kinds(outcomes):
    out = []
    for o in outcomes:
        if isinstance(o, mp.Ack):
            out.append("ack")
        elif isinstance(o, mp.Retry):
            out.append(f"retry({o.value})")
        else:
            out.append("dl")
    return out


class SdkTest(unittest.TestCase):
    def test_message_helpers(self):
        b = mp.Batch(batch([
            message("x", id=(0xAB, 0x1), key=b"k", headers=[("a", "1"), ("a", "2")]),
            message(b"\xff", id=(0xAB, 0x2), key=b"", tag="t2", headers=[("b", "3")]),
            message("", id=(0xCD, 0x3), tag=""),
        ], topic="t"))
        self.assertEqual(len(b), 3)
        m = b[0]
        self.assertEqual(m.topic, "t")
        self.assertEqual(m.id, (0xAB, 0x1))
        self.assertIsNone(m.tag)
        self.assertEqual(m.id_hex, "00000000000000ab0000000000000001")
        self.assertEqual(len(m.id_hex), 32)
        self.assertEqual(m.id_bytes.hex(), m.id_hex)
        self.assertEqual(m.key_str, "k")
        self.assertEqual(m.header("a"), "2")
        self.assertEqual(m.headers, [("a", "1"), ("a", "2")])
        self.assertEqual(m.text, "x")
        self.assertEqual(b.payloads, [b"x", b"\xff", b""])
        self.assertEqual(b.keys, [b"k", b"", None])
        self.assertEqual(b.tags, [None, "t2", ""])
        self.assertEqual(b[1].headers, [("b", "3")])
        self.assertEqual(b[2].headers, [])
        self.assertEqual(b.id_hexes(), [x.id_hex for x in b])
        self.assertEqual(b.id_hexes()[2], "00000000000000cd0000000000000003")
        with self.assertRaises(UnicodeDecodeError):
            b[1].text

    def test_numbers_of_a_packed_batch_read_back_exactly(self):
        ms = [message("a"), message("b", attempt=3)]
        ms[0].partition, ms[0].offset, ms[0].timestamp_ms = 7, (1 << 64) - 1, 1_700_000_000_123
        ms[1].partition, ms[1].offset = 0xFFFF_FFFF, 0
        b = mp.Batch(batch(ms))
        self.assertEqual(b.partitions, [7, 0xFFFF_FFFF])
        self.assertEqual(b.offsets, [(1 << 64) - 1, 0])
        self.assertEqual(b.timestamps_ms, [1_700_000_000_123, 0])
        self.assertEqual(b.attempts, [1, 3])
        self.assertEqual((b[1].attempt, b[1].is_redelivery, b[0].is_redelivery), (3, True, False))

    def test_outcomes_are_packed_as_the_broker_reads_them(self):
        from fakehost import unpack_outcomes
        mixed = [mp.ACK, mp.Retry(5), mp.DeadLetter("bad"), mp.Ack(), mp.Retry(0)]
        packed = mp._packed_outcomes(mixed, 5)
        self.assertEqual(packed.kinds, bytes([0, 1, 2, 0, 1]))
        self.assertEqual((packed.retry_ms, packed.reasons), ([5, 0], ["bad"]))
        self.assertEqual(unpack_outcomes(packed), mixed)
        self.assertEqual(mp._packed_outcomes([mp.Ack()] * 3, 3).kinds, bytes(3))
        for wrong, error in (([mp.ACK], ValueError), ((mp.ACK, mp.ACK), TypeError),
                             ([mp.ACK, "ack"], TypeError), ([mp.ACK, mp.Retry(-1)], ValueError),
                             ([mp.ACK, mp.Retry(1 << 32)], ValueError),
                             ([mp.ACK, mp.DeadLetter(b"x")], TypeError)):
            with self.assertRaises(error, msg=repr(wrong)):
                mp._packed_outcomes(wrong, 2)

    def test_state_helpers_and_paging(self):
        h = FakeHost()
        h.committed = {f"p/{i:03}".encode(): b"v" for i in range(25)}
        self.assertEqual(len(list(mp.scan_all("p/", page=10))), 25)
        self.assertEqual(h.calls.count("state_scan"), 3)
        self.assertEqual(mp.get_many(["p/000", b"nope"]), [b"v", None])
        mp.put_many([("empty", b""), ("p/000", "w")])
        self.assertEqual(mp.get_many(["empty", "nope", "p/000", "p/001"]), [b"", None, b"w", b"v"])
        self.assertTrue(mp.contains("p/001"))
        mp.put_many({"a": "1", b"b": b"2"})
        self.assertEqual(mp.get_str("a"), "1")
        mp.delete("a")
        self.assertIsNone(mp.get("a"))
        h.refuse_puts = True
        with self.assertRaises(mp.HostError) as e:
            mp.put("x", "y")
        self.assertEqual(e.exception.kind, "too-large")

    def test_exception_is_logged_with_traceback_then_reraised(self):
        mod = type(unittest)("raiser")
        import sys
        sys.modules["raiser"] = mod

        def check(amount):
            raise ValueError("bad amount")

        class Raiser:
            def init(self, config):
                pass

            def handle(self, b):
                return [check(m) for m in b]
        Raiser.__module__ = "raiser"
        mp.plugin(Raiser)
        h = FakeHost()
        w = world(mod)
        with self.assertRaises(ValueError):
            h.run(w, batch([message("x")]))
        [(level, line)] = h.logs
        self.assertEqual(level, "error")
        self.assertIn("ValueError: bad amount\nTraceback (most recent call last):", line)
        self.assertRegex(line, r'line \d+, in check\nValueError: bad amount$')

    def test_long_traceback_keeps_the_last_frame(self):
        def deep(n):
            if n == 0:
                raise KeyError("deepest")
            deep(n - 1)
        try:
            deep(300)
        except KeyError as e:
            text = mp.format_exception(e)
        self.assertLessEqual(len(text.encode()), 4000)
        self.assertTrue(text.startswith("KeyError: 'deepest'\n  ... "))
        self.assertRegex(text, r"in deep\nKeyError: 'deepest'$")

    def test_init_error_refuses(self):
        class Needs:
            def init(self, config):
                config.require("topic")

            def handle(self, b):
                return []
        mod = type(unittest)("needs")
        import sys
        sys.modules["needs"] = mod
        Needs.__module__ = "needs"
        mp.plugin(Needs)
        h = FakeHost()
        with self.assertRaises(Err) as e:
            mod.WitWorld().init([])
        self.assertIn("missing required config key `topic`", e.exception.value)
        self.assertEqual(h.logs, [])

    def test_wrong_outcome_count_fails_the_call(self):
        class Short:
            def init(self, config):
                pass

            def handle(self, b):
                return []
        mod = type(unittest)("short")
        import sys
        sys.modules["short"] = mod
        Short.__module__ = "short"
        mp.plugin(Short)
        h = FakeHost()
        with self.assertRaises(ValueError):
            h.run(world(mod), batch([message("x")]))
        self.assertIn("handle returned 0 outcomes for 1 messages", h.logs[0][1])


class BillingTest(unittest.TestCase):
    def setUp(self):
        self.h = FakeHost()
        self.w = world(billing)

    def test_balances_duplicates_and_one_read_one_write(self):
        dup = message("t2|bob|carol|50")
        msgs = [message("t1|alice|bob|100"), dup, message("t3|alice|alice|7"),
                message("t4|carol|alice|20"), dup]
        out = self.h.run(self.w, batch(msgs))
        self.assertEqual(kinds(out), ["ack"] * 5)
        self.assertEqual(self.h.state(b"bill/"),
                         {"bill/alice": "-80", "bill/bob": "50", "bill/carol": "30"})
        self.assertEqual(len(self.h.state(b"seen/")), 4)
        self.assertEqual(self.h.calls, ["state_get_packed", "state_put_packed"])
        # Redelivery changes nothing.
        out = self.h.run(self.w, batch(msgs))
        self.assertEqual(kinds(out), ["ack"] * 5)
        self.assertEqual(self.h.state(b"bill/")["bill/alice"], "-80")

    def test_malformed(self):
        cases = {
            "a|b|c": "expected 4 `|`-separated fields transfer_id|from|to|amount_cents, got 3",
            "t|a|b|0": "amount_cents `0` is not a positive integer",
            "t|a|b|+5": "amount_cents `+5` is not a positive integer",
            "t| |b|5": "field `from` is empty",
            "t|a|b|18446744073709551616": "amount_cents `18446744073709551616` is not a positive integer",
            "t|a|b|9223372036854775808": "amount_cents is too large",
        }
        msgs = [message(p) for p in cases] + [message(b"\xff|a|b|1")]
        out = self.h.run(self.w, batch(msgs))
        for o, reason in zip(out, list(cases.values())):
            self.assertEqual(o.value, "malformed transfer: " + reason)
        self.assertTrue(out[-1].value.startswith("malformed transfer: payload is not UTF-8 text: "))
        self.assertEqual(self.h.committed, {})

    def test_bad_stored_balance_and_overflow(self):
        self.h.committed = {b"bill/x": b"abc", b"bill/big": str((1 << 63) - 1).encode()}
        out = self.h.run(self.w, batch([message("t|x|y|1"), message("t|z|big|1"),
                                        message("t|y|z|1")]))
        self.assertEqual(out[0].value,
                         "state key `bill/x` holds `abc`, which does not parse as a 64-bit integer")
        self.assertEqual(out[1].value, "balance would overflow a 64-bit integer")
        self.assertEqual(kinds(out)[2], "ack")
        self.assertEqual(self.h.state(b"bill/"), {"bill/x": "abc", "bill/big": str((1 << 63) - 1),
                                                  "bill/y": "-1", "bill/z": "1"})

    def test_refused_write_retries_everything(self):
        self.h.refuse_puts = True
        out = self.h.run(self.w, batch([message("t|a|b|1"), message("bad")]))
        self.assertEqual(kinds(out), ["retry(1000)"] * 2)
        self.assertEqual(self.h.committed, {})
        self.assertEqual(self.h.logs[0][0], "warn")


class BillingPathsTest(unittest.TestCase):
    """The whole-batch path must end exactly where the message-by-message
    one does: same outcomes, same state, batch after batch."""

    def random_batch(self, rng, ids):
        msgs = []
        # Half the batches hold only well-formed transfers, the whole-batch
        # path's case, but still with self-transfers, whitespace, and
        # messages seen before or twice.
        plain_only = rng.random() < 0.5
        for _ in range(rng.randint(1, 12)):
            kind = rng.random() * (0.75 if plain_only else 1)
            src, dst = rng.choice("abcd"), rng.choice("abcd")
            # Amounts near the i64 range now and then, so most batches stay
            # clear of it (and on the whole-batch path) and some do not.
            amount = rng.choices([1, 7, 250, 10**17, 9 * 10**18], weights=[30, 30, 30, 8, 2])[0]
            if kind < 0.6:
                payload = f"t|{src}|{dst if dst != src else 'e'}|{amount}"
            elif kind < 0.7:
                own = f"own{rng.randint(0, 10**6)}"  # often an account never written
                payload = f"t|{own}|{own}|{amount}"
            elif kind < 0.75:
                payload = rng.choice(["t| |b|5", " t|a|b|5", "t|a|b|5 ", "t|a |b|5", "t|\ta|b|5",
                                      "t|a|b|0", "t|a|b|00", "t|a|b|9223372036854775808"])
            elif kind < 0.8:
                payload = rng.choice(["a|b|c", "t| |b|5", "t|a|b|0", "t|a|b|+5", "t|ä|b|5",
                                      "t|a|b|99999999999999999999", "t|a|b| 5"])
            else:
                payload = f"t|{src}|{dst}|{amount}"
            if rng.random() < 0.1 and ids:
                msgs.append(message(payload, id=rng.choice(ids)))  # seen before
            elif rng.random() < 0.05:  # from another broker: another `hi`
                m = message(payload, id=(rng.randint(0, 2**64 - 1), rng.randint(0, 2**64 - 1)))
                ids.append((m.id.hi, m.id.lo))
                msgs.append(m)
            else:
                m = message(payload)
                ids.append((m.id.hi, m.id.lo))
                msgs.append(m)
            if rng.random() < 0.05:
                msgs.append(msgs[-1])  # twice in the batch
        return batch(msgs)

    def test_the_whole_batch_path_matches_message_by_message(self):
        import random
        rng = random.Random(7)
        plain, general = FakeHost(), FakeHost()
        w_plain, w_general = world(billing), world(billing)
        general_only = billing.Billing.plain_batch
        ids = []
        took_plain = 0
        for round_ in range(400):
            b = self.random_batch(rng, ids)
            if round_ % 25 == 0:  # stored balances that are not plain
                bad = rng.choice([b"abc", b"+5", b"007", b"", b" 5", b"5_0", str(2**63 - 3).encode()])
                plain.committed[b"bill/a"] = general.committed[b"bill/a"] = bad
            plain.install()
            out_plain = plain.run(w_plain, b)
            took_plain += plain.calls == ["state_get_packed", "state_put_packed"] and \
                all(type(o) is mp.Ack for o in out_plain)
            general.install()
            billing.Billing.plain_batch = lambda *a: None
            try:
                out_general = general.run(w_general, b)
            finally:
                billing.Billing.plain_batch = general_only
            self.assertEqual(kinds(out_plain), kinds(out_general), f"round {round_}")
            self.assertEqual([getattr(o, "value", None) for o in out_plain],
                             [getattr(o, "value", None) for o in out_general], f"round {round_}")
            self.assertEqual(plain.committed, general.committed, f"round {round_}")
        self.assertGreater(took_plain, 100)
        print(f"whole-batch path: {took_plain} of 400 batches", file=sys.stderr)


class NotificationTest(unittest.TestCase):
    def test_publishes_once_per_transfer(self):
        h = FakeHost(allowed_topics=["outbox"])
        w = world(notification, [("outbox_topic", "outbox")])
        msgs = [message("t1|alice|5|10"), message("t1|alice|5|10"), message("t2|bob|1|1"),
                message("t3|bob|x|1")]
        out = h.run(w, batch(msgs, "notify"))
        self.assertEqual(kinds(out), ["ack", "ack", "ack", "dl"])
        self.assertEqual(out[3].value,
                         "malformed notification: points_added `x` is not a non-negative integer")
        self.assertEqual([(p.payload, p.key) for p in h.published],
                         [(b"notified alice: transfer t1 earned 5 points (total 10)", b"alice"),
                          (b"notified bob: transfer t2 earned 1 points (total 1)", b"bob")])
        self.assertEqual(h.state(), {"sent/t1": "1", "sent/t2": "1"})
        self.assertEqual(h.calls, ["state_get_packed", "publish", "publish", "state_put_packed"])
        h.run(w, batch(msgs, "notify"))
        self.assertEqual(len(h.published), 2)

    def test_refused_publish_retries_and_refused_marker_rolls_back(self):
        h = FakeHost(allowed_topics=[])
        w = world(notification, [("outbox_topic", "outbox")])
        out = h.run(w, batch([message("t1|a|1|1")], "notify"))
        self.assertEqual(kinds(out), ["retry(1000)"])
        self.assertEqual(h.committed, {})
        h.allowed.add("outbox")
        h.refuse_puts = True
        with self.assertRaises(notification.RolledBack):
            h.run(w, batch([message("t1|a|1|1")], "notify"))
        self.assertEqual(h.published, [])
        self.assertIn("RolledBack: state write refused after publishing", h.logs[-1][1])

    def test_logs_without_outbox(self):
        h = FakeHost()
        w = world(notification)
        out = h.run(w, batch([message("t1|a|1|2"), message("t1|a|1|2")], "notify"))
        self.assertEqual(kinds(out), ["ack", "ack"])
        self.assertEqual(h.logs, [("info", "notified a: transfer t1 earned 1 points (total 2)")])
        h.refuse_puts = True
        out = h.run(w, batch([message("t2|a|1|2"), message("t1|a|1|2"), message("")], "notify"))
        self.assertEqual(kinds(out), ["retry(1000)", "ack", "dl"])


if __name__ == "__main__":
    unittest.main()
