"""The fault-kind classifier beside the stream detector: residual features, combination.

The stream detector (:mod:`.stream_detector`) is unsupervised and self-calibrating: it
needs a few hundred readings before its tails are learnt, and an episode it opened hides
the next fault of the same stream. The **anomaly** ONNX model fills those two gaps. It
reads each reading's *residual features* (:data:`RESIDUAL_FEATURES`: the detector's own
expected value and band turned into a signed residual in scales, the change from the
previous reading, smoothed residuals and slope, the detector's p-value, kind and episode,
the run of equal readings, the resolution in scales, the interval against the usual one,
the stream's age, and the stream's own tails: this residual against the largest one
before and the share of earlier readings at least half as far out, so a 10-scale jump is
a spike in a stream that never went past 3 and an outlier in one that has shown 6s; all
scale-free) and names the fault kind (:data:`ANOMALY_LABELS`). It was trained on the
simulator's faults and on realistic healthy synthetic streams (daily and weekly cycles,
coarse values, heavy tails, irregular sampling, gaps), never on NAB (``models/train.py``).

:func:`combine` merges the two per reading (pure, no I/O):

* a **young** stream (fewer than :attr:`CombineParams.young` = 450 readings, 1.5 times
  the detector's warmup) and a reading **inside the detector's episode** are read by the
  classifier: its fault probability is the reading's likelihood (``p_fault`` reads as
  the detector's ``p_open``), its label the kind;
* the classifier **opens** an incident in a young stream (also inside an open episode,
  so a fault that follows another is an incident of its own) on evidence that persists:
  ``persist`` = 3 readings in a row over ``p_new`` = 0.35 (a drift or level shift over
  ``p_drift`` = 0.7), or one reading over ``p_spike`` = 0.7 named a spike (thresholds
  chosen on validation runs: ``bench/anomaly_select.py``); one incident per run of such
  readings, and another when the run's kind changes (``relabel``: a spike, or ``persist``
  readings in a row of another kind, in a run that opened: a fault following another);
  it stays open (``in_episode``) until ``calm_readings`` readings in a row read normal or
  the classifier stops reading the stream;
* a mature stream outside an episode reads by the detector alone, so the classifier
  never opens an incident there (real telemetry is judged by the detector).

:class:`ClassifiedTable` runs the detector table, builds the residual rows of the readings
that need the classifier, scores them in one onnxruntime run per micro-batch and combines
them in order; the verdicts do not depend on how readings are batched. The rows and the
combination run in C (``_residualstep.c``, bit for bit the Python loop) when built.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stream_detector import KINDS, DetectorParams, DetectorTable, Verdict

__all__ = ["ANOMALY_LABELS", "RESIDUAL_FEATURES", "ClassifiedTable", "CombineParams",
           "ResidualState", "combine"]

#: the classifier's labels, in output order (the simulator's fault kinds)
ANOMALY_LABELS: tuple[str, ...] = ("none", "drift", "spike", "stuck", "burst")
#: the detector's kind a classifier label is announced as
LABEL_KIND: tuple[str, ...] = ("none", "level_shift", "spike", "stuck", "burst")

#: the classifier's input columns, in order
RESIDUAL_FEATURES: tuple[str, ...] = (
    "age_log",        # log1p(readings seen before this one)
    "z",              # (x - expected) / scale (scale = the detector's band / 8), clipped
    "dz",             # (x - previous x) / scale, clipped
    "z_rel",          # |z| / the stream's mean |z| so far
    "g_fast",         # EWMA 0.3 of z clipped at +-5
    "g_slow",         # EWMA 0.05 of z clipped at +-5
    "slope",          # EWMA 0.2 of dz clipped at +-5
    "log_p",          # -log10 of the detector's p-value (1 - likelihood), at most 12
    "det_kind",       # the detector's kind: 0 none, 1 + index in KINDS
    "in_episode",     # 1 when the detector's episode was open before this reading
    "run_log",        # log1p(equal readings in a row)
    "run_ratio",      # that run / the longest run seen before (at least 1)
    "res_scales",     # the smallest change seen / scale (the resolution), at most 10
    "log_dt",         # log(interval) - the stream's usual log(interval), clipped +-5
    "burst",          # EWMA 0.2 of -log_dt
    "dt_jitter",      # the stream's mean |log_dt| so far (0: regular sampling)
    "gap",            # 1 when the interval is over 10x the usual one
    "z_max_ratio",    # |z| / the largest |z| seen before (at least 1), at most 20
    "tail_log",       # log10 of the share of readings before with |z| at least |z| / 2
    #                   ((count + 0.5) / (n + 1); 0 when |z| < 4): the stream's own tails
)
_NF = len(RESIDUAL_FEATURES)
_KIND_CODE = {k: i + 1 for i, k in enumerate(KINDS)}
_SPIKE = ANOMALY_LABELS.index("spike")
_DRIFT = ANOMALY_LABELS.index("drift")
_LN10 = math.log(10.0)
#: |z| bin edges of the tail counts (2^(1 + k/2), written out so C and Python agree)
TAIL_EDGES: tuple[float, ...] = (2.0, 2.828427, 4.0, 5.656854, 8.0, 11.313708, 16.0,
                                 22.627417, 32.0, 45.254834, 64.0)


@dataclass(frozen=True, slots=True)
class CombineParams:
    """How the classifier's word is combined with the detector's."""

    # p_new, persist, p_spike, p_drift and young were chosen on validation runs (simulator
    # seeds 3003-3006, healthy streams 30,000-30,059 and heavy-tailed ones 31,000-31,059),
    # never on the reported held-out runs or NAB: bench/anomaly_select.py
    p_fault: float = 0.3    # fault probability over which a reading reads as anomalous
    p_new: float = 0.35     # ... over which it opens (the previous reading was not over it)
    min_age: int = 20       # readings a stream needs before the classifier may open
    persist: int = 3        # readings in a row over p_new that open, or one ...
    p_spike: float = 0.7    # ... over this when the kind is spike (heavy tails' outliers)
    p_drift: float = 0.7    # a drift or level shift opens over this (young daily cycles)
    relabel: bool = True    # a fault run that opened opens again when its kind changes
    young: int = 450        # a stream younger than this reads by the classifier, which
    #                         may open incidents in it (1.5 x the detector's warmup)


class ResidualState:
    """Per stream: what the residual features need between readings (fixed size)."""

    __slots__ = ("n", "last_x", "last_t", "log_step", "res", "run", "run_max", "g_fast",
                 "g_slow", "slope", "absz", "burst", "jitter", "in_ep", "fault", "opened",
                 "open", "calm", "last_n", "zmax", "tail", "label", "same",
                 "open_label")

    def __init__(self) -> None:
        self.n = 0
        self.last_x = self.last_t = self.log_step = 0.0
        self.res = math.inf
        self.run = 0
        self.run_max = 1.0
        self.g_fast = self.g_slow = self.slope = self.absz = self.burst = 0.0
        self.jitter = 0.0
        self.in_ep = False   # the detector's episode, after the previous reading
        self.fault = 0       # readings in a row the classifier has called a fault
        self.opened = False  # ... and whether that run opened an incident
        self.label = 0       # the label of the run's last reading ...
        self.same = 0        # ... readings in a row with it
        self.open_label = 0  # the label the run's last incident opened with
        self.open = False    # an incident the classifier opened is open
        self.calm = 0
        self.last_n = -1     # the age of the last reading combined
        self.zmax = 0.0      # the largest |z| seen
        self.tail = [0] * len(TAIL_EDGES)  # readings seen with |z| >= each edge

    def row(self, t: float, x: float, v: Verdict, out: list[float]) -> None:
        """Append this reading's residual features to ``out``, then learn it."""
        n = self.n
        s = (v.hi - v.lo) * 0.125
        e = v.expected
        if not (s > 0.0 and e == e):
            s = 0.0
        if n == 0:
            dt = 0.0
            z = dz = 0.0
            ldt = 0.0
        else:
            dt = t - self.last_t
            if dt < 1e-6:
                dt = 1e-6
            if n == 1:
                self.log_step = math.log(dt)
            ldt = math.log(dt) - self.log_step
            ldt = -5.0 if ldt < -5.0 else 5.0 if ldt > 5.0 else ldt
            d = x - self.last_x
            if d != 0.0 and abs(d) < self.res:
                self.res = abs(d)
            if s > 0.0:
                z = (x - e) / s
                dz = d / s
                z = -100.0 if z < -100.0 else 100.0 if z > 100.0 else z
                dz = -100.0 if dz < -100.0 else 100.0 if dz > 100.0 else dz
            else:
                z = dz = 0.0
        gap = n >= 2 and ldt > math.log(10.0)
        run = self.run + 1 if n and x == self.last_x and not gap else 0
        az = abs(z)
        zc = -5.0 if z < -5.0 else 5.0 if z > 5.0 else z
        dzc = -5.0 if dz < -5.0 else 5.0 if dz > 5.0 else dz
        g_fast = self.g_fast + 0.3 * (zc - self.g_fast)
        g_slow = self.g_slow + 0.05 * (zc - self.g_slow)
        slope = self.slope + 0.2 * (dzc - self.slope)
        burst = self.burst + 0.2 * (-ldt - self.burst)
        p = 1.0 - v.likelihood
        lp = 12.0 if p < 1e-12 else -math.log(p) / _LN10
        res = self.res / s if s > 0.0 and self.res < math.inf else 0.0
        zr = az / (self.zmax if self.zmax > 1.0 else 1.0)
        half = 0.5 * az
        k = -1
        for j, edge in enumerate(TAIL_EDGES):
            if half >= edge:
                k = j
        tl = math.log10((self.tail[k] + 0.5) / (n + 1.0)) if k >= 0 else 0.0
        out += (math.log1p(n), z, dz, az / self.absz if self.absz > 0.0 else 0.0, g_fast,
                g_slow, slope, lp, float(_KIND_CODE.get(v.kind, 0)), float(self.in_ep),
                math.log1p(run), run / self.run_max, 10.0 if res > 10.0 else res, ldt, burst,
                self.jitter, float(gap), 20.0 if zr > 20.0 else zr, tl)
        # learn
        if n >= 2:
            self.log_step += 0.05 * (-0.5 if ldt < -0.5 else 0.5 if ldt > 0.5 else ldt)
        if run == 0 and self.run > 0 and self.run > self.run_max:
            self.run_max = float(self.run)
        self.run = run
        a = 0.02 if n > 50 else 1.0 / (n + 1)
        self.absz += a * ((az if az < 5.0 else 5.0) - self.absz)
        if az > self.zmax:
            self.zmax = az
        for j, edge in enumerate(TAIL_EDGES):
            if az >= edge:
                self.tail[j] += 1
        if n >= 2:
            aj = -ldt if ldt < 0.0 else ldt
            self.jitter += a * ((aj if aj < 3.0 else 3.0) - self.jitter)
        self.g_fast, self.g_slow, self.slope, self.burst = g_fast, g_slow, slope, burst
        self.in_ep = v.in_episode
        self.n = n + 1
        self.last_t, self.last_x = t, x


