"""Write MSMQ consumer plugins in Python.

A plugin is a class with ``init(config)`` and ``handle(batch)``, decorated
with :func:`plugin`::

    import msmq_plugin as mp

    @mp.plugin
    class Echo:
        def init(self, config):
            self.prefix = config.get("prefix", "got ")

        def handle(self, batch):
            for msg in batch:
                mp.info(self.prefix + msg.text)
            return [mp.Ack()] * len(batch)

``handle`` returns one outcome per message, in order: :class:`Ack`,
``Retry(ms)`` or ``DeadLetter(reason)``. Everything a batch does (state
writes, publishes) commits together with its outcomes, or not at all.

An exception escaping ``init`` or ``handle`` is written to the broker's log at
error level, with its traceback, and then fails the call: the broker rolls
the batch back and delivers it again. Raise :class:`InitError` from ``init``
to refuse a deploy with a plain message instead.

Import modules at the top of the app: they are loaded when the component is
built; the standard library's files are not reachable from inside a batch.

The module needs the bindings componentize-py generates for the
``packed-consumer`` world (``wit_world``), whose batches arrive field by
field rather than as a record per message; ``build.sh`` takes care of that.
"""

import sys
from collections import deque as _deque
from itertools import accumulate as _accumulate
from itertools import repeat as _repeat

from componentize_py_types import Err
from wit_world.imports import host as _host
from wit_world.imports import types as _types

__all__ = [
    "Ack", "ACK", "Retry", "DeadLetter", "Outcome",
    "Batch", "Message", "Header", "Config",
    "HostError", "InitError",
    "plugin",
    "log", "trace", "debug", "info", "warn", "error",
    "publish", "now_ms",
    "get", "get_str", "get_many", "contains", "put", "put_many", "delete",
    "scan", "scan_all",
    "format_exception",
]

# ---------------------------------------------------------------- outcomes

# The generated variant cases are the outcomes: returning them needs no
# conversion, which matters at thousands of messages per second.
Ack = _types.Outcome_Ack
"""Done: the message is never delivered again. ``Ack()``"""
Retry = _types.Outcome_Retry
"""Deliver the message again after this many milliseconds. ``Retry(1000)``"""
DeadLetter = _types.Outcome_DeadLetter
"""Move the message to the plugin's dead-letter topic. ``DeadLetter(reason)``"""
Outcome = _types.Outcome
Header = _types.Header
ACK = Ack()
"""One shared ``Ack()``: returning it for every message saves an object each."""

_U32_MAX = 0xFFFF_FFFF


def _as_bytes(value, what):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


# ---------------------------------------------------------------- messages

def _split(data, ends):
    """The strings of a WIT ``byte-strings``: one pass of slices, in C."""
    return list(map(data.__getitem__, map(slice, [0, *ends], ends)))


def _numbers(data, code):
    """A flat little-endian column of a ``packed-batch`` as ints (Wasm is
    little-endian, so a memoryview cast reads it in C)."""
    return memoryview(data).cast(code).tolist()


def _flat(strings):
    """The strings of a WIT ``flat-strings``."""
    return _split(strings.data, _numbers(strings.ends, "I"))


# Bits of `packed-batch.present`.
_HAS_KEY = 1
_HAS_TAG = 2


