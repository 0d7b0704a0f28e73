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
#: batches (or rounds) up to this size take the scalar path (plain floats, no numpy calls):
#: per reading it costs a few µs; the vectorised path costs ~50 µs per round plus ~0.3 µs
#: per reading, so it wins from about this many readings on
SCALAR_MAX = 12
_NF = len(STREAM_FEATURES)
_LOG_EPS = math.log(1e-6)


class StreamTable:
    """Incremental per-stream state in one float64 matrix (one row per stream key).

    ``update`` returns the features of each reading computed from the state *before* the
    reading (so a spike does not hide itself), then folds the reading in. Baseline updates
    are robust: residuals are clipped at ``CLIP_SIGMA`` sigma, and a reading equal to the
    previous one does not shrink the noise estimate (a stuck sensor would otherwise make
    every later healthy reading look anomalous). The noise sigma is estimated from first
    differences (``var = EWMA(d**2) / 2``), so slow daily cycles do not inflate it.

    Two equivalent implementations: a scalar one for small batches (plain Python floats)
    and a vectorised one across streams (numpy, one round per reading of a stream); they
    agree to float64 rounding (``tests/test_features.py``).
    """

    def __init__(self, capacity: int = 256) -> None:
        self._slots: dict[str, int] = {}
        self._cap = max(1, capacity)
        self._s = np.zeros((self._cap, len(_STATE)))

    def __len__(self) -> int:
        return len(self._slots)

    def slots(self, keys: Sequence[str]) -> np.ndarray:
        """Slot indices of stream ``keys`` (new keys get fresh slots)."""
        return np.asarray(self._slot_list(keys), dtype=np.int64)

    def _slot_list(self, keys: Sequence[str]) -> list[int]:
        table = self._slots
        out = []
        for k in keys:
            s = table.get(k)
            if s is None:
                s = table[k] = len(table)
                if s >= self._cap:
                    self._grow(2 * self._cap)
            out.append(s)
        return out

    def forget(self, key: str) -> None:
        """Reset a stream's state (its slot is reused for the same key)."""
        s = self._slots.get(key)
        if s is not None:
            self._s[s] = 0.0

    def _grow(self, cap: int) -> None:
        new = np.zeros((cap, len(_STATE)))
        new[: self._cap] = self._s
        self._s = new
        self._cap = cap

    def update_keys(self, keys: Sequence[str], t: Sequence[float] | np.ndarray,
                    x: Sequence[float] | np.ndarray) -> np.ndarray:
        """:meth:`update` addressed by stream key."""
        slots = self._slot_list(keys)
        if len(slots) <= SCALAR_MAX:
            return self._scalar(slots, t, x)
        return self.update(np.asarray(slots, dtype=np.int64), np.asarray(t, float),
                           np.asarray(x, float))

    def update(self, slots: np.ndarray, t: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Features (``len(slots)`` x ``len(STREAM_FEATURES)``, float32) of readings ``x`` at
        times ``t`` (seconds; only differences matter), in batch order per stream."""
        n = len(slots)
        if n <= SCALAR_MAX:
            return self._scalar(slots.tolist(), t, x)
        out = np.zeros((n, _NF), dtype=np.float32)
        if len(set(slots.tolist())) == n:  # the usual case: one reading per stream
            self._round(slots, t, x, out, None)
            return out
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_slots)) + 1]
        group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - group_start
        for r in range(int(rank.max()) + 1):
            idx = np.flatnonzero(rank == r)
            if len(idx) <= SCALAR_MAX:
                out[idx] = self._scalar(slots[idx].tolist(), t[idx], x[idx])
            else:
                self._round(slots[idx], t[idx], x[idx], out, idx)
        return out

    def update_rows(self, keys: Sequence[str], t: Sequence[float],
                    x: Sequence[float]) -> list[list[float]]:
        """:meth:`update_keys` for a few readings (at most :data:`SCALAR_MAX`) as plain
        float rows: ``np.array(rows, dtype=np.float32)`` is exactly ``update_keys``'s
        result, so a caller can look at the rows before paying for an array."""
        return self._scalar_rows(self._slot_list(keys), t, x)

    def _scalar(self, slots: list[int], ts: Sequence[float] | np.ndarray,
                xs: Sequence[float] | np.ndarray) -> np.ndarray:
        """The same arithmetic as :meth:`_round`, one reading at a time on Python floats."""
        rows = self._scalar_rows(slots, ts, xs)
        return np.array(rows, dtype=np.float32).reshape(len(rows), _NF)

    def _scalar_rows(self, slots: list[int], ts: Sequence[float] | np.ndarray,
                     xs: Sequence[float] | np.ndarray) -> list[list[float]]:
        rows: list[list[float]] = []
        S = self._s
        if isinstance(ts, np.ndarray):
            ts = ts.tolist()
        if isinstance(xs, np.ndarray):
            xs = xs.tolist()
        log, exp, sqrt, inf = math.log, math.exp, math.sqrt, math.inf
        lim_f = FEATURE_CLIP
        for s, t, x in zip(slots, ts, xs, strict=True):
            t = float(t)
            x = float(x)
            n, n_dt, last_t, last_x, m_fast, m_slow, var, slope, log_dt_base, burst, stuck = (
                S[s].tolist())
            seen = n > 0
            if seen:
                dt = t - last_t
                if dt < 1e-6:
                    dt = 1e-6
            else:
                dt = 0.0
            log_dt_now = log(dt) if dt > 1e-6 else _LOG_EPS
            gap = seen and n_dt >= 2 and dt > RESET_GAP * exp(log_dt_base)
            live = seen and not gap
            floor = abs(m_slow) * 1e-4
            if floor < 1e-9:
                floor = 1e-9
            floor *= floor
            sig = sqrt(var if var > floor else floor)
            has_var = live and n_dt >= 1
            inv = 1.0 / sig if has_var else 0.0
            d = x - last_x
            same = live and d == 0.0
            stuck_new = stuck + 1 if same else 0.0
            rel_dt = log_dt_now - log_dt_base if seen and n_dt >= 1 else 0.0
            burst_new = burst + ALPHA_BURST * (rel_dt - burst) if live else 0.0
            row = [
                (32 if n > 32 else n) / 32.0 if not gap else 0.0,
                (x - m_fast) * inv,
                (x - m_slow) * inv,
                (d if live else 0.0) * inv,
                (m_fast - m_slow) * inv,
                slope * inv,
                20.0 if stuck_new > 20 else stuck_new,
                -8.0 if rel_dt < -8.0 else 8.0 if rel_dt > 8.0 else rel_dt,
                -8.0 if burst_new < -8.0 else 8.0 if burst_new > 8.0 else burst_new,
                1.0 if gap else 0.0,
            ]
            for j in (1, 2, 3, 4, 5):
                v = row[j]
                if v > lim_f:
                    row[j] = lim_f
                elif v < -lim_f:
                    row[j] = -lim_f
            rows.append(row)
            # ---- fold the reading in
            lim = CLIP_SIGMA * sig if n_dt >= ROBUST_AFTER and has_var else inf
            if live:
                n1 = n + 1
                w = 1.0 / n1
                af = ALPHA_FAST if w < ALPHA_FAST else w
                aslow = ALPHA_SLOW if w < ALPHA_SLOW else w
                e = x - m_fast
                new_fast = m_fast + af * (-lim if e < -lim else lim if e > lim else e)
                e = x - m_slow
                new_slow = m_slow + aslow * (-lim if e < -lim else lim if e > lim else e)
            else:
                n1 = 1.0
                new_fast = new_slow = x
            dc = -lim if d < -lim else lim if d > lim else d
            n_dt1 = n_dt + 1 if seen else n_dt
            inv_n = 1.0 / (n_dt1 if n_dt1 > 1.0 else 1.0)
            var_new = var + (ALPHA_VAR if inv_n < ALPHA_VAR else inv_n) * (
                dc * dc / 2.0 - var) if live and not same else var
            slope_new = slope + ALPHA_SLOPE * (dc - slope) if live else 0.0
            if seen:
                e = log_dt_now - log_dt_base
                if n_dt >= ROBUST_AFTER:
                    e = (-CLIP_LOG_DT_DOWN if e < -CLIP_LOG_DT_DOWN
                         else CLIP_LOG_DT_UP if e > CLIP_LOG_DT_UP else e)
                dt_new = log_dt_base + (ALPHA_DT if inv_n < ALPHA_DT else inv_n) * e
            else:
                dt_new = log_dt_base
            S[s] = (n1, n_dt1, t, x, new_fast, new_slow, var_new, slope_new, dt_new,
                    burst_new, stuck_new)
        return rows

    def _round(self, s: np.ndarray, t: np.ndarray, x: np.ndarray, out: np.ndarray,
               rows: np.ndarray | None) -> None:
        (n, n_dt, last_t, last_x, m_fast, m_slow, var, slope, log_dt_base, burst,
         stuck) = self._s[s].T

        seen = n > 0
        dt = np.where(seen, np.maximum(t - last_t, 1e-6), 0.0)
        log_dt_now = np.log(np.maximum(dt, 1e-6))
        gap = seen & (n_dt >= 2) & (dt > RESET_GAP * np.exp(log_dt_base))
        live = seen & ~gap  # readings compared against an established level
        floor = np.maximum(np.abs(m_slow) * 1e-4, 1e-9)
        sig = np.sqrt(np.maximum(var, floor * floor))
        has_var = live & (n_dt >= 1)
        inv = np.where(has_var, 1.0 / sig, 0.0)

        d = x - last_x
        same = live & (d == 0.0)
        stuck_new = np.where(same, stuck + 1, 0.0)
        rel_dt = np.where(seen & (n_dt >= 1), log_dt_now - log_dt_base, 0.0)
        burst_new = np.where(live, burst + ALPHA_BURST * (rel_dt - burst), 0.0)

        f = np.empty((len(s), _NF))
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
        f32 = f.astype(np.float32)
        np.clip(f32, -FEATURE_CLIP, FEATURE_CLIP, out=f32)
        if rows is None:
            out[:] = f32
        else:
            out[rows] = f32

        # ---- fold the reading in
        robust = n_dt >= ROBUST_AFTER
        lim = np.where(robust & has_var, CLIP_SIGMA * sig, np.inf)
        n1 = np.where(live, n + 1, 1.0)
        w = 1.0 / n1
        af, aslow = np.maximum(ALPHA_FAST, w), np.maximum(ALPHA_SLOW, w)
        new = np.empty((len(s), len(_STATE)))
        new[:, 0] = n1
        new[:, 1] = n_dt1 = np.where(seen, n_dt + 1, n_dt)
        new[:, 2] = t
        new[:, 3] = x
        new[:, 4] = np.where(live, m_fast + af * np.clip(x - m_fast, -lim, lim), x)
        new[:, 5] = np.where(live, m_slow + aslow * np.clip(x - m_slow, -lim, lim), x)
        dc = np.clip(d, -lim, lim)
        inv_n = 1.0 / np.maximum(n_dt1, 1.0)
        wv = np.maximum(ALPHA_VAR, inv_n)
        new[:, 6] = np.where(live & ~same, var + wv * (dc * dc / 2.0 - var), var)
        new[:, 7] = np.where(live, slope + ALPHA_SLOPE * (dc - slope), 0.0)
        wdt = np.maximum(ALPHA_DT, inv_n)
        lo = np.where(robust, -CLIP_LOG_DT_DOWN, -np.inf)
        hi = np.where(robust, CLIP_LOG_DT_UP, np.inf)
        new[:, 8] = np.where(seen, log_dt_base + wdt * np.clip(log_dt_now - log_dt_base, lo, hi),
                             log_dt_base)
        new[:, 9] = burst_new
        new[:, 10] = stuck_new
        self._s[s] = new


#: a flat JSON object's top-level numeric "value" (the fast path of :func:`reading_value`)
_VALUE_RE = re.compile(rb'[{,]\s*"value"\s*:\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?=\s*[,}])')


def reading_value(payload: bytes) -> float | None:
    """The numeric ``"value"`` of a JSON or CBOR map payload; None when there is none.

    A flat JSON object (one ``{``, no ``[``, ending in ``}``) is read with one regex
    instead of a full parse (~0.5 µs instead of ~3 µs); anything else is parsed.
    """
    if not payload:
        return None
    first = payload[0]
    try:
        if first == 0x7B:  # "{"
            if b'"value"' not in payload and b"\\" not in payload:
                return None  # no "value" key (json.loads would find one only if escaped)
            if payload.count(b"{") == 1 and b"[" not in payload and payload.rstrip()[-1:] == b"}":
                found = _VALUE_RE.findall(payload)
                if found:
                    f = float(found[-1])  # a repeated key: JSON keeps the last one
                    return f if math.isfinite(f) else None
            obj: Any = json.loads(payload)
        elif 0xA0 <= first <= 0xBF:  # CBOR map
            import cbor2

            obj = cbor2.loads(payload)
        else:
            return None
    except (ValueError, UnicodeDecodeError, Exception):
        return None
    v: Any = obj.get("value") if isinstance(obj, dict) else None
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
_DIGIT_BYTES = b"0123456789"
#: digits -> "0": keywords hold no digit, so a head and its template match the same keywords
#: at the same places (a digit ends a match either way)
_TEMPLATE = bytes.maketrans(_DIGIT_BYTES, b"0" * 10)
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
        tpl = head.translate(_TEMPLATE)
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

    def restart(self, client: str, t: float) -> None:
        """Forget the client's open window so far: it is judged on what it does from ``t``."""
        if client in self._open:
            self._open[client] = _Acc(int(t // self.window), t, t)

    def events(self, client: str) -> int:
        """Events (connects, disconnects, publishes, subscribes) in the client's open window."""
        acc = self._open.get(client)
        if acc is None:
            return 0
        return acc.connects + acc.disconnects + acc.publishes + acc.subscribes

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