def combine(v: Verdict, st: ResidualState, probs: Sequence[float], prm: CombineParams,
            calm_readings: int, p_open: float, n: int) -> Verdict:
    """The verdict of a stream's reading ``n`` (readings before it) from the detector's
    ``v`` (updated in place and returned) and the classifier's class probabilities
    ``probs``; updates the stream's classifier state ``st``. Readings of a stream are
    combined in order; one the classifier did not read (a mature stream outside an
    episode) ends its fault run and its incident (whatever the micro-batches were)."""
    if n != st.last_n + 1:
        st.fault = st.same = 0
        st.opened = st.open = False
    st.last_n = n
    pf = 1.0 - probs[0]
    fault = pf > prm.p_fault
    new = pf > prm.p_new
    opens = by_detector = v.opens
    best = max(range(1, len(probs)), key=probs.__getitem__)
    if new:
        st.fault += 1
        if best == st.label:
            st.same += 1
        else:
            st.label, st.same = best, 1
        # persistent evidence (readings in a row) opens; a spike is one reading; a run
        # that opened opens again when its kind changes (a fault following another)
        if (not opens and prm.min_age < n + 1 <= prm.young
                and ((not st.opened and st.fault >= prm.persist
                      and (best != _DRIFT or pf > prm.p_drift))
                     or (prm.relabel and st.opened and best != st.open_label
                         and st.same >= prm.persist and (best != _DRIFT or pf > prm.p_drift))
                     or (best == _SPIKE and pf > prm.p_spike
                         and (not st.opened or (prm.relabel and st.same == 1))))):
            opens = v.opens = True
            st.opened = True
            st.open_label = best
    else:
        st.fault = st.same = 0
        st.opened = False
    if opens and not v.in_episode:
        st.open = True
        st.calm = 0
    elif st.open:
        if fault:
            st.calm = 0
        else:
            st.calm += 1
            if st.calm >= calm_readings:
                st.open = False
    # on the detector's likelihood scale: p_fault reads as its p_open (an opening of the
    # detector's keeps its own evidence)
    lik = 1.0 - p_open ** (pf / prm.p_fault)
    if by_detector and v.likelihood > lik:
        lik = v.likelihood
    v.likelihood = lik
    if fault:
        v.kind = LABEL_KIND[best]
    elif not opens:
        v.kind = "none"
    if st.open:
        v.in_episode = True
    v.score = 0.5 + 0.5 * lik if opens else 0.49 * lik
    return v