class Message:
    """One message of a batch: a view of entry ``index`` of the packed batch."""

    __slots__ = ("batch", "index")

    def __init__(self, batch, index):
        self.batch = batch
        self.index = index

    @property
    def topic(self):
        return self.batch.topic

    @property
    def id(self):
        """The 16-byte id as ``(hi, lo)``; stable across redeliveries."""
        b = self.id_bytes
        return (int.from_bytes(b[:8], "big"), int.from_bytes(b[8:], "big"))

    @property
    def id_hex(self):
        """The id as 32 lowercase hex digits, ``hi`` then ``lo``."""
        return self.id_bytes.hex()

    @property
    def id_bytes(self):
        i = 16 * self.index
        return self.batch.packed.ids[i:i + 16]

    @property
    def partition(self):
        return self.batch.partitions[self.index]

    @property
    def offset(self):
        return self.batch.offsets[self.index]

    @property
    def timestamp_ms(self):
        return self.batch.timestamps_ms[self.index]

    @property
    def attempt(self):
        """1 on first delivery, then 2, 3, ... ."""
        return self.batch.attempts[self.index]

    @property
    def is_redelivery(self):
        return self.attempt > 1

    @property
    def payload(self):
        return self.batch.payloads[self.index]

    @property
    def text(self):
        """The payload as UTF-8 text; raises ``UnicodeDecodeError``."""
        return self.payload.decode()

    @property
    def key(self):
        """The key bytes, or ``None``."""
        return self.batch.keys[self.index]

    @property
    def key_str(self):
        k = self.key
        return None if k is None else k.decode()

    @property
    def tag(self):
        """The tag (str), or ``None``."""
        return self.batch.tags[self.index]

    @property
    def headers(self):
        """``[(name, value), ...]`` in message order."""
        return self.batch.headers_of(self.index)

    def header(self, name, default=None):
        """The last header called ``name``."""
        for n, v in reversed(self.headers):
            if n == name:
                return v
        return default

    def __repr__(self):
        return (f"Message(id={self.id_hex}, partition={self.partition}, "
                f"offset={self.offset}, attempt={self.attempt})")


class Batch:
    """The messages of one ``handle`` call; iterable and indexable.

    The broker hands a batch over field by field (WIT ``packed-batch``), and
    the whole-batch properties below read it that way: ``payloads``,
    ``id_hexes()``, ``keys``, ``tags``, ``partitions``, ``offsets``,
    ``timestamps_ms`` and ``attempts`` are lists with one entry per message,
    each made in a few passes in C. ``messages`` (and iterating) gives a
    :class:`Message` view per message, which is handier and slower.
    ``packed`` is the broker's record itself.
    """

    __slots__ = ("topic", "packed", "_cache")

    def __init__(self, packed):
        self.topic = packed.topic
        self.packed = packed
        self._cache = {}

    def _column(self, name, make):
        c = self._cache
        if name not in c:
            c[name] = make()
        return c[name]

    @property
    def payloads(self):
        """The payloads (bytes), in message order."""
        return self._column("payloads", lambda: _flat(self.packed.payloads))

    def id_hexes(self):
        """The ids as 32 lowercase hex digits each (str), in message order."""
        h = self.packed.ids.hex()
        n = len(h)
        return list(map(h.__getitem__, map(slice, range(0, n, 32), range(32, n + 32, 32))))

    @property
    def partitions(self):
        return self._column("partitions", lambda: _numbers(self.packed.partitions, "I"))

    @property
    def offsets(self):
        return self._column("offsets", lambda: _numbers(self.packed.offsets, "Q"))

    @property
    def timestamps_ms(self):
        return self._column("timestamps_ms", lambda: _numbers(self.packed.timestamps_ms, "Q"))

    @property
    def attempts(self):
        return self._column("attempts", lambda: _numbers(self.packed.attempts, "I"))

    def _optional(self, strings, bit, convert=None):
        values = _flat(strings)
        if convert is not None:
            values = list(map(convert, values))
        for i, p in enumerate(self.packed.present):
            if not p & bit:
                values[i] = None
        return values

    @property
    def keys(self):
        """The keys (bytes, or ``None`` for a message without one)."""
        return self._column("keys", lambda: self._optional(self.packed.keys, _HAS_KEY))

    @property
    def tags(self):
        """The tags (str, or ``None`` for an untagged message)."""
        return self._column(
            "tags", lambda: self._optional(self.packed.tags, _HAS_TAG, bytes.decode))

    def headers_of(self, index):
        """``[(name, value), ...]`` of message ``index``."""
        def by_message():
            out = {}
            for i, h in self.packed.headers:
                out.setdefault(i, []).append((h.name, h.value))
            return out
        return list(self._column("headers", by_message).get(index, ()))

    @property
    def messages(self):
        """The messages as :class:`Message` views, made on first use."""
        return self._column("messages", lambda: [Message(self, i) for i in range(len(self))])

    def __iter__(self):
        return iter(self.messages)

    def __len__(self):
        return self.packed.count

    def __getitem__(self, index):
        return self.messages[index]


