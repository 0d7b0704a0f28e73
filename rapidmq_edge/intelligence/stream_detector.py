"""Online, unsupervised anomaly detector for one telemetry stream (issue 13).

:class:`StreamDetector` learns a stream as it runs (no labels, no training set) and turns
each reading ``(t seconds, value)`` into a :class:`Verdict`: a calibrated anomaly
likelihood in [0, 1], whether the reading *opens* an anomaly episode, a kind, and the value
the stream was expected to have with its usual band. :class:`DetectorTable` keeps one
detector per stream key for micro-batches of many streams; it runs the same update in C
(``_detectorstep.c``, bit for bit) when that optional extension is built.

Method, per reading:

1. **Expected value.** Three predictors run side by side: a level (EWMA) and two seasonal
   profiles keyed by wall-clock phase, one per day and one per week (``knots`` of an
   additive Holt-Winters model, linearly interpolated; the knot count follows the sampling
   step, at most :attr:`DetectorParams.day_knots` / ``week_knots``, so irregular or coarse
   sampling only changes which knots learn). A profile competes only after it has seen
   1.25 periods; the predictor with the smallest mean absolute error is used, a seasonal
   one only when it is clearly (``season_gain``) better. So a daily cycle is compared with
   the same time of day, not read as drift.
2. **Residual channels**, each a statistic on a robust scale (mean absolute residual with
   clipped updates, floored at half the stream's learnt resolution, so coarse, quantised
   metrics are judged in their own steps):
   *spike* - the change from a robust previous value (the previous reading, pulled back to
   within ``ref_clip`` scales of what was expected then, so one outlier is one spike, not
   two) beyond the profile's change; *level_shift* - the smoothed residual from the
   expected value, each residual clipped at ``level_clip`` scales (one heavy-tailed outlier
   is not a shift); *noise_change* - short vs long noise scale (log ratio); *stuck* - a run
   of equal readings ``stuck_factor`` times longer than any normal run (learnt), at least
   ``stuck_min``; *spike_rate* - the number of large changes among the last
   ``rate_window`` readings against a binomial with the stream's long-run rate.
3. **Calibration.** The spike, level and noise statistics get a tail probability from
   their own history by peaks over threshold (as in SPOT): a tracked ``q`` quantile and a
   generalised Pareto tail fitted by moments to the excesses over it (shape clamped to
   [0, ``xi_max``]), so heavy-tailed streams raise their own bar; spike_rate's is exact
   (binomial). The reading's p-value is the smallest channel p-value times the number of
   channels (Bonferroni); ``likelihood = 1 - p``.
4. **Episodes.** After ``warmup`` readings an episode opens on evidence that persists:
   the reading and the one before it both have ``p < p_open``, or the reading alone has
   ``p < p_single`` (one extreme reading). Between ``young_after`` and ``warmup`` readings,
   while the tails are still being learnt, only evidence that needs no tail opens one: a
   stuck run of ``2 * stuck_min`` readings in a stream that has never repeated a value more
   than twice in a row, a burst, or, in a stream whose residuals have stayed light-tailed
   (the largest ``|x - expected| / scale`` it has shown outside episodes since reading
   ``young_from``, counting only those up to ``young_z``, is at most ``young_light``; a
   young heavy-tailed stream cannot be told from a spike, so it waits for its tails) and
   whose values since then span at most ``young_range`` scales (a stream that has already
   moved far, e.g. through the steps of a daily cycle it cannot know yet, waits too), a
   reading more than ``young_z`` scales and ``young_k`` times that largest off what was
   expected (a spike; while the level test is on, the change from the previous reading
   over sqrt(2) scales) or a smoothed level residual above ``young_g`` scales (a shift or
   drift; while that test is on, with ``young_hold``, the stream's level and level scale
   hold for at most ``hold_readings`` into the episode, so a drift does not teach them and
   keeps reading as one). The episode stays open until ``calm_readings`` readings in a
   row have ``p >= p_calm`` and opens again inside only for a far stronger reading
   (``reopen``) or, with ``reopen_new``, for new evidence of another fault after
   ``reopen_after`` readings: a burst starting, a young stream's stuck run reaching its
   bar, its spike test firing, or its level test turning on (it turns off below half its
   bar), so a fault that follows another within an episode is an incident of its own
   while one long shift or drift stays one.
   Separately from the value channels, a *burst* (the sampling rate jumps: the smoothed
   log ratio of the usual interval to the current one, above ``burst_min`` and
   calibrated by its own tail) opens an episode when its p-value is below ``p_burst``
   (its p-value enters the likelihood scaled by ``p_open / p_burst``, and the kind is
   "burst" when it is the stronger evidence; a reading of a burst does not teach the
   burst tail, so a long burst keeps reading as one). A young stream with light tails so
   far reads, on the likelihood scale, by a Gaussian model of its residuals (the spike
   and level tests' p-values scaled so that their bars read as ``p_open``, and the chance
   of its run of equal readings at its resolution) and its stuck test, not by its own
   tails, which are not learnt yet (a stream younger than ``young_after`` by its stuck
   and burst tests alone). ``Verdict.score`` is NAB's convention: >= 0.5 only on the
   opening reading, else ``0.49 * likelihood``.

Healthy streams (daily cycles with noise, quantised values, Student-t / Laplace noise,
irregular sampling) stay quiet: 0.05-0.2 false episodes per two weeks of 5-minute readings
on each kind (``bench/anomaly_nab.py --healthy``, 20 seeds); the tests ask for none in two
weeks on every kind (seed 1), and at most one among 24 such streams (seeds 0-3).

Every update is robust (clipped residuals) except that a profile knot is set outright on
its first visit. A reading with a non-finite time or value is not learnt (its verdict is
empty). State per stream: ~50 numbers plus the two knot arrays (float64, at most
288 + 336), all fixed size.
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Callable, Hashable, Sequence
from dataclasses import astuple, dataclass
from typing import Any

DAY = 86400.0
WEEK = 7 * DAY
NAN = math.nan

#: anomaly kinds, in channel order (``Verdict.kind`` is one of them or "none"); "burst"
#: is the sampling-rate test, outside the value channels' Bonferroni family
KINDS: tuple[str, ...] = ("spike", "level_shift", "noise_change", "stuck", "spike_rate",
                          "burst")
_NCH = 5  # value channels (Bonferroni factor)
_SQRT2 = 1.4142135623730951


@dataclass(frozen=True, slots=True)
class DetectorParams:
    """One parameter set for every stream (tuned on NAB's shared files and on the healthy
    synthetic streams, see ``bench/anomaly_nab.py``)."""

    warmup: int = 300            # readings before the usual opening rule applies
    day_knots: int = 288         # knots of the daily profile, at most (5 min)
    week_knots: int = 336        # knots of the weekly profile, at most (30 min)
    a_level: float = 0.05        # EWMA weight of the non-seasonal level
    a_offset: float = 0.02       # ... of the seasonal models' level offset
    a_season: float = 0.2        # ... of a profile knot per visit
    a_err: float = 0.01          # ... of each predictor's mean |error| (model choice)
    season_gain: float = 0.8     # a seasonal predictor must have this x the error
    a_scale: float = 0.01        # ... of the residual scales (mean |residual|)
    a_smooth: float = 0.35       # ... of the smoothed level residual
    a_short: float = 0.1         # ... of the short noise scale
    clip: float = 5.0            # residuals clipped at clip x scale when learning
    ev_z: float = 3.0            # a "large" one-step change, in scales (spike_rate)
    a_rate: float = 0.1          # unused since the binomial spike_rate (kept for callers)
    a_rate_long: float = 0.002   # EWMA weight of the long-run rate of large changes
    stuck_factor: float = 3.0
    stuck_min: int = 6
    q: float = 0.98              # tail threshold quantile (peaks over threshold)
    eta_q: float = 0.05          # its tracking step
    a_excess: float = 0.015      # EWMA weight of the excess moments
    xi_max: float = 0.5          # largest generalised Pareto shape
    p_open: float = 5e-3         # p-value that opens an episode, two readings in a row
    p_calm: float = 1e-2         # p-value a calm reading stays above
    calm_readings: int = 216     # calm readings in a row that close an episode
    reopen: float = 1e-4         # inside an episode, p < p_open * reopen (and below the
    reopen_after: int = 12       # opening p * reopen, after this many readings) re-opens
    gap: float = 10.0            # dt > gap x the usual step: no one-step residual
    p_single: float = 1e-7       # p-value that opens an episode on one reading alone
    ref_clip: float = 3.0        # the spike channel's previous value, within this x scale
    level_clip: float = 5.0      # level residuals clipped at this x scale when smoothed
    rate_window: int = 25        # readings counted by spike_rate (at most 64)
    rate_floor: float = 0.005    # spike_rate's long-run rate, at least
    young_after: int = 40        # readings before a young stream may open an episode
    a_burst: float = 0.2         # EWMA weight of the log interval ratio (burst test)
    burst_min: float = 1.1       # ... that must exceed this (3x the usual rate) ...
    burst_clip: float = 3.9      # (each reading's ratio clipped at +-this) ...
    p_burst: float = 1e-4        # ... with a tail p-value below this to open an episode
    young_z: float = 6.0         # a young stream also opens on |x - expected| / scale above
    young_k: float = 3.5         # young_z and young_k x the largest seen so far (0: off),
    young_light: float = 4.5     # when that largest is at most this (light tails)
    young_g: float = 3.0         # ... or on a smoothed level residual above this x scale
    young_from: int = 30         # the largest residual counts from this reading on
    reopen_new: bool = True      # inside an episode, new evidence re-opens (see above)
    young_hold: bool = True      # a young light-tailed stream's level test holds its level
    hold_readings: int = 120     # ... for at most this many readings into an episode
    young_range: float = 40.0    # young tests only while the values' range is within this

    def __post_init__(self) -> None:
        if not (isinstance(self.rate_window, int) and 1 <= self.rate_window <= 64):
            raise ValueError("rate_window must be an int from 1 to 64")


@dataclass(slots=True)
class Verdict:
    """What one reading means for its stream."""

    score: float        # NAB-style: >= 0.5 only on an episode's opening reading
    likelihood: float   # calibrated anomaly likelihood in [0, 1] (1 - p-value)
    opens: bool         # this reading opens an anomaly episode
    in_episode: bool    # an episode is open after this reading
    kind: str           # one of KINDS, or "none" (likelihood < 0.5)
    expected: float     # the predicted value
    lo: float           # usual band around it
    hi: float


class _Tail:
    """Peaks over threshold: the ``q`` quantile ``u`` of a statistic (stochastic
    approximation) and the first two moments of its excesses over ``u``; ``p`` is the
    generalised Pareto tail probability fitted to them by moments."""

    __slots__ = ("u", "m1", "m2", "n")

    def __init__(self) -> None:
        self.u = self.m1 = self.m2 = 0.0
        self.n = 0

    def p(self, z: float, prm: DetectorParams) -> float:
        u, m = self.u, self.m1
        if z <= u:
            return 1.0
        if m <= 0.0:
            return 1.0 - prm.q
        v = self.m2 - m * m
        xi = 0.5 * (1.0 - m * m / v) if v > 0.0 else 0.0
        xi = 0.0 if xi < 0.0 else prm.xi_max if xi > prm.xi_max else xi
        sig = m * (1.0 - xi)
        if xi < 1e-6:
            return (1.0 - prm.q) * math.exp(-(z - u) / sig)
        return (1.0 - prm.q) * (1.0 + xi * (z - u) / sig) ** (-1.0 / xi)

    def learn(self, z: float, prm: DetectorParams) -> None:
        self.n += 1
        step = prm.eta_q * 0.1 * (1.0 + self.u)
        if z > self.u:
            y = z - self.u
            a = max(prm.a_excess, 1.0 / self.n)
            self.m1 += a * (y - self.m1)
            self.m2 += a * (y * y - self.m2)
            self.u += step * prm.q
        else:
            self.u -= step * (1.0 - prm.q)


def _binom_sf(k: int, w: int, pi: float) -> float:
    """P(X >= k) for X ~ Binomial(w, pi), 0 < pi < 1/2 (term by term, in the order the C
    kernel computes it)."""
    q1 = 1.0 - pi
    r = pi / q1
    term = q1 ** w
    tot = 0.0
    for j in range(1, w + 1):
        term = term * (w - j + 1) / j * r
        if j >= k:
            tot += term
    return tot


class StreamDetector:
    """The detector of one stream; feed readings in time order with :meth:`update`."""

    def __init__(self, params: DetectorParams | None = None) -> None:
        self.prm = params or DetectorParams()
        self.n = 0                  # readings seen
        self.t0 = self.last_t = self.last_x = 0.0
        self.log_step = 0.0         # EWMA of log(interval)
        self.res = math.inf         # smallest non-zero change seen (the resolution)
        self.level = 0.0
        self.err = [0.0, 0.0, 0.0]  # mean |error| of level, daily, weekly predictors
        self.off = [0.0, 0.0]       # level offsets of the daily, weekly profiles
        self.knots = (array("d"), array("d"))
        self.model = 0
        self.scale1 = self.scale2 = 0.0
        self.ref = 0.0              # robust previous value (the spike channel's reference)
        self.g = 0.0                # smoothed level residual
        self.short = 0.0            # short noise scale
        self.run = 0                # equal readings in a row
        self.run_max = 0.0          # longest normal run (slowly forgotten)
        self.bits = 0               # large changes among the last rate_window readings
        self.rate_long = 0.0        # their long-run rate
        self.burst = 0.0            # smoothed log(usual interval / interval)
        self.tails = (_Tail(), _Tail(), _Tail(), _Tail())  # spike, level, noise, burst
        self.in_episode = False
        self.calm = self.ep_len = 0
        self.ep_p = 1.0
        self.prev_p = 1.0           # the previous reading's p-value
        self.zmax = 0.0             # largest |x - expected| / scale outside episodes, young
        self.was_burst = False      # the previous reading's burst test
        self.hi = -math.inf         # largest and smallest value since young_from
        self.lo = math.inf
        self.was_light = 0          # the previous reading's light-tail test (1 or 2)
        self.lvl_on = False         # the level test is on (off below half its bar)

    def _profile(self, k: int, t: float) -> tuple[float, int, int, float]:
        """(value, knot, next knot, weight of the next) of profile ``k`` at time ``t``;
        NaN when neither knot has been visited."""
        kn = self.knots[k]
        b = len(kn)
        period = DAY if k == 0 else WEEK
        f = (t % period) / period * b
        i0 = int(f)
        w = f - i0
        i0 %= b
        i1 = (i0 + 1) % b
        k0, k1 = kn[i0], kn[i1]
        if k0 != k0:
            k0 = k1
        elif k1 != k1:
            k1 = k0
        return (1.0 - w) * k0 + w * k1, i0, i1, w

    def update_many(self, ts: Sequence[float], xs: Sequence[float]) -> list[Verdict]:
        """:meth:`update` for each reading in order."""
        return [self.update(t, x) for t, x in zip(ts, xs, strict=True)]

    def update(self, t: float, x: float) -> Verdict:
        """Score reading ``x`` at ``t`` (seconds, any epoch; the daily and weekly phases
        are taken from it) against what was learnt so far, then learn it."""
        prm = self.prm
        t = float(t)
        x = float(x)
        if not (math.isfinite(t) and math.isfinite(x)):
            lv = self.level
            return Verdict(0.0, 0.0, False, self.in_episode, "none", lv, lv, lv)
        n = self.n
        if n == 0:
            self.n = 1
            self.t0 = self.last_t = t
            self.last_x = self.level = self.ref = x
            return Verdict(0.0, 0.0, False, False, "none", x, x, x)
        dt = t - self.last_t
        if dt < 1e-6:
            dt = 1e-6
        lr = 0.0  # log(usual interval / this one)
        if n == 1:
            self.log_step = math.log(dt)
        else:
            lr = self.log_step - math.log(dt)
            lr = -prm.burst_clip if lr < -prm.burst_clip else (
                prm.burst_clip if lr > prm.burst_clip else lr)
            e = -lr
            self.log_step += 0.05 * (-0.5 if e < -0.5 else 0.5 if e > 0.5 else e)
        gap = n >= 2 and dt > prm.gap * math.exp(self.log_step)
        d = x - self.last_x
        if d != 0.0 and abs(d) < self.res:
            self.res = abs(d)
        if n == 20:  # size the profiles once the sampling step is known
            step = math.exp(self.log_step)
            for k, (period, cap) in enumerate(((DAY, prm.day_knots), (WEEK, prm.week_knots))):
                b = int(max(8, min(cap, round(period / step))))
                self.knots[k].extend([NAN] * b)
                self.off[k] = self.level
        seasonal = len(self.knots[0]) > 0
        preds = [self.level, self.level, self.level]
        prof = [(NAN, 0, 0, 0.0), (NAN, 0, 0, 0.0)]
        if seasonal:
            for k in (0, 1):
                prof[k] = pk = self._profile(k, t)
                if pk[0] == pk[0]:
                    preds[k + 1] = self.off[k] + pk[0]
        m = self.model
        xhat = preds[m]
        # --- statistics, from the state before this reading
        dprof = 0.0
        if m > 0:
            dprof = prof[m - 1][0] - self._profile(m - 1, self.last_t)[0]
            if dprof != dprof:
                dprof = 0.0
        e1 = 0.0 if gap else x - self.ref - dprof
        floor = max(self.res * 0.5 if self.res < math.inf else 0.0, 1e-9 * abs(self.level),
                    1e-12)
        s1 = max(self.scale1, floor)
        z1 = abs(e1) / s1
        r = x - xhat
        s2 = max(self.scale2, floor)
        lim2 = prm.level_clip * s2
        g = self.g + prm.a_smooth * ((-lim2 if r < -lim2 else lim2 if r > lim2 else r) - self.g)
        z2 = abs(g) / s2
        short = self.short + prm.a_short * (min(abs(e1), prm.clip * s1) - self.short)
        z3 = abs(math.log((short + floor) / (s1 + floor)))
        run = self.run + 1 if d == 0.0 and not gap else 0
        big = abs(e1) > prm.ev_z * max(max(self.scale1, self.short), 1e-12 * abs(self.level))
        bits = ((self.bits << 1) | big) & ((1 << prm.rate_window) - 1)
        p5 = 1.0
        if big:
            kb = bits.bit_count()
            pi = max(self.rate_long, prm.rate_floor)
            if kb >= 2 and pi < 0.5:
                p5 = _binom_sf(kb, prm.rate_window, pi)
        burst = self.burst + prm.a_burst * (lr - self.burst)
        tails = self.tails
        stuck = run >= max(prm.stuck_min, prm.stuck_factor * self.run_max)
        ps = (tails[0].p(z1, prm), tails[1].p(z2, prm), tails[2].p(z3, prm),
              1e-9 if stuck else 1.0, p5)
        pmin = min(ps)
        pval = min(1.0, pmin * _NCH)
        pb = tails[3].p(burst, prm) if n > 2 and burst > prm.burst_min else 1.0
        is_burst = pb < prm.p_burst
        # |x - expected| / scale; while the level test is on (the expected value may hold
        # a shifted level), the change from the previous reading / (sqrt 2 x that scale)
        zr = (0.0 if gap else abs(d) / (_SQRT2 * s2)) if self.lvl_on else abs(r) / s2
        opens = False
        light = 0  # 1: opened by the light-tail residual test, 2: by its level test
        light_ok = False  # a young stream with light-tailed residuals so far
        pl = 1.0  # their p-value under a Gaussian model, on the likelihood scale
        lkind = 0  # which of the two gives it (1 or 2)
        if n >= prm.young_after:
            mature = n >= prm.warmup
            young_stuck = (not mature and stuck and run >= 2 * prm.stuck_min
                           and self.run_max <= 2.0)
            if (not mature and self.zmax <= prm.young_light
                    and self.hi - self.lo <= prm.young_range * s2):
                light_ok = True
                if 0.0 < prm.young_z < zr and zr > prm.young_k * self.zmax:
                    light = 1
                elif 0.0 < prm.young_g < z2:
                    light = 2
                if prm.young_z > 0.0:
                    # |x - expected| / mean |residual| of a Gaussian: sd units x sqrt(2/pi)
                    e = -(zr * zr - prm.young_z * prm.young_z) / math.pi
                    pl = 1.0 if e > 50.0 else min(1.0, prm.p_open * math.exp(e))
                    lkind = 1
                if prm.young_g > 0.0:
                    # the smoothed residual's variance is a_smooth / (2 - a_smooth) x a
                    # reading's
                    e = (-(z2 * z2 - prm.young_g * prm.young_g) * (2.0 - prm.a_smooth)
                         / (math.pi * prm.a_smooth))
                    p2 = 1.0 if e > 50.0 else min(1.0, prm.p_open * math.exp(e))
                    if p2 < pl:
                        pl = p2
                        lkind = 2
                if light:
                    lkind = light  # the test over its bar names the kind
            if self.in_episode:
                self.ep_len += 1
                if self.ep_len > prm.reopen_after and (
                        (mature and pval < prm.p_open * prm.reopen
                         and pval < self.ep_p * prm.reopen)
                        or (prm.reopen_new and (
                            (light == 1 and self.was_light != 1)
                            or (light == 2 and not self.lvl_on)
                            or (is_burst and not self.was_burst)
                            or (young_stuck and run == 2 * prm.stuck_min)))):
                    opens = True
                    self.calm = self.ep_len = 0
                    self.ep_p = pval
                elif pval < prm.p_calm or is_burst:
                    self.calm = 0
                else:
                    self.calm += 1
                    if self.calm >= prm.calm_readings:
                        self.in_episode = False
            elif is_burst or light or (pval < prm.p_open and (pval < prm.p_single
                                                              or self.prev_p < prm.p_open)
                                       if mature else young_stuck):
                opens = self.in_episode = True
                self.calm = self.ep_len = 0
                self.ep_p = pval
        # --- learn
        if (prm.young_from <= n < prm.warmup and not self.in_episode
                and self.zmax < zr <= prm.young_z):
            self.zmax = zr
        self.was_burst = is_burst
        if n >= prm.young_from:
            self.hi = max(self.hi, x)
            self.lo = min(self.lo, x)
        self.was_light = light
        self.lvl_on = z2 > prm.young_g * (0.5 if self.lvl_on else 1.0)
        # while a young light-tailed stream's level test is on, its level and level scale
        # hold (a drift does not teach them: it keeps reading as one), for at most
        # hold_readings into the episode (a level held wrong, e.g. one a missed drift had
        # taught, is learnt again)
        hold = (prm.young_hold and light_ok and self.lvl_on
                and self.ep_len <= prm.hold_readings)
        self.prev_p = pval
        tails[0].learn(z1, prm)
        tails[1].learn(z2, prm)
        tails[2].learn(z3, prm)
        if n > 2 and not is_burst:  # a burst does not teach the burst tail
            tails[3].learn(burst, prm)
        self.burst = burst
        self.bits = bits
        self.rate_long += max(prm.a_rate_long, 1.0 / n) * ((1.0 if big else 0.0)
                                                            - self.rate_long)
        if n == 1:
            self.scale1, self.scale2 = abs(e1), abs(r)
        else:
            a = max(prm.a_scale, 1.0 / n)
            if not gap:
                self.scale1 += a * (min(abs(e1), prm.clip * s1) - self.scale1)
            if not hold:
                self.scale2 += a * (min(abs(r), prm.clip * s2) - self.scale2)
        self.g = g
        self.short = short
        if run == 0 and self.run > 0:
            self.run_max = max(self.run_max * 0.999, float(self.run))
        self.run = run
        lr2 = prm.ref_clip * s2
        self.ref = xhat + (-lr2 if r < -lr2 else lr2 if r > lr2 else r)
        lim = prm.clip * s2
        age = t - self.t0
        ae = prm.a_err if prm.a_err > 1.0 / n else 1.0 / n
        err = self.err
        for j in (0, 1, 2):
            if j and age < 1.25 * (DAY if j == 1 else WEEK):
                err[j] = err[0]  # not a full cycle seen yet: no better than the level
            else:
                err[j] += ae * (min(abs(x - preds[j]), lim) - err[j])
        rl = x - self.level
        if not hold:
            self.level += max(prm.a_level, 1.0 / n) * (-lim if rl < -lim else lim if rl > lim
                                                       else rl)
        if seasonal:
            for k in (0, 1):
                pv, i0, i1, w = prof[k]
                kn = self.knots[k]
                near = i0 if w < 0.5 else i1
                if kn[near] != kn[near]:
                    kn[near] = x - self.off[k]  # first visit: set outright
                if pv != pv:
                    continue
                klim = prm.clip * max(err[k + 1], floor)
                rk = x - self.off[k] - pv
                rk = -klim if rk < -klim else klim if rk > klim else rk
                self.off[k] += prm.a_offset * rk
                kn[i0] += prm.a_season * (1.0 - w) * rk
                kn[i1] += prm.a_season * w * rk
            best = 0
            if err[1] < prm.season_gain * err[0]:
                best = 1
            if err[2] < prm.season_gain * err[best]:
                best = 2
            self.model = best
        self.n = n + 1
        self.last_t, self.last_x = t, x
        # a burst reads on the likelihood scale as if p_burst were p_open; a young stream
        # with light tails is judged by the Gaussian model (its own tails are not learnt
        # yet) and its stuck test, a stream younger than young_after by its stuck test
        pbs = pb * (prm.p_open / prm.p_burst)
        untailed = light_ok or n < prm.young_after
        pv_like = (1e-9 * _NCH if stuck else 1.0) if untailed else pval
        if light_ok and not stuck and run > 0:
            # a Gaussian stream repeats a value at its resolution with probability about
            # res / (sd of a one-step change x sqrt(2 pi)), that sd = sqrt(pi / 2) x s1
            pv_like = min(1.0, self.res / (s1 * math.pi)) ** run
        pv_all = min(pv_like, pbs, pl)
        lik = 1.0 - pv_all
        if pv_all >= 0.5:
            kind = KINDS[light - 1] if opens and light else "none"
        elif pv_all < pv_like:
            kind = KINDS[5] if pbs <= pl else KINDS[lkind - 1]
        else:
            kind = KINDS[3] if untailed else KINDS[ps.index(pmin)]
        band = 4.0 * s2
        return Verdict(0.5 + 0.5 * lik if opens else 0.49 * lik, lik, opens,
                       self.in_episode, kind, xhat, xhat - band, xhat + band)


def _load_kernel() -> Any:
    """The optional C kernel (``_detectorstep.c``, built by ``pip install`` when a compiler
    is present), configured with :class:`Verdict` and :data:`KINDS`; None (the Python
    :class:`StreamDetector`) when it is not built or ``RAPIDMQ_EDGE_PURE_PYTHON`` is set."""
    if os.environ.get("RAPIDMQ_EDGE_PURE_PYTHON"):
        return None
    try:
        from . import _detectorstep  # type: ignore[attr-defined]
    except ImportError:  # not built here (no compiler): the Python detector
        return None
    _detectorstep.configure(Verdict, KINDS, DetectorParams.__slots__)
    return _detectorstep


#: the ``_detectorstep`` module, or None when :class:`DetectorTable` runs in Python
_KERNEL = _load_kernel()


class DetectorTable:
    """One detector per stream key (topic), for micro-batches: a
    :class:`StreamDetector` each, or the same state in the C kernel when it is built
    (identical verdicts)."""

    def __init__(self, params: DetectorParams | None = None) -> None:
        self.prm = params or DetectorParams()
        self._dets: dict[Hashable, Any] = {}
        self._step: Callable[..., list[Verdict]] | None = None
        if _KERNEL is not None and isinstance(self.prm, DetectorParams):
            self._step = _KERNEL.Kernel(astuple(self.prm)).update

    def __len__(self) -> int:
        return len(self._dets)

    def forget(self, key: Hashable) -> None:
        """Drop a stream's state (it is learnt again from its next reading)."""
        self._dets.pop(key, None)

    def update(self, keys: Sequence[Hashable], ts: Sequence[float],
               xs: Sequence[float]) -> list[Verdict]:
        """Verdicts of readings ``xs`` of streams ``keys`` at times ``ts``, in order."""
        if not len(keys) == len(ts) == len(xs):
            raise ValueError("keys, ts and xs must have the same length")
        dets = self._dets
        if self._step is not None:
            return self._step(dets, keys, ts, xs)
        out = []
        for k, t, x in zip(keys, ts, xs, strict=True):
            d = dets.get(k)
            if d is None:
                d = dets[k] = StreamDetector(self.prm)
            out.append(d.update(t, x))
        return out