def _load_kernel() -> Any:
    """The optional C kernel (``_residualstep.c``: :meth:`ResidualState.row`, the row loop
    of :meth:`ClassifiedTable.rows` and :func:`combine`, bit for bit), configured; None
    (the Python loop) when it is not built or ``RAPIDMQ_EDGE_PURE_PYTHON`` is set."""
    if os.environ.get("RAPIDMQ_EDGE_PURE_PYTHON"):
        return None
    try:
        from . import _residualstep  # type: ignore[attr-defined]
    except ImportError:  # not built here (no compiler): the Python loop
        return None
    _residualstep.configure(KINDS, LABEL_KIND, "none")
    return _residualstep


#: the ``_residualstep`` module, or None when :class:`ClassifiedTable` runs in Python
_KERNEL = _load_kernel()


class ClassifiedTable:
    """A :class:`DetectorTable` whose young and in-episode readings are also read by the
    fault-kind classifier (``predict_proba(X) -> probabilities``, e.g. an onnxruntime
    session's; None: the detector alone)."""

    def __init__(self, params: DetectorParams | None = None,
                 predict_proba: Any = None, combine_params: CombineParams | None = None
                 ) -> None:
        self.prm = params or DetectorParams()
        self.detectors = DetectorTable(self.prm)
        self.cprm = combine_params or CombineParams(young=3 * self.prm.warmup // 2)
        self.predict_proba = predict_proba
        self._kernel = _KERNEL
        self._states: dict[Hashable, Any] = {}  # ResidualState, or the kernel's State
        self._dets = self.detectors._dets  # the stream keys (erasure looks them up here)
        self.classified = 0  # readings the classifier read

    def __len__(self) -> int:
        return len(self.detectors)

    def forget(self, key: Hashable) -> None:
        """Drop a stream's state."""
        self.detectors.forget(key)
        self._states.pop(key, None)

    def rows(self, keys: Sequence[Hashable], ts: Sequence[float], xs: Sequence[float],
             verdicts: Sequence[Verdict], every: bool = False
             ) -> tuple[list[int], np.ndarray, list[Any]]:
        """The residual rows of the readings that need the classifier (``every``: of all
        readings, for training): (their positions, float32 rows, every reading's stream
        state)."""
        states = self._states
        young = math.inf if every else self.cprm.young
        if self._kernel is not None:
            kpos, raw, ksts = self._kernel.rows(states, keys, ts, xs, verdicts, float(young))
            return kpos, np.frombuffer(raw, dtype=np.float32).reshape(len(kpos), _NF), ksts
        buf: list[float] = []
        pos: list[int] = []
        sts: list[Any] = []
        for i, (k, t, x, v) in enumerate(zip(keys, ts, xs, verdicts, strict=True)):
            st = states.get(k)
            if st is None:
                st = states[k] = ResidualState()
            sts.append(st)
            if not (math.isfinite(t) and math.isfinite(x)):
                continue
            if st.n < young or st.in_ep or v.in_episode:
                pos.append(i)
            st.row(t, x, v, buf) if (pos and pos[-1] == i) else st.row(t, x, v, [])
        X = np.asarray(buf, dtype=np.float32).reshape(len(pos), _NF)
        return pos, X, sts

    def update(self, keys: Sequence[Hashable], ts: Sequence[float],
               xs: Sequence[float]) -> list[Verdict]:
        """Combined verdicts of readings ``xs`` of streams ``keys`` at times ``ts``."""
        verdicts = self.detectors.update(keys, ts, xs)
        if self.predict_proba is None:
            return verdicts
        pos, X, sts = self.rows(keys, ts, xs, verdicts)
        if not pos:
            return verdicts
        probs_all = self.predict_proba(X)
        self.classified += len(pos)
        calm = self.prm.calm_readings
        p_open = self.prm.p_open
        cp = self.cprm
        if self._kernel is not None:
            self._kernel.combine(verdicts, pos, np.ascontiguousarray(probs_all, np.float32),
                                 X, sts, cp.p_fault, cp.p_new, float(cp.min_age),
                                 float(cp.persist), float(cp.young), float(calm), p_open,
                                 float(_SPIKE), cp.p_spike, cp.p_drift, float(cp.relabel))
            return verdicts
        ages = np.rint(np.expm1(X[:, 0].astype(np.float64))).astype(np.int64).tolist()
        for i, probs, n in zip(pos, probs_all.tolist(), ages, strict=True):
            verdicts[i] = combine(verdicts[i], sts[i], probs, cp, calm, p_open, n)
        return verdicts