class Config:
    """The deploy's ``--config key=value`` pairs; a repeated key's last value wins."""

    __slots__ = ("entries", "_map")

    def __init__(self, entries):
        self.entries = list(entries)
        self._map = dict(self.entries)

    def get(self, key, default=None):
        return self._map.get(key, default)

    def require(self, key):
        """The value, or :class:`InitError` naming the missing key."""
        if key not in self._map:
            raise InitError(f"missing required config key `{key}`")
        return self._map[key]

    def parse(self, key, convert, default=None):
        """``convert(value)``, or ``default`` when absent; bad values refuse the deploy."""
        if key not in self._map:
            return default
        raw = self._map[key]
        try:
            return convert(raw)
        except (TypeError, ValueError) as e:
            raise InitError(f"config key `{key}` = `{raw}`: {e}") from None

    def __contains__(self, key):
        return key in self._map

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)


# ---------------------------------------------------------------- errors

class HostError(Exception):
    """The broker refused a publish or a state write.

    ``kind`` is ``"not-allowed"``, ``"unknown-topic"``, ``"too-large"`` or
    ``"other"``; ``detail`` is the broker's explanation. The batch goes on:
    the plugin decides what the refusal means for its messages.
    """

    _KINDS = {
        _types.HostError_NotAllowed: "not-allowed",
        _types.HostError_UnknownTopic: "unknown-topic",
        _types.HostError_TooLarge: "too-large",
        _types.HostError_Other: "other",
    }

    def __init__(self, kind, detail):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    @classmethod
    def _from(cls, err):
        case = err.value
        return cls(cls._KINDS.get(type(case), "other"), getattr(case, "value", str(case)))


class InitError(Exception):
    """Raise from ``init`` to refuse the deploy with this message."""


# ---------------------------------------------------------------- host calls

_LEVELS = _types.LogLevel


def log(level, message):
    """Write a line to the broker's log; ``level`` is a name ("info") or a ``LogLevel``."""
    if isinstance(level, str):
        level = _LEVELS[level.upper()]
    _host.log(level, str(message))


def trace(message):
    _host.log(_LEVELS.TRACE, str(message))


def debug(message):
    _host.log(_LEVELS.DEBUG, str(message))


def info(message):
    _host.log(_LEVELS.INFO, str(message))


def warn(message):
    _host.log(_LEVELS.WARN, str(message))


def error(message):
    _host.log(_LEVELS.ERROR, str(message))


def now_ms():
    """The broker's wall-clock time, ms since the Unix epoch."""
    return _host.now_ms()


def publish(topic, payload, key=None, tag=None, headers=()):
    """Publish a message, visible only if the batch commits; raises :class:`HostError`.

    ``headers`` is an iterable of ``(name, value)`` pairs.
    """
    msg = _types.NewMessage(
        topic,
        _as_bytes(payload, "payload"),
        None if key is None else _as_bytes(key, "key"),
        tag,
        [_types.Header(n, v) for n, v in headers],
    )
    try:
        _host.publish(msg)
    except Err as e:
        raise HostError._from(e) from None


def get(key):
    """The value of a state key as bytes, or ``None``; sees this batch's writes."""
    return _host.state_get(_as_bytes(key, "key"))


def get_str(key, default=None):
    """The value as UTF-8 text, or ``default`` when missing."""
    v = _host.state_get(_as_bytes(key, "key"))
    return default if v is None else v.decode()


def contains(key):
    return _host.state_get(_as_bytes(key, "key")) is not None


def _pack(items, what):
    # Laid end to end (WIT 1.2 `byte-strings`): crossing into the host costs
    # two copies instead of one object per item. All bytes (the usual case):
    # join and accumulate run in C, with no Python-level step per item.
    try:
        data = b"".join(items)
        ends = list(_accumulate(map(len, items)))
        if (ends[-1] if ends else 0) == len(data):
            return _types.ByteStrings(data, ends)
    except TypeError:
        pass
    # str items, or buffers whose len() is not their size in bytes.
    items = [_as_bytes(v, what) for v in items]
    return _types.ByteStrings(b"".join(items), list(_accumulate(map(len, items))))


