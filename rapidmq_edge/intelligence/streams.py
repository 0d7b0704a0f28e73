"""Per sensor stream state and the numeric reading of a payload: the **anomaly** model's input.

Pure numpy + stdlib, no I/O. :class:`StreamTable` keeps one small state per stream (one
topic) and turns each reading into a row of :data:`STREAM_FEATURES`;
:func:`reading_value` finds a payload's ``"value"``, and :func:`value_span` lets a caller
that already has a payload's digit template (:data:`TEMPLATE`) find it with one slice.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

#: columns of :meth:`StreamTable.update_keys` (sigma = the stream's noise estimate, see below)
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
#: a stream with this many readings since its last restart is on the fast path: it is warm,
#: its baselines are robust, and every EWMA weight but the slow level's is at its floor
#: (``n_dt >= n - 1`` always: every reading after the first counts an interval)
_STEADY = 32.0
_NF = len(STREAM_FEATURES)
_LOG_EPS = math.log(1e-6)
_ZERO = [0.0] * len(_STATE)


class Box:
    """A box of feature rows (``lo``, ``hi`` per column, inclusive) a caller does not need
    (:meth:`StreamTable.update_outside`), with its bounds for the fast path: the box
    within the features' clip limits, so an unclipped feature inside it is its own clipped
    value (a steady stream's row has warm 1 and gap 0)."""

    def __init__(self, lo: Sequence[float], hi: Sequence[float]) -> None:
        lo, hi = [float(v) for v in lo], [float(v) for v in hi]
        if len(lo) != _NF or len(hi) != _NF:
            raise ValueError(f"a box needs {_NF} lower and upper bounds")
        self.lo, self.hi = lo, hi
        lim = [FEATURE_CLIP] * 5 + [20.0, 8.0, 8.0]
        self.fast = (*(max(a, -m) for a, m in zip(lo[1:9], lim, strict=True)),
                     *(min(b, m) for b, m in zip(hi[1:9], lim, strict=True)))
        self.steady_in = lo[0] <= 1.0 <= hi[0] and lo[9] <= 0.0 <= hi[9]

    def __contains__(self, row: Sequence[float]) -> bool:
        return all(a <= v <= b for v, a, b in zip(row, self.lo, self.hi, strict=True))


class StreamTable:
    """Incremental per-stream state (eleven floats per stream key).

    :meth:`update_keys` returns the features of each reading computed from the state
    *before* the reading (so a spike does not hide itself), then folds the reading in.
    Baseline updates are robust: residuals are clipped at ``CLIP_SIGMA`` sigma, and a
    reading equal to the previous one does not shrink the noise estimate (a stuck sensor
    would otherwise make every later healthy reading look anomalous). The noise sigma is
    estimated from first differences (``var = EWMA(d**2) / 2``), so slow daily cycles do
    not inflate it.

    The state is plain Python floats and readings are folded in one at a time, in batch
    order (~2 µs a reading; numpy costs more than that per call at micro-batch sizes, and
    the conversions to and from arrays as much again). A stream past its warm-up takes a
    fast path with the branches of the general update (:func:`_scalar_step`) decided,
    run by an optional C kernel when it is built (same results bit for bit, ~5x faster).
    """

    def __init__(self) -> None:
        self._rows: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def forget(self, key: str) -> None:
        """Reset a stream's state."""
        if key in self._rows:
            self._rows[key] = list(_ZERO)

    def update_keys(self, keys: Sequence[str], t: Sequence[float] | np.ndarray,
                    x: Sequence[float] | np.ndarray) -> np.ndarray:
        """Features (``len(keys)`` x ``len(STREAM_FEATURES)``, float32) of readings ``x`` of
        streams ``keys`` at times ``t`` (seconds; only differences matter)."""
        rows = self.update_rows(keys, t, x)
        return np.array(rows, dtype=np.float32).reshape(len(rows), _NF)

    def update_rows(self, keys: Sequence[str], ts: Sequence[float] | np.ndarray,
                    xs: Sequence[float] | np.ndarray) -> list[list[float]]:
        """:meth:`update_keys` as plain float rows (``np.array(rows, dtype=np.float32)`` is
        exactly its result)."""
        return self.update_outside(keys, np.asarray(ts, float).tolist(),
                                   np.asarray(xs, float).tolist(), None)[1]

    def update_outside(self, keys: Sequence[str], ts: Sequence[float], xs: Sequence[float],
                       box: Box | None) -> tuple[list[int], list[list[float]]]:
        """Fold every reading in (``ts`` and ``xs`` Python floats); return the positions and
        float rows of the readings whose row is *not* inside ``box`` (every reading when
        ``box`` is None). NaN is never inside. The box is checked on the float64 row: with
        float32 bounds, a row inside has its float32 rounding inside too. On the fast path
        it is checked before the features' clipping, within the clip limits (a row it
        calls outside is only scored, which changes no label)."""
        table = self._rows
        pos: list[int] = []
        rows: list[list[float]] = []
        start = 0
        if _KERNEL is not None:  # the same loop in C (_streamstep.c), bit for bit
            stop = _KERNEL(table, keys, ts, xs, box, pos, rows)
            if stop is None:
                return pos, rows
            # a state or value that is not a plain float: the rest goes through Python
            start, keys, ts, xs = stop, keys[stop:], ts[stop:], xs[stop:]
        keep, append = pos.append, rows.append
        log, exp, sqrt = math.log, math.exp, math.sqrt
        lim_f = FEATURE_CLIP
        steady, reset_gap, log_eps, a_burst = _STEADY, RESET_GAP, _LOG_EPS, ALPHA_BURST
        if box is not None:
            l1, l2, l3, l4, l5, l6, l7, l8, h1, h2, h3, h4, h5, h6, h7, h8 = box.fast
            steady_in = box.steady_in
        for i, (k, t, x) in enumerate(zip(keys, ts, xs, strict=True), start):
            st = table.get(k)
            if st is None:
                st = _ZERO
            n, n_dt, last_t, last_x, m_fast, m_slow, var, slope, log_dt_base, burst, stuck = st
            if n >= steady:
                dt = t - last_t
                if dt < 1e-6:
                    dt = 1e-6
                if dt <= reset_gap * exp(log_dt_base):
                    # steady and live (no gap): _scalar_step's arithmetic with its branches
                    # decided (has_var, robust clipping, weights at their floor, warm 1)
                    log_dt_now = log(dt) if dt > 1e-6 else log_eps
                    floor = abs(m_slow) * 1e-4
                    if floor < 1e-9:
                        floor = 1e-9
                    floor *= floor
                    sig = sqrt(var if var > floor else floor)
                    inv = 1.0 / sig
                    d = x - last_x
                    stuck_new = stuck + 1 if d == 0.0 else 0.0
                    rel_dt = log_dt_now - log_dt_base
                    burst_new = burst + a_burst * (rel_dt - burst)
                    z1 = (x - m_fast) * inv
                    z2 = (x - m_slow) * inv
                    z3 = d * inv
                    z4 = (m_fast - m_slow) * inv
                    z5 = slope * inv
                    if box is None or not (
                            steady_in and l1 <= z1 <= h1 and l2 <= z2 <= h2
                            and l3 <= z3 <= h3 and l4 <= z4 <= h4 and l5 <= z5 <= h5
                            and l6 <= stuck_new <= h6 and l7 <= rel_dt <= h7
                            and l8 <= burst_new <= h8):
                        keep(i)
                        append([
                            1.0,
                            lim_f if z1 > lim_f else -lim_f if z1 < -lim_f else z1,
                            lim_f if z2 > lim_f else -lim_f if z2 < -lim_f else z2,
                            lim_f if z3 > lim_f else -lim_f if z3 < -lim_f else z3,
                            lim_f if z4 > lim_f else -lim_f if z4 < -lim_f else z4,
                            lim_f if z5 > lim_f else -lim_f if z5 < -lim_f else z5,
                            20.0 if stuck_new > 20 else stuck_new,
                            -8.0 if rel_dt < -8.0 else 8.0 if rel_dt > 8.0 else rel_dt,
                            -8.0 if burst_new < -8.0 else 8.0 if burst_new > 8.0 else burst_new,
                            0.0,
                        ])
                    lim = CLIP_SIGMA * sig
                    nlim = -lim
                    e = x - m_fast
                    new_fast = m_fast + ALPHA_FAST * (nlim if e < nlim else lim if e > lim else e)
                    e = x - m_slow
                    w = 1.0 / (n + 1)
                    new_slow = m_slow + (ALPHA_SLOW if w < ALPHA_SLOW else w) * (
                        nlim if e < nlim else lim if e > lim else e)
                    dc = nlim if d < nlim else lim if d > lim else d
                    e = (-CLIP_LOG_DT_DOWN if rel_dt < -CLIP_LOG_DT_DOWN
                         else CLIP_LOG_DT_UP if rel_dt > CLIP_LOG_DT_UP else rel_dt)
                    table[k] = [n + 1, n_dt + 1, t, x, new_fast, new_slow,
                                var + ALPHA_VAR * (dc * dc / 2.0 - var) if d != 0.0 else var,
                                slope + ALPHA_SLOPE * (dc - slope),
                                log_dt_base + ALPHA_DT * e, burst_new, stuck_new]
                    continue
            row, table[k] = _scalar_step(st, t, x)
            if box is None or row not in box:
                keep(i)
                append(row)
        return pos, rows


def _scalar_step(st: Sequence[float], t: float, x: float) -> tuple[list[float], list[float]]:
    """One reading on one stream state, every case: (features, new state)."""
    log, exp, sqrt, inf = math.log, math.exp, math.sqrt, math.inf
    lim_f = FEATURE_CLIP
    n, n_dt, last_t, last_x, m_fast, m_slow, var, slope, log_dt_base, burst, stuck = st
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
    return row, [float(n1), float(n_dt1), t, x, new_fast, new_slow, var_new, slope_new,
                 dt_new, burst_new, stuck_new]


def _load_kernel() -> Callable[..., int | None] | None:
    """The optional C kernel of :meth:`StreamTable.update_outside` (``_streamstep.c``,
    built by ``pip install`` when a compiler is present), configured with this module's
    constants and general update; None (the Python loop) when it is not built or
    ``RAPIDMQ_EDGE_PURE_PYTHON`` is set."""
    if os.environ.get("RAPIDMQ_EDGE_PURE_PYTHON"):
        return None
    try:
        from . import _streamstep  # type: ignore[attr-defined]
    except ImportError:  # not built here (no compiler): the Python loop
        return None
    _streamstep.configure(
        (_STEADY, RESET_GAP, _LOG_EPS, ALPHA_FAST, ALPHA_SLOW, ALPHA_VAR, ALPHA_SLOPE,
         ALPHA_DT, ALPHA_BURST, CLIP_SIGMA, CLIP_LOG_DT_DOWN, CLIP_LOG_DT_UP, FEATURE_CLIP),
        _scalar_step, _ZERO)
    return _streamstep.update_outside  # type: ignore[no-any-return]


#: ``_streamstep.update_outside``, or None when the Python loop is in use
_KERNEL = _load_kernel()


# =========================================================================== readings

#: a flat JSON object's top-level numeric "value" (the fast path of :func:`reading_value`)
_VALUE_RE = re.compile(rb'[{,]\s*"value"\s*:\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?=\s*[,}])')
#: digits -> "0" (``payload.translate(TEMPLATE)``): a payload's *template*; the payloads of
#: one template differ only in their digits
TEMPLATE = bytes.maketrans(b"0123456789", b"0" * 10)
#: :func:`value_span` of a template whose payloads need :func:`reading_value` in full, and
#: of one whose payloads have no reading
PARSE, NO_VALUE = (-1, -1), (-2, -2)


def _flat_json(payload: bytes) -> bool:
    """A flat JSON object: one ``{``, no ``[``, ending in ``}`` (digit-independent)."""
    return (payload.count(b"{") == 1 and b"[" not in payload
            and payload.rstrip()[-1:] == b"}")


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
            if _flat_json(payload):
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


_TS_RE = re.compile(rb'"ts"\s*:\s*(?:(-?[0-9][0-9.eE+-]*)|"([^"\\]{1,64})")')


def reading_time(payload: bytes) -> float | None:
    """The device's own time of a reading, in epoch seconds: a JSON ``"ts"`` (or a CBOR map's
    ``ts``) as epoch seconds, epoch milliseconds (above 1e11), or an RFC 3339 string; None
    when there is none or it does not parse."""
    if not payload:
        return None
    v: Any
    if payload[0] == 0x7B:  # "{"
        if b'"ts"' not in payload:
            return None
        m = _TS_RE.search(payload)
        if m is None:
            return None
        v = m.group(1).decode() if m.group(1) is not None else m.group(2).decode()
        if m.group(1) is not None:
            try:
                v = float(v)
            except ValueError:
                return None
    elif 0xA0 <= payload[0] <= 0xBF:  # CBOR map
        try:
            import cbor2

            obj = cbor2.loads(payload)
        except Exception:  # noqa: BLE001 - not a reading with a time
            return None
        v = obj.get("ts") if isinstance(obj, dict) else None
    else:
        return None
    if isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v) / 1000.0 if abs(v) > 1e11 else float(v)


def value_span(template: bytes) -> tuple[int, int]:
    """Where :func:`reading_value` finds the number in every payload whose whole
    ``payload.translate(TEMPLATE)`` is ``template``: ``(start, end)`` for the flat-JSON fast
    path (``float(payload[start:end])``, not finite -> None), :data:`NO_VALUE` when such
    payloads have no reading, :data:`PARSE` when each must be parsed.

    Exact because every test of the fast path is blind to which digit a byte is: a digit
    and its "0" match the same classes of the regex, and no other byte changes.
    """
    if not template:
        return NO_VALUE
    first = template[0]
    if first == 0x7B:
        if b'"value"' not in template and b"\\" not in template:
            return NO_VALUE
        if _flat_json(template):
            last = None
            for last in _VALUE_RE.finditer(template):  # noqa: B007 (the last one counts)
                pass
            if last is not None:
                return last.span(1)
        return PARSE
    if 0xA0 <= first <= 0xBF:
        return PARSE
    return NO_VALUE
