"""Feature extraction shared by model training (``models/train.py``) and the gateway runtime.

Pure numpy + stdlib, no I/O. Three feature sets, each a float32 matrix with one row per
message (or per client window) whose columns are named in ``*_FEATURES``:

* :class:`StreamTable` - per sensor stream (one topic), updated incrementally: the input of
  the **anomaly** model. Vectorised across streams: a micro-batch of readings is processed
  in rounds, each round holding at most one reading per stream.
* :func:`message_features` - per message, stateless: the input of the **priority** model.
* :class:`ClientWindows` - per client and tumbling time window: the input of the
  **threat** (client-behaviour) model.

Every model's manifest records :data:`FEATURE_SPEC`; a runtime must refuse a model whose
spec differs (the columns would mean something else). Bump it on any change of a column's
meaning, order or scaling.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURE_SPEC = "rmqe-features/1"

#: class labels of the three models, in output order
PRIORITY_LABELS: tuple[str, ...] = ("critical", "high", "normal", "bulk")
ANOMALY_LABELS: tuple[str, ...] = ("none", "drift", "spike", "stuck", "burst")
THREAT_LABELS: tuple[str, ...] = ("benign", "credential_guessing", "topic_scanning", "flood")

# =========================================================================== sensor streams

#: columns of :meth:`StreamTable.update` (sigma = the stream's noise estimate, see below)
STREAM_FEATURES: tuple[str, ...] = (
    "warm",    # readings since the stream (re)started, capped at 32, divided by 32
    "z_fast",  # (x - fast EWMA mean) / sigma, before this reading updates it
    "z_slow",  # (x - slow EWMA mean) / sigma
    "dz",      # (x - previous reading) / sigma
    "level",   # (fast mean - slow mean) / sigma: a level shift or a trend
    "slope",   # EWMA of first differences / sigma: a sustained trend
    "stuck",   # consecutive readings equal to the previous one (this one included), cap 20
    "log_dt",  # log(time since last reading) - EWMA of it: < 0 faster than usual
    "burst",   # EWMA (alpha 0.3) of log_dt including this reading: sustained chatter
    "gap",     # 1 when this reading follows a gap > RESET_GAP periods (the level resets)
)
#: fast / slow EWMA weights of the level; weight of the noise, slope and period baselines
ALPHA_FAST, ALPHA_SLOW, ALPHA_VAR, ALPHA_SLOPE, ALPHA_DT, ALPHA_BURST = (
    0.3, 0.02, 0.05, 0.1, 0.05, 0.3)
#: after this many readings, residuals feeding the baselines are clipped (robust update)
ROBUST_AFTER = 8
CLIP_SIGMA = 4.0
#: the usual-interval baseline moves down slowly (a burst barely shifts it) and up faster
#: (it recovers from a burst or a changed period, also through gaps)
CLIP_LOG_DT_DOWN, CLIP_LOG_DT_UP = 0.1, 0.5
#: a silence longer than this many usual periods restarts the stream's level (a reboot,
#: a recalibration, a long outage)
RESET_GAP = 10.0
FEATURE_CLIP = 50.0

_STATE = ("n", "n_dt", "last_t", "last_x", "m_fast", "m_slow", "var", "slope", "log_dt",
          "burst", "stuck")


class StreamTable:
    """Incremental per-stream state in column arrays (one slot per stream key).

    ``update`` returns the features of each reading computed from the state *before* the
    reading (so a spike does not hide itself), then folds the reading in. Baseline updates
    are robust: residuals are clipped at ``CLIP_SIGMA`` sigma, and a reading equal to the
    previous one does not shrink the noise estimate (a stuck sensor would otherwise make
    every later healthy reading look anomalous). The noise sigma is estimated from first
    differences (``var = EWMA(d**2) / 2``), so slow daily cycles do not inflate it.
    """

    def __init__(self, capacity: int = 256) -> None:
        self._slots: dict[str, int] = {}
        self._cap = max(1, capacity)
        self._a: dict[str, np.ndarray] = {k: np.zeros(self._cap) for k in _STATE}

    def __len__(self) -> int:
        return len(self._slots)

    def slots(self, keys: Sequence[str]) -> np.ndarray:
        """Slot indices of stream ``keys`` (new keys get fresh slots)."""
        out = np.empty(len(keys), dtype=np.int64)
        for i, k in enumerate(keys):
            s = self._slots.get(k)
            if s is None:
                s = self._slots[k] = len(self._slots)
                if s >= self._cap:
                    self._grow(2 * self._cap)
            out[i] = s
        return out

    def forget(self, key: str) -> None:
        """Reset a stream's state (its slot is reused for the same key)."""
        s = self._slots.get(key)
        if s is not None:
            for arr in self._a.values():
                arr[s] = 0.0

    def _grow(self, cap: int) -> None:
        for k, arr in self._a.items():
            new = np.zeros(cap)
            new[: self._cap] = arr
            self._a[k] = new
        self._cap = cap

    def update_keys(self, keys: Sequence[str], t: Sequence[float] | np.ndarray,
                    x: Sequence[float] | np.ndarray) -> np.ndarray:
        """:meth:`update` addressed by stream key."""
        return self.update(self.slots(keys), np.asarray(t, float), np.asarray(x, float))

    def update(self, slots: np.ndarray, t: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Features (``len(slots)`` x ``len(STREAM_FEATURES)``, float32) of readings ``x`` at
        times ``t`` (seconds; only differences matter), in batch order per stream."""
        n = len(slots)
        out = np.zeros((n, len(STREAM_FEATURES)), dtype=np.float32)
        if n == 0:
            return out
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_slots)) + 1]
        group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - group_start
        if rank.max() == 0:
            self._round(slots, t, x, out, np.arange(n))
        else:
            for r in range(int(rank.max()) + 1):
                idx = np.flatnonzero(rank == r)
                self._round(slots[idx], t[idx], x[idx], out, idx)
        return out

    def _round(self, s: np.ndarray, t: np.ndarray, x: np.ndarray, out: np.ndarray,
               rows: np.ndarray) -> None:
        a = self._a
        n, n_dt = a["n"][s], a["n_dt"][s]
        last_t, last_x = a["last_t"][s], a["last_x"][s]
        m_fast, m_slow, var = a["m_fast"][s], a["m_slow"][s], a["var"][s]
        slope, log_dt_base = a["slope"][s], a["log_dt"][s]
        burst, stuck = a["burst"][s], a["stuck"][s]

        seen = n > 0
        dt = np.where(seen, np.maximum(t - last_t, 1e-6), 0.0)
        log_dt_now = np.log(np.maximum(dt, 1e-6))
        period = np.exp(log_dt_base)
        gap = seen & (n_dt >= 2) & (dt > RESET_GAP * period)
        live = seen & ~gap  # readings compared against an established level
        floor = np.maximum(np.abs(m_slow) * 1e-4, 1e-9)
        sig = np.sqrt(np.maximum(var, floor * floor))
        has_var = live & (n_dt >= 1)
        inv = np.where(has_var, 1.0 / sig, 0.0)

        d = x - last_x
        same = live & (d == 0.0)
        stuck_new = np.where(same, stuck + 1, 0.0)
        rel_dt = np.where(seen & (n_dt >= 1), log_dt_now - log_dt_base, 0.0)
        burst_new = np.where(seen & ~gap, burst + ALPHA_BURST * (rel_dt - burst), 0.0)

        f = out[rows]
        f[:, 0] = np.minimum(np.where(gap, 0, n), 32) / 32.0
        f[:, 1] = (x - m_fast) * inv
        f[:, 2] = (x - m_slow) * inv
        f[:, 3] = np.where(live, d, 0.0) * inv
        f[:, 4] = (m_fast - m_slow) * inv
        f[:, 5] = slope * inv
        f[:, 6] = np.minimum(stuck_new, 20)
        f[:, 7] = np.clip(rel_dt, -8, 8)
        f[:, 8] = np.clip(burst_new, -8, 8)
        f[:, 9] = gap
        np.clip(f, -FEATURE_CLIP, FEATURE_CLIP, out=f)
        out[rows] = f

        # ---- fold the reading in
        robust = n_dt >= ROBUST_AFTER
        lim = np.where(robust & has_var, CLIP_SIGMA * sig, np.inf)
        n1 = np.where(live, n + 1, 1.0)
        w = 1.0 / n1
        af, aslow = np.maximum(ALPHA_FAST, w), np.maximum(ALPHA_SLOW, w)
        new_fast = np.where(live, m_fast + af * np.clip(x - m_fast, -lim, lim), x)
        new_slow = np.where(live, m_slow + aslow * np.clip(x - m_slow, -lim, lim), x)
        dc = np.clip(d, -lim, lim)
        n_dt1 = np.where(seen, n_dt + 1, n_dt)
        wv = np.maximum(ALPHA_VAR, 1.0 / np.maximum(n_dt1, 1.0))
        var_new = np.where(live & ~same, var + wv * (dc * dc / 2.0 - var), var)
        slope_new = np.where(live, slope + ALPHA_SLOPE * (dc - slope), 0.0)
        wdt = np.maximum(ALPHA_DT, 1.0 / np.maximum(n_dt1, 1.0))
        robust_dt = n_dt >= ROBUST_AFTER
        lo = np.where(robust_dt, -CLIP_LOG_DT_DOWN, -np.inf)
        hi = np.where(robust_dt, CLIP_LOG_DT_UP, np.inf)
        dt_new = np.where(seen, log_dt_base + wdt * np.clip(log_dt_now - log_dt_base, lo, hi),
                          log_dt_base)

        a["n"][s] = n1
        a["n_dt"][s] = n_dt1
        a["last_t"][s] = t
        a["last_x"][s] = x
        a["m_fast"][s] = new_fast
        a["m_slow"][s] = new_slow
        a["var"][s] = var_new
        a["slope"][s] = slope_new
        a["log_dt"][s] = dt_new
        a["burst"][s] = burst_new
        a["stuck"][s] = stuck_new


def reading_value(payload: bytes) -> float | None:
    """The numeric ``"value"`` of a JSON or CBOR map payload; None when there is none."""
    if not payload:
        return None
    first = payload[0]
    try:
        if first == 0x7B:  # "{"
            obj: Any = json.loads(payload)
        elif 0xA0 <= first <= 0xBF:  # CBOR map
            import cbor2

            obj = cbor2.loads(payload)
        else:
            return None
    except (ValueError, UnicodeDecodeError, Exception):
        return None
    v = obj.get("value") if isinstance(obj, dict) else None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


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
_DIGITS = re.compile(rb"\d")

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
_TOPIC_CACHE: dict[str, np.ndarray] = {}
_TOPIC_CACHE_MAX = 65_536
_NO_DIGITS = str.maketrans("", "", "0123456789")


def _topic_vector(topic: str) -> np.ndarray:
    v = _TOPIC_CACHE.get(topic)
    if v is None:
        v = np.zeros(TOPIC_BUCKETS + 2, dtype=np.float32)
        levels = topic.split("/")
        for lvl in levels:
            tok = lvl.lower().translate(_NO_DIGITS)
            v[zlib.crc32(tok.encode()) % TOPIC_BUCKETS] += 1.0
        v[TOPIC_BUCKETS] = len(levels)
        v[TOPIC_BUCKETS + 1] = topic.startswith("$")
        if len(_TOPIC_CACHE) >= _TOPIC_CACHE_MAX:
            _TOPIC_CACHE.clear()
        _TOPIC_CACHE[topic] = v
    return v


def message_features(topics: Sequence[str], payloads: Sequence[bytes],
                     qos: Sequence[int] | None = None,
                     retain: Sequence[bool] | None = None) -> np.ndarray:
    """Priority features (``len(topics)`` x ``len(MESSAGE_FEATURES)``, float32)."""
    n = len(topics)
    out = np.zeros((n, len(MESSAGE_FEATURES)), dtype=np.float32)
    tb = TOPIC_BUCKETS + 2
    for i in range(n):
        out[i, :tb] = _topic_vector(topics[i])
        p = payloads[i]
        head = p[:PAYLOAD_HEAD]
        size = len(p)
        out[i, tb] = math.log2(1 + size)
        first = head[0] if head else -1
        if first == 0x7B:
            out[i, tb + 1] = 1
        elif first == 0x5B:
            out[i, tb + 2] = 1
        elif 0xA0 <= first <= 0xBF:
            out[i, tb + 3] = 1
        elif 0x20 <= first < 0x7F:
            out[i, tb + 4] = 1
        else:
            out[i, tb + 5] = 1
        if head:
            out[i, tb + 6] = len(_DIGITS.findall(head)) / len(head)
            out[i, tb + 7] = math.log1p(head.count(b","))
        for kw in set(_KW_RE.findall(head)):
            out[i, _KW_BASE + _KW_INDEX[kw]] = 1.0
    if qos is not None:
        out[:, tb + 8] = np.asarray(qos, dtype=np.float32)
    if retain is not None:
        out[:, tb + 9] = np.asarray(retain, dtype=np.float32)
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
class _Acc:
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
        self._open: dict[str, _Acc] = {}
        self._done: list[tuple[str, int, list[float]]] = []

    def _acc(self, client: str, t: float) -> _Acc:
        k = int(t // self.window)
        acc = self._open.get(client)
        if acc is None or acc.window != k:
            if acc is not None:
                self._done.append((client, acc.window, acc.row(self.window)))
            acc = self._open[client] = _Acc(k, t)
        acc.last = t
        return acc

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
