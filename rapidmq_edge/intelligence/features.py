"""Feature extraction shared by model training (``models/train.py``) and the gateway runtime.

Pure numpy + stdlib, no I/O. Three feature sets, each a float32 matrix with one row per
message (or per client window) whose columns are named in ``*_FEATURES``:

* :data:`~.fault_classifier.RESIDUAL_FEATURES` - per sensor reading, the stream
  detector's verdict as residual features (:class:`~.fault_classifier.ResidualState`): the
  input of the **anomaly** model, the fault-kind classifier (re-exported here).
* :func:`message_features` - per message, stateless: the input of the **priority** model.
* :class:`ClientWindows` - per client and tumbling time window: the input of the
  **threat** (client-behaviour) model.

Every model's manifest records :data:`FEATURE_SPEC`; a runtime must refuse a model whose
spec differs (the columns would mean something else). Bump it on any change of a column's
meaning, order or scaling.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fault_classifier import ANOMALY_LABELS, RESIDUAL_FEATURES
from .streams import TEMPLATE, reading_value

__all__ = [
    "ANOMALY_LABELS", "CLIENT_FEATURES", "FEATURE_SPEC", "MESSAGE_FEATURES", "PRIORITY_LABELS",
    "RESIDUAL_FEATURES", "THREAT_LABELS", "ClientWindowRows", "ClientWindows",
    "message_features", "reading_value",
]

FEATURE_SPEC = "rmqe-features/1"

#: class labels of the three models, in output order
PRIORITY_LABELS: tuple[str, ...] = ("critical", "high", "normal", "bulk")
THREAT_LABELS: tuple[str, ...] = ("benign", "credential_guessing", "topic_scanning", "flood")

# =========================================================================== messages

TOPIC_BUCKETS = 32
#: byte patterns looked for in the first PAYLOAD_HEAD bytes of a payload (case-sensitive:
#: log levels are upper case, JSON keys and values lower case)
PAYLOAD_KEYWORDS: tuple[str, ...] = (
    "critical", "fatal", "alarm", "alert", "fire", "smoke", "forced", "intrusion", "gas",
    "error", "fail", "warn", "trouble", "tamper", "held_open", "low_battery", "open", "close",
    "cleared", "debug", "info", "status", "heartbeat", "battery", "spectrum", "stats", "kwh",
    "value", "event", "severity", "over_limit", "armed",
    "DEBUG", "INFO", "WARN", "ERROR", "CRITICAL", "FATAL",
)
PAYLOAD_HEAD = 512
_KW_RE = re.compile(b"|".join(re.escape(k.encode()) for k in
                              sorted(PAYLOAD_KEYWORDS, key=len, reverse=True)))
_KW_INDEX = {k.encode(): i for i, k in enumerate(PAYLOAD_KEYWORDS)}

#: columns of :func:`message_features`
MESSAGE_FEATURES: tuple[str, ...] = (
    *(f"topic_hash_{i}" for i in range(TOPIC_BUCKETS)),  # topic levels (lower case, digits
    # dropped) hashed with CRC-32 into buckets, counted
    "topic_depth",       # number of topic levels
    "topic_sys",         # topic starts with "$"
    "size_log2",         # log2(1 + payload bytes)
    "fmt_json_object",   # payload starts with "{"
    "fmt_json_array",    # payload starts with "["
    "fmt_cbor_map",      # first byte is a CBOR map head (0xa0-0xbf)
    "fmt_text",          # printable ASCII start, not JSON
    "fmt_binary",        # anything else (or empty)
    "digit_share",       # digits / bytes in the payload head
    "commas_log",        # log1p(commas in the head): array or field count
    "qos",               # MQTT QoS (0-2)
    "retain",            # MQTT retain flag
    *(f"kw_{k}" for k in PAYLOAD_KEYWORDS),  # 1 when the keyword occurs in the payload head
)
_KW_BASE = TOPIC_BUCKETS + 12
_NO_DIGITS = str.maketrans("", "", "0123456789")
_CACHE_MAX = 16_384
_NM = len(MESSAGE_FEATURES)
_TB = TOPIC_BUCKETS + 2  # topic buckets, topic_depth, topic_sys


class _RowCache:
    """Full-width rows computed once per key (a topic, a payload template), each filling
    only its own columns, stored in one matrix: a batch's rows are two gathers and a sum."""

    def __init__(self, build: Any) -> None:
        self.build = build
        self.index: dict[Any, int] = {}
        self.rows = np.zeros((256, _NM), dtype=np.float32)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` new keys before a batch (so no index of the batch is
        reused while it is being gathered)."""
        if len(self.index) + n > _CACHE_MAX:
            self.index.clear()  # many distinct keys: start over (cheap, rare)

    def get(self, key: Any) -> int:
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.index)
            if i >= len(self.rows):
                grown = np.zeros((2 * len(self.rows), _NM), dtype=np.float32)
                grown[: len(self.rows)] = self.rows
                self.rows = grown
            self.rows[i] = self.build(key)
        return i


def _topic_row(topic: str) -> np.ndarray:
    v = np.zeros(_NM, dtype=np.float32)
    levels = topic.split("/")
    for lvl in levels:
        tok = lvl.lower().translate(_NO_DIGITS)
        v[zlib.crc32(tok.encode()) % TOPIC_BUCKETS] += 1.0
    v[TOPIC_BUCKETS] = len(levels)
    v[TOPIC_BUCKETS + 1] = topic.startswith("$")
    return v


def _template_row(template: bytes) -> np.ndarray:
    """Format flags, commas_log and keyword flags of a payload head's template."""
    v = np.zeros(_NM, dtype=np.float32)
    first = template[0] if template else -1
    if first == 0x7B:
        v[_TB + 1] = 1
    elif first == 0x5B:
        v[_TB + 2] = 1
    elif 0xA0 <= first <= 0xBF:
        v[_TB + 3] = 1
    elif 0x20 <= first < 0x7F:
        v[_TB + 4] = 1
    else:
        v[_TB + 5] = 1
    if template:
        v[_TB + 7] = math.log1p(template.count(b","))
    for kw in set(_KW_RE.findall(template)):
        v[_KW_BASE + _KW_INDEX[kw]] = 1.0
    return v


_TOPICS = _RowCache(_topic_row)
_TEMPLATES = _RowCache(_template_row)


def message_features(topics: Sequence[str], payloads: Sequence[bytes],
                     qos: Sequence[int] | None = None,
                     retain: Sequence[bool] | None = None) -> np.ndarray:
    """Priority features (``len(topics)`` x ``len(MESSAGE_FEATURES)``, float32).

    Per message only a few C-level calls run (two dict lookups, one ``bytes.translate``);
    the topic columns are cached per topic and the format/keyword columns per payload
    *template* (the head with every digit replaced by "0"), so readings that differ only
    in their numbers cost no regex scan.
    """
    n = len(topics)
    if n == 0:
        return np.zeros((0, _NM), dtype=np.float32)
    _TOPICS.reserve(n)
    _TEMPLATES.reserve(n)
    topic_get, tpl_get = _TOPICS.get, _TEMPLATES.get
    t_idx = [topic_get(t) for t in topics]
    p_idx = []
    size_log = []
    digits = []
    log2 = math.log2
    for p in payloads:
        head = p[:PAYLOAD_HEAD]
        # TEMPLATE (digits -> "0"): keywords hold no digit, so a head and its template match
        # the same keywords at the same places (a digit ends a match either way)
        tpl = head.translate(TEMPLATE)
        p_idx.append(tpl_get(tpl))
        size_log.append(log2(1 + len(p)))
        digits.append(tpl.count(b"0") / len(head) if head else 0.0)  # each digit is a "0"
    if n == 1:
        row = _TOPICS.rows[t_idx[0]] + _TEMPLATES.rows[p_idx[0]]
        row[_TB] = size_log[0]
        row[_TB + 6] = digits[0]
        if qos is not None:
            row[_TB + 8] = qos[0]
        if retain is not None:
            row[_TB + 9] = retain[0]
        return row.reshape(1, _NM)
    out = _TOPICS.rows[t_idx]
    out += _TEMPLATES.rows[p_idx]
    out[:, _TB] = size_log
    out[:, _TB + 6] = digits
    if qos is not None:
        out[:, _TB + 8] = qos
    if retain is not None:
        out[:, _TB + 9] = retain
    return out


# =========================================================================== clients

#: the tumbling window of :class:`ClientWindows`, seconds
CLIENT_WINDOW = 10.0
#: columns of :class:`ClientWindows` rows (counts are per window; "log" = log1p)
CLIENT_FEATURES: tuple[str, ...] = (
    "connects_log",        # CONNECT attempts
    "auth_failures_log",   # CONNECTs refused for bad credentials
    "failure_ratio",       # auth failures / connects (0 without connects)
    "usernames_log",       # distinct user names tried
    "disconnects_log",     # disconnections
    "publishes_log",       # PUBLISH packets
    "publish_denied_log",  # publications refused (ACL, quota)
    "pub_topics_log",      # distinct topics published to
    "pub_topic_spread",    # distinct topics / publications (1 = every one new)
    "subscribes_log",      # subscription filters requested
    "subscribe_denied_log",  # filters refused
    "wildcard_subs_log",   # filters with + or #
    "sys_subs_log",        # filters starting with $ ($SYS, $share)
    "sub_filters_log",     # distinct filters
    "bytes_log",           # payload bytes published
    "mean_size_log2",      # log2(1 + mean payload size)
    "max_size_log2",       # log2(1 + largest payload)
    "active_span",         # (last event - first event) / window: 1 = busy all window
)


@dataclass
class WindowCounts:
    """What one client did in one window (the counts behind its feature row)."""

    window: int
    first: float
    last: float = 0.0
    connects: int = 0
    failures: int = 0
    disconnects: int = 0
    publishes: int = 0
    pub_denied: int = 0
    subscribes: int = 0
    sub_denied: int = 0
    wildcards: int = 0
    sys_subs: int = 0
    bytes: int = 0
    max_size: int = 0
    usernames: set[str] = field(default_factory=set)
    pub_topics: set[str] = field(default_factory=set)
    filters: set[str] = field(default_factory=set)

    def events(self) -> int:
        """Connects, disconnects, publishes and subscribes counted."""
        return self.connects + self.disconnects + self.publishes + self.subscribes

    def row(self, window: float) -> list[float]:
        lg = math.log1p
        return [
            lg(self.connects), lg(self.failures),
            self.failures / self.connects if self.connects else 0.0,
            lg(len(self.usernames)), lg(self.disconnects), lg(self.publishes),
            lg(self.pub_denied), lg(len(self.pub_topics)),
            len(self.pub_topics) / self.publishes if self.publishes else 0.0,
            lg(self.subscribes), lg(self.sub_denied), lg(self.wildcards), lg(self.sys_subs),
            lg(len(self.filters)), lg(self.bytes),
            math.log2(1 + self.bytes / self.publishes) if self.publishes else 0.0,
            math.log2(1 + self.max_size), min((self.last - self.first) / window, 1.0),
        ]


@dataclass(frozen=True)
class ClientWindowRows:
    """Completed windows: ``clients[i]`` did ``features[i]`` in window ``windows[i]``
    (window ``k`` covers ``[k * CLIENT_WINDOW, (k + 1) * CLIENT_WINDOW)``)."""

    clients: list[str]
    windows: list[int]
    features: np.ndarray


class ClientWindows:
    """Per-client counters over tumbling windows of ``window`` seconds.

    Feed broker events as they happen (``t`` = seconds on any monotonic clock); a
    client's window is complete when the client acts in a later window or when
    :meth:`flush` is called with a time past its end. :meth:`current` scores a window
    that is still open (early detection of a flood).
    """

    def __init__(self, window: float = CLIENT_WINDOW) -> None:
        self.window = window
        self._open: dict[str, WindowCounts] = {}
        self._done: list[tuple[str, int, list[float]]] = []
        #: windows a client's own next event closed (the last per client), until
        #: :meth:`take_closed`: a judge ticking after the boundary still sees their evidence
        self._closed: dict[str, WindowCounts] = {}

    def _acc(self, client: str, t: float) -> WindowCounts:
        k = int(t // self.window)
        acc = self._open.get(client)
        if acc is None or acc.window != k:
            if acc is not None:
                self._done.append((client, acc.window, acc.row(self.window)))
                self._closed[client] = acc
            acc = self._open[client] = WindowCounts(k, t)
        acc.last = t
        return acc

    def take_closed(self) -> dict[str, WindowCounts]:
        """The windows closed by their client's next event since the last call (one per
        client, the latest), and forget them."""
        closed, self._closed = self._closed, {}
        return closed

    def connect(self, client: str, t: float, ok: bool, username: str | None = None) -> None:
        """A CONNECT attempt; ``ok`` False when the credentials were refused."""
        acc = self._acc(client, t)
        acc.connects += 1
        acc.failures += not ok
        if username is not None:
            acc.usernames.add(username)

    def disconnect(self, client: str, t: float) -> None:
        """The client's connection ended."""
        self._acc(client, t).disconnects += 1

    def publish(self, client: str, t: float, topic: str, size: int, ok: bool = True) -> None:
        """A PUBLISH of ``size`` payload bytes; ``ok`` False when refused."""
        acc = self._acc(client, t)
        acc.publishes += 1
        acc.pub_denied += not ok
        acc.bytes += size
        acc.max_size = max(acc.max_size, size)
        if len(acc.pub_topics) < 4096:
            acc.pub_topics.add(topic)

    def subscribe(self, client: str, t: float, topic_filter: str, ok: bool = True) -> None:
        """A subscription request for one filter; ``ok`` False when refused."""
        acc = self._acc(client, t)
        acc.subscribes += 1
        acc.sub_denied += not ok
        acc.wildcards += ("+" in topic_filter) or ("#" in topic_filter)
        acc.sys_subs += topic_filter.startswith("$")
        if len(acc.filters) < 4096:
            acc.filters.add(topic_filter)

    def restart(self, client: str, t: float) -> None:
        """Forget the client's open window so far: it is judged on what it does from ``t``."""
        self._closed.pop(client, None)
        if client in self._open:
            self._open[client] = WindowCounts(int(t // self.window), t, t)

    def events(self, client: str) -> int:
        """Events (connects, disconnects, publishes, subscribes) in the client's open window."""
        acc = self._open.get(client)
        return 0 if acc is None else acc.events()

    def counts(self, client: str) -> WindowCounts | None:
        """What the client did in its open window so far (None when it has none)."""
        return self._open.get(client)

    def current(self, client: str) -> np.ndarray | None:
        """Features of the client's open window so far (None when it has none)."""
        acc = self._open.get(client)
        if acc is None:
            return None
        return np.asarray([acc.row(self.window)], dtype=np.float32)

    def flush(self, now: float | None = None) -> ClientWindowRows:
        """Return the completed windows (all open ones too when ``now`` is None)."""
        limit = None if now is None else int(now // self.window)
        for client in list(self._open):
            acc = self._open[client]
            if limit is None or acc.window < limit:
                self._done.append((client, acc.window, acc.row(self.window)))
                del self._open[client]
        done, self._done = self._done, []
        feats = np.asarray([r for _, _, r in done], dtype=np.float32).reshape(
            len(done), len(CLIENT_FEATURES))
        return ClientWindowRows([c for c, _, _ in done], [w for _, w, _ in done], feats)
