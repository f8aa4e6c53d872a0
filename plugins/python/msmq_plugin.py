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

The module needs the bindings componentize-py generates for the ``consumer``
world (``wit_world``); ``build.sh`` takes care of that.
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

class Message:
    """One message of a batch (a thin view over the broker's record)."""

    __slots__ = ("raw", "topic")

    def __init__(self, raw, topic):
        self.raw = raw
        self.topic = topic

    @property
    def id(self):
        """The 16-byte id as ``(hi, lo)``; stable across redeliveries."""
        return (self.raw.id.hi, self.raw.id.lo)

    @property
    def id_hex(self):
        """The id as 32 lowercase hex digits, ``hi`` then ``lo``."""
        i = self.raw.id
        return "%016x%016x" % (i.hi, i.lo)  # %-formatting: 3x an f-string's speed

    @property
    def id_bytes(self):
        i = self.raw.id
        return i.hi.to_bytes(8, "big") + i.lo.to_bytes(8, "big")

    @property
    def partition(self):
        return self.raw.partition

    @property
    def offset(self):
        return self.raw.offset

    @property
    def timestamp_ms(self):
        return self.raw.timestamp_ms

    @property
    def attempt(self):
        """1 on first delivery, then 2, 3, ... ."""
        return self.raw.attempt

    @property
    def is_redelivery(self):
        return self.raw.attempt > 1

    @property
    def payload(self):
        return self.raw.payload

    @property
    def text(self):
        """The payload as UTF-8 text; raises ``UnicodeDecodeError``."""
        return self.raw.payload.decode()

    @property
    def key(self):
        """The key bytes, or ``None``."""
        return self.raw.key

    @property
    def key_str(self):
        k = self.raw.key
        return None if k is None else k.decode()

    @property
    def tag(self):
        return self.raw.tag

    @property
    def headers(self):
        """``[(name, value), ...]`` in message order."""
        return [(h.name, h.value) for h in self.raw.headers]

    def header(self, name, default=None):
        """The last header called ``name``."""
        for h in reversed(self.raw.headers):
            if h.name == name:
                return h.value
        return default

    def __repr__(self):
        return (f"Message(id={self.id_hex}, partition={self.partition}, "
                f"offset={self.offset}, attempt={self.attempt})")


class Batch:
    """The messages of one ``handle`` call; iterable and indexable.

    ``raw_messages`` are the broker's records themselves (fields ``id.hi``,
    ``id.lo``, ``payload``, ``key``, ...), without a wrapper object per
    message: the fastest way through a large batch.
    """

    __slots__ = ("topic", "raw_messages", "_messages")

    def __init__(self, raw):
        self.topic = raw.topic
        self.raw_messages = raw.messages
        self._messages = None

    @property
    def messages(self):
        """The messages as :class:`Message` views, made on first use."""
        if self._messages is None:
            topic = self.topic
            self._messages = [Message(m, topic) for m in self.raw_messages]
        return self._messages

    def __iter__(self):
        return iter(self.messages)

    def __len__(self):
        return len(self.raw_messages)

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
    """Class decorator: exports ``cls`` as the component's ``consumer`` world.

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

        def handle_batch(self, raw):
            try:
                batch = Batch(raw)
                outcomes = instance().handle(batch)
                _check(outcomes, len(batch))
                return outcomes
            except BaseException as e:
                _report(f"batch of {len(raw.messages)} from `{raw.topic}` failed", e)
                raise

    WitWorld.__qualname__ = WitWorld.__name__ = f"WitWorld[{cls.__name__}]"
    return WitWorld


def _check(outcomes, expected):
    if not isinstance(outcomes, list):
        raise TypeError(f"handle must return a list of outcomes, not {type(outcomes).__name__}")
    if len(outcomes) != expected:
        raise ValueError(f"handle returned {len(outcomes)} outcomes for {expected} messages")
    if outcomes.count(ACK) == expected:  # all acks: one pass in C
        return
    for i, o in enumerate(outcomes):
        t = type(o)
        if t is Ack:
            continue
        if t is Retry:
            if not (isinstance(o.value, int) and 0 <= o.value <= _U32_MAX):
                raise ValueError(f"outcome {i}: Retry needs milliseconds in 0..=4294967295, got {o.value!r}")
        elif t is DeadLetter:
            if not isinstance(o.value, str):
                raise TypeError(f"outcome {i}: DeadLetter needs a str reason, got {type(o.value).__name__}")
        else:
            raise TypeError(f"outcome {i}: expected Ack(), Retry(ms) or DeadLetter(reason), got {o!r}")