def _consume(iterator):
    _deque(iterator, maxlen=0)


def get_many(keys):
    """One value (bytes or ``None``) per key, in order, in a single host call."""
    if not keys:
        return []
    found = _host.state_get_packed(_pack(keys, "key"))
    data, ends = found.values.data, found.values.ends
    # Slicing and marking the missing, each one pass in C.
    values = list(map(data.__getitem__, map(slice, [0, *ends], ends)))
    _consume(map(values.__setitem__, found.missing, _repeat(None)))
    return values


def put(key, value):
    """Write a state key; raises :class:`HostError` when refused."""
    try:
        _host.state_put(_as_bytes(key, "key"), _as_bytes(value, "value"))
    except Err as e:
        raise HostError._from(e) from None


def put_many(entries, values=None):
    """Write several keys in one host call, all or none; raises :class:`HostError`.

    ``put_many(entries)`` takes a dict or an iterable of ``(key, value)``
    pairs; ``put_many(keys, values)`` two lists of one length (the fastest:
    no pair per entry). A later entry wins over an earlier one with the same
    key.
    """
    if values is not None:
        keys = entries
        if len(keys) != len(values):
            raise ValueError(f"put_many: {len(keys)} keys but {len(values)} values")
    elif isinstance(entries, dict):
        keys, values = list(entries), list(entries.values())
    else:
        pairs = list(entries)
        keys, values = [k for k, _ in pairs], [v for _, v in pairs]
    if not keys:
        return
    try:
        _host.state_put_packed(_pack(keys, "key"), _pack(values, "value"))
    except Err as e:
        raise HostError._from(e) from None


def delete(key):
    _host.state_delete(_as_bytes(key, "key"))


def scan(prefix, start_after=None, limit=1000):
    """Up to ``limit`` ``(key, value)`` pairs under ``prefix`` in key order, after ``start_after``."""
    after = None if start_after is None else _as_bytes(start_after, "start_after")
    return _host.state_scan(_as_bytes(prefix, "prefix"), after, limit)


# The broker returns at most this many entries per scan, whatever the limit.
_SCAN_ENTRIES_MAX = 10_000


def scan_all(prefix, page=1000):
    """Every ``(key, value)`` pair under ``prefix``, fetched ``page`` at a time."""
    prefix = _as_bytes(prefix, "prefix")
    page = max(1, min(page, _SCAN_ENTRIES_MAX))
    after = None
    while True:
        entries = _host.state_scan(prefix, after, page)
        yield from entries
        if len(entries) < page:
            return
        after = entries[-1][0]


# ---------------------------------------------------------------- errors to the log

# The broker cuts a log line at 4096 bytes; stay below so the last frames,
# where the error happened, are kept.
_LOG_LINE_MAX = 4000


def _frames(tb):
    # Formatted without source text: reading it would need a filesystem,
    # which plugins do not have.
    out = []
    while tb is not None:
        code = tb.tb_frame.f_code
        out.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}')
        tb = tb.tb_next
    return out


def _exc_line(e):
    name = type(e).__qualname__
    mod = type(e).__module__
    if mod not in ("builtins", "__main__"):
        name = f"{mod}.{name}"
    text = str(e)
    return f"{name}: {text}" if text else name


