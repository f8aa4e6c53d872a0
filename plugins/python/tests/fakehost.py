"""An in-memory stand-in for the broker's `host` interface, for native tests.

Batches commit or roll back like in the broker: writes go to an overlay that
is applied only when `handle_packed` returns.
"""

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BINDINGS = os.path.join(ROOT, "target", "bindings")
if not os.path.isdir(os.path.join(BINDINGS, "wit_world")):
    sys.exit("no bindings: run ./build.sh --bindings first")
sys.path[:0] = [BINDINGS, ROOT]

from componentize_py_types import Err  # noqa: E402
from wit_world.imports import host, types  # noqa: E402

KEY_MAX, VALUE_MAX = 1024, 1024 * 1024


class FakeHost:
    def __init__(self, allowed_topics=()):
        self.committed = {}
        self.overlay = {}
        self.published = []
        self.pending_pub = []
        self.logs = []
        self.calls = []
        self.allowed = set(allowed_topics)
        self.refuse_puts = False
        self.now = 1_700_000_000_000
        self.install()

    def install(self):
        """Make this the host the bindings call (the last one made is)."""
        for name in ("log", "publish", "state_get", "state_put", "state_delete",
                     "state_scan", "state_get_many", "state_put_many", "state_get_packed",
                     "state_put_packed", "now_ms"):
            setattr(host, name, getattr(self, name))

    # -- host functions
    def log(self, level, message):
        self.calls.append("log")
        self.logs.append((level.name.lower(), message))

    def publish(self, msg):
        self.calls.append("publish")
        if msg.topic not in self.allowed:
            raise Err(types.HostError_NotAllowed(msg.topic))
        self.pending_pub.append(msg)

    def _get(self, key):
        if key in self.overlay:
            return self.overlay[key]
        return self.committed.get(key)

    def state_get(self, key):
        self.calls.append("state_get")
        return self._get(key)

    def state_get_many(self, keys):
        self.calls.append("state_get_many")
        return [self._get(k) for k in keys]

    @staticmethod
    def _unpack(packed):
        out, start = [], 0
        for end in packed.ends:
            if end < start or end > len(packed.data):
                raise ValueError(f"bad end {end}")
            out.append(packed.data[start:end])
            start = end
        if start != len(packed.data):
            raise ValueError(f"ends at {start} of {len(packed.data)} bytes")
        return out

    def state_get_packed(self, keys):
        self.calls.append("state_get_packed")
        values = [self._get(k) for k in self._unpack(keys)]
        data, ends, missing = b"", [], []
        for i, v in enumerate(values):
            if v is None:
                missing.append(i)
            else:
                data += v
            ends.append(len(data))
        return types.PackedValues(types.ByteStrings(data, ends), missing)

    def state_put_packed(self, keys, values):
        self.calls.append("state_put_packed")
        ks, vs = self._unpack(keys), self._unpack(values)
        if len(ks) != len(vs):
            raise Err(types.HostError_Other(f"{len(ks)} keys but {len(vs)} values"))
        for k, v in zip(ks, vs):
            err = self._check(k, v)
            if err:
                raise Err(err)
        for k, v in zip(ks, vs):
            self.overlay[k] = v

    def _check(self, key, value):
        if self.refuse_puts:
            return types.HostError_TooLarge("refused by the test")
        if len(key) > KEY_MAX or len(value) > VALUE_MAX:
            return types.HostError_TooLarge("too large")
        return None

    def state_put(self, key, value):
        self.calls.append("state_put")
        err = self._check(key, value)
        if err:
            raise Err(err)
        self.overlay[key] = value

    def state_put_many(self, entries):
        self.calls.append("state_put_many")
        for k, v in entries:
            err = self._check(k, v)
            if err:
                raise Err(err)
        for k, v in entries:
            self.overlay[k] = v

    def state_delete(self, key):
        self.calls.append("state_delete")
        self.overlay[key] = None

    def state_scan(self, prefix, start_after, limit):
        self.calls.append("state_scan")
        merged = dict(self.committed)
        merged.update(self.overlay)
        keys = sorted(k for k, v in merged.items() if v is not None and k.startswith(prefix)
                      and (start_after is None or k > start_after))
        return [(k, merged[k]) for k in keys[:limit]]

    def now_ms(self):
        self.calls.append("now_ms")
        return self.now

    # -- driving a plugin
    def run(self, world, batch):
        """handle_packed with commit on return and rollback on an exception."""
        self.calls = []
        self.overlay = {}
        self.pending_pub = []
        try:
            outcomes = unpack_outcomes(world.handle_packed(batch))
        except BaseException:
            self.overlay = {}
            self.pending_pub = []
            raise
        for k, v in self.overlay.items():
            if v is None:
                self.committed.pop(k, None)
            else:
                self.committed[k] = v
        self.published.extend(self.pending_pub)
        return outcomes

    def state(self, prefix=b""):
        return {k.decode(): v.decode() for k, v in sorted(self.committed.items())
                if k.startswith(prefix)}


def load_app(name):
    """Imports plugins/python/NAME/app.py as module `NAME_app`; returns its WitWorld instance."""
    mod_name = f"{name}_app"
    spec = importlib.util.spec_from_file_location(mod_name, os.path.join(ROOT, name, "app.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


_next_id = [0]


def message(payload, id=None, key=None, attempt=1, headers=(), tag=None):
    """A WIT `message` record; `batch` packs these as the broker does."""
    if id is None:
        _next_id[0] += 1
        id = (0x0123456789ABCDEF, _next_id[0])
    if isinstance(payload, str):
        payload = payload.encode()
    return types.Message(types.MessageId(*id), 0, _next_id[0], 0, attempt, key, tag,
                         [types.Header(n, v) for n, v in headers], payload)


def _flat(items):
    data, ends = b"", b""
    for item in items:
        data += item
        ends += len(data).to_bytes(4, "little")
    return types.FlatStrings(data, ends)


def _le(numbers, width):
    return b"".join(n.to_bytes(width, "little") for n in numbers)


def batch(messages, topic="transfers"):
    """A WIT `packed-batch` of `message` records, laid out as the broker does."""
    ms = list(messages)
    return types.PackedBatch(
        topic,
        len(ms),
        b"".join(m.id.hi.to_bytes(8, "big") + m.id.lo.to_bytes(8, "big") for m in ms),
        _le((m.partition for m in ms), 4),
        _le((m.offset for m in ms), 8),
        _le((m.timestamp_ms for m in ms), 8),
        _le((m.attempt for m in ms), 4),
        _flat(m.payload for m in ms),
        _flat(m.key or b"" for m in ms),
        _flat((m.tag or "").encode() for m in ms),
        bytes((m.key is not None) | (m.tag is not None) << 1 for m in ms),
        [(i, h) for i, m in enumerate(ms) for h in m.headers],
    )


def unpack_outcomes(packed):
    """The outcomes a `packed-outcomes` stands for, as the broker reads it."""
    retry_ms, reasons = iter(packed.retry_ms), iter(packed.reasons)
    out = []
    for kind in packed.kinds:
        if kind == 0:
            out.append(types.Outcome_Ack())
        elif kind == 1:
            out.append(types.Outcome_Retry(next(retry_ms)))
        elif kind == 2:
            out.append(types.Outcome_DeadLetter(next(reasons)))
        else:
            raise ValueError(f"outcome kind {kind}")
    if next(retry_ms, None) is not None or next(reasons, None) is not None:
        raise ValueError("more retry delays or reasons than outcomes that use them")
    return out