def format_exception(e):
    """``"Type: message"`` then the traceback, chained exceptions included, in at most ~4000 bytes."""
    chain = []
    seen = set()
    cur = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        if cur.__cause__ is not None:
            cur = cur.__cause__
        elif cur.__context__ is not None and not cur.__suppress_context__:
            cur = cur.__context__
        else:
            cur = None
    lines = []
    for i, exc in enumerate(reversed(chain)):
        if i:
            lines.append("")
            lines.append("The above exception was the direct cause of the following exception:"
                         if exc.__cause__ is not None else
                         "During handling of the above exception, another exception occurred:")
            lines.append("")
        lines.append("Traceback (most recent call last):")
        lines.extend(_frames(exc.__traceback__))
        lines.append(_exc_line(exc))
    head = _exc_line(e)
    text = head + "\n" + "\n".join(lines)
    if len(text.encode()) <= _LOG_LINE_MAX:
        return text
    # Too long: keep the head and as many of the last lines as fit.
    budget = _LOG_LINE_MAX - len(head.encode()) - 40
    tail = []
    for line in reversed(lines):
        n = len(line.encode()) + 1
        if n > budget:
            break
        tail.append(line)
        budget -= n
    tail.reverse()
    skipped = len(lines) - len(tail)
    return f"{head}\n  ... {skipped} lines left out ...\n" + "\n".join(tail)


def _report(where, e):
    try:
        _host.log(_LEVELS.ERROR, f"{where}: " + format_exception(e))
    except BaseException:  # never hide the original error
        pass


# ---------------------------------------------------------------- the export glue

def plugin(cls):
    """Class decorator: exports ``cls`` as the component's ``packed-consumer`` world.

    ``cls()`` is created once per instance; its ``init(config)`` gets a
    :class:`Config` and its ``handle(batch)`` a :class:`Batch` and returns one
    outcome per message. The decorated class is returned unchanged.
    """
    for name in ("init", "handle"):
        if not callable(getattr(cls, name, None)):
            raise TypeError(f"plugin class {cls.__name__} needs a method `{name}`")

    # componentize-py looks for a class named WitWorld in the app module.
    module = sys.modules[cls.__module__]
    if hasattr(module, "WitWorld"):
        raise TypeError(f"module {cls.__module__} exports more than one plugin")
    module.WitWorld = _world_for(cls)
    return cls


def _world_for(cls):
    # Held by the closure, not by WitWorld objects: the runtime may create
    # those as it likes, but there is one plugin object per instance.
    holder = []

    def instance():
        if not holder:
            holder.append(cls())
        return holder[0]

    class WitWorld:
        def init(self, config):
            try:
                instance().init(Config(config))
            except InitError as e:
                raise Err(str(e)) from None
            except BaseException as e:
                _report("init failed", e)
                raise

        def handle_packed(self, packed):
            try:
                batch = Batch(packed)
                return _packed_outcomes(instance().handle(batch), len(batch))
            except BaseException as e:
                _report(f"batch of {packed.count} from `{packed.topic}` failed", e)
                raise

    WitWorld.__qualname__ = WitWorld.__name__ = f"WitWorld[{cls.__name__}]"
    return WitWorld


def _packed_outcomes(outcomes, expected):
    """``outcomes`` checked and packed as WIT ``packed-outcomes``."""
    if not isinstance(outcomes, list):
        raise TypeError(f"handle must return a list of outcomes, not {type(outcomes).__name__}")
    if len(outcomes) != expected:
        raise ValueError(f"handle returned {len(outcomes)} outcomes for {expected} messages")
    if outcomes.count(ACK) == expected:  # all acks: one pass in C, one byte each
        return _types.PackedOutcomes(bytes(expected), [], [])
    kinds = bytearray(expected)
    retry_ms = []
    reasons = []
    for i, o in enumerate(outcomes):
        t = type(o)
        if t is Ack:
            continue
        if t is Retry:
            if not (isinstance(o.value, int) and 0 <= o.value <= _U32_MAX):
                raise ValueError(f"outcome {i}: Retry needs milliseconds in 0..=4294967295, got {o.value!r}")
            kinds[i] = 1
            retry_ms.append(o.value)
        elif t is DeadLetter:
            if not isinstance(o.value, str):
                raise TypeError(f"outcome {i}: DeadLetter needs a str reason, got {type(o.value).__name__}")
            kinds[i] = 2
            reasons.append(o.value)
        else:
            raise TypeError(f"outcome {i}: expected Ack(), Retry(ms) or DeadLetter(reason), got {o!r}")
    return _types.PackedOutcomes(bytes(kinds), retry_ms, reasons)
