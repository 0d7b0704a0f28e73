"""Which of an upstream's endpoints (URLs) the uplink connects to: sans-I/O policies.

The uplink holds one connection per upstream. A policy is told what happened (acks with
their PUBACK latency, failures) and answers two questions: :meth:`EndpointPolicy.choose`
(where to connect next) and :meth:`EndpointPolicy.should_switch` (leave the current endpoint
while still connected). Time (``clock``) and randomness (``rng``) are injected.

* ``ordered``: the URLs in order, the next one after every attempt (the failover the
  uplink always had); never switches while connected.
* ``round_robin``: the same rotation, and also moves on after ``dwell`` seconds connected,
  spreading the time evenly over all endpoints.
* ``bandit``: Thompson sampling. Per endpoint, a log-normal model of PUBACK latency
  (normal-gamma posterior on log latency) and a Beta posterior on the fraction of messages
  hit by a failure; the score of an endpoint is the expected seconds a message costs there:
  ``latency + p_fail * failure_cost``. Evidence decays with a half-life of ``memory``
  seconds back to the prior, so an endpoint that degraded is tried again later and one
  that recovered wins back its traffic. The prior expects an endpoint without recent
  evidence to be as fast as the best endpoint was lately (a reference that relaxes,
  doubling every ``10 * memory`` seconds, when nothing that fast is seen).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # numpy is imported by the bandit only (22 MB RSS the others don't need)
    import numpy as np

__all__ = [
    "POLICIES",
    "BanditPolicy",
    "EndpointPolicy",
    "FailureKind",
    "OrderedPolicy",
    "RoundRobinPolicy",
    "make_policy",
]

Clock = Callable[[], float]
_MIN_EVIDENCE = 20.0  # acks (decayed) before an endpoint's mean may set the reference


class FailureKind(StrEnum):
    """What went wrong with an endpoint."""

    CONNECT = "connect"  # refused, timed out, TLS or CONNACK failure
    LOST = "lost"  # an established connection dropped (not closed by us)
    ACK_TIMEOUT = "ack_timeout"  # a PUBLISH stayed unacknowledged too long


class EndpointPolicy(Protocol):
    """The interface :class:`~rapidmq_edge.uplink.client.UplinkClient` drives."""

    name: str
    #: True if :meth:`should_switch` can ever return True (the client then checks it)
    steers: bool
    #: True if the policy uses PUBACK latencies (the client then measures them)
    wants_latency: bool

    def choose(self) -> str:
        """The endpoint to connect to next."""
        ...

    def connected(self, endpoint: str) -> None:
        """A connection to ``endpoint`` was established (CONNACK accepted)."""
        ...

    def observe_ack(self, endpoint: str, latency_s: float) -> None:
        """One message was acknowledged ``latency_s`` seconds after it was written."""
        ...

    def observe_acks(self, endpoint: str, latencies: Sequence[float]) -> None:
        """Several acknowledgements at once (same as repeated :meth:`observe_ack`)."""
        ...

    def observe_failure(self, endpoint: str, kind: FailureKind, affected: int = 1) -> None:
        """``endpoint`` failed; ``affected`` messages were in flight (or 1)."""
        ...

    def should_switch(self, current: str) -> bool:
        """True to close the connection to ``current`` cleanly and reconnect elsewhere."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """JSON-friendly state for ``rapidmq-edge status``."""
        ...


class _Base:
    """Shared bookkeeping: the endpoint list, switch counter, per-endpoint ack counts."""

    name = "base"
    steers = False
    wants_latency = False

    def __init__(self, endpoints: Sequence[str], clock: Clock = time.monotonic) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is required")
        if len(set(endpoints)) != len(endpoints):
            raise ValueError("endpoints must be distinct")
        self.endpoints = tuple(endpoints)
        self.clock = clock
        self.switches = 0
        self.acks = dict.fromkeys(self.endpoints, 0)
        self.failures = dict.fromkeys(self.endpoints, 0)
        self._current: str | None = None
        self._since = 0.0

    def _check(self, endpoint: str) -> None:
        if endpoint not in self.acks:
            raise KeyError(f"unknown endpoint {endpoint!r}")

    def connected(self, endpoint: str) -> None:
        self._check(endpoint)
        self._current = endpoint
        self._since = self.clock()

    def observe_ack(self, endpoint: str, latency_s: float) -> None:
        self.observe_acks(endpoint, (latency_s,))

    def observe_acks(self, endpoint: str, latencies: Sequence[float]) -> None:
        self.acks[endpoint] += len(latencies)

    def observe_failure(self, endpoint: str, kind: FailureKind, affected: int = 1) -> None:
        self.failures[endpoint] += 1

    def should_switch(self, current: str) -> bool:
        return False

    def snapshot(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "switches": self.switches,
            # keyed by position: URLs hold "/", which would split $SYS topic levels
            "endpoints": {
                str(i): {"url": e, "acks": self.acks[e], "failures": self.failures[e]}
                for i, e in enumerate(self.endpoints)
            },
        }


class OrderedPolicy(_Base):
    """Fixed-order failover: the next URL after every attempt, in the configured order."""

    name = "ordered"

    def __init__(self, endpoints: Sequence[str], clock: Clock = time.monotonic) -> None:
        super().__init__(endpoints, clock)
        self._idx = 0

    def choose(self) -> str:
        e = self.endpoints[self._idx]
        self._idx = (self._idx + 1) % len(self.endpoints)
        return e


class RoundRobinPolicy(OrderedPolicy):
    """Rotate through the endpoints, also every ``dwell`` seconds while connected."""

    name = "round_robin"

    def __init__(
        self, endpoints: Sequence[str], dwell: float = 5.0, clock: Clock = time.monotonic
    ) -> None:
        super().__init__(endpoints, clock)
        if dwell <= 0:
            raise ValueError("dwell must be > 0")
        self.dwell = dwell
        self.steers = len(self.endpoints) > 1

    def should_switch(self, current: str) -> bool:
        if not self.steers or current != self._current:
            return False
        if self.clock() - self._since < self.dwell:
            return False
        self.switches += 1
        return True


# --------------------------------------------------------------------------- bandit


@dataclass(slots=True)
class _Arm:
    """Decayed sufficient statistics of one endpoint."""

    n: float = 0.0  # weight of latency observations
    s1: float = 0.0  # sum of log latency
    s2: float = 0.0  # sum of squared log latency
    ok: float = 0.0  # messages acknowledged
    bad: float = 0.0  # failure weight
    at: float = 0.0  # time of the last decay
    tried: bool = False

    def decay(self, now: float, rate: float) -> None:
        dt = now - self.at
        if dt > 0:
            f = math.exp(-rate * dt)
            self.n *= f
            self.s1 *= f
            self.s2 *= f
            self.ok *= f
            self.bad *= f
        self.at = now


class BanditPolicy(_Base):
    """Thompson sampling over endpoints on PUBACK latency and failures (module docstring).

    ``choose`` draws one sample per endpoint and takes the lowest score (endpoints never
    tried go first, in order). ``should_switch`` leaves the current endpoint after
    ``dwell`` seconds if, in ``samples`` joint draws, an alternative beats it by the
    ``margin`` (``alt * (1 + margin) + min_gain < current``) with probability at least
    ``confidence``; and every ``explore`` seconds it draws once and follows that draw,
    so endpoints without recent evidence are probed now and then.
    """

    name = "bandit"
    steers = True
    wants_latency = True

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        dwell: float = 5.0,
        explore: float | None = None,
        memory: float | None = None,
        failure_cost: float = 1.0,
        connect_failure_weight: float = 100.0,
        prior_latency: float = 0.02,
        prior_sigma: float = 0.5,
        prior_spread: float = 1.0,
        prior_messages: float = 1000.0,
        margin: float = 0.25,
        min_gain: float = 0.001,
        confidence: float = 0.9,
        samples: int = 256,
        clock: Clock = time.monotonic,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__(endpoints, clock)
        memory = 2 * dwell if memory is None else memory
        if min(dwell, memory, prior_latency, prior_sigma, prior_spread) <= 0:
            raise ValueError("dwell, memory and the prior parameters must be > 0")
        if not 0.5 <= confidence < 1 or samples < 8:
            raise ValueError("confidence must be in [0.5, 1) and samples >= 8")
        self.steers = len(self.endpoints) > 1
        self.dwell = dwell
        self.explore = 12 * dwell if explore is None else explore
        self.rate = math.log(2) / memory
        self.relax = math.log(2) / (10 * memory)  # the reference's upward drift (log s / s)
        self.failure_cost = failure_cost
        self.connect_failure_weight = connect_failure_weight
        self.margin = margin
        self.min_gain = min_gain
        self.confidence = confidence
        self.samples = samples
        import numpy as np

        self.rng = rng if rng is not None else np.random.default_rng()
        # normal-gamma prior on log latency: per-message spread ``prior_sigma``, mean known
        # to within a factor exp(prior_spread); Beta prior on the failure fraction
        self.mu0 = math.log(prior_latency)
        self.kappa0 = (prior_sigma / prior_spread) ** 2
        self.a0 = 2.0
        self.b0 = self.a0 * prior_sigma**2
        self.ok0 = prior_messages
        self.bad0 = 1.0
        now = clock()
        self.arms = {e: _Arm(at=now) for e in self.endpoints}
        self._ref = self.mu0  # log latency an endpoint without evidence is expected to have
        self._ref_at = now
        self._target: str | None = None
        self._explored = now

    # -- observations

    def _arm(self, endpoint: str) -> _Arm:
        arm = self.arms[endpoint]
        arm.decay(self.clock(), self.rate)
        return arm

    def connected(self, endpoint: str) -> None:
        super().connected(endpoint)
        self.arms[endpoint].tried = True
        self._explored = self._since

    def observe_acks(self, endpoint: str, latencies: Sequence[float]) -> None:
        super().observe_acks(endpoint, latencies)
        arm = self._arm(endpoint)
        s1 = s2 = 0.0
        log = math.log
        for lat in latencies:
            x = log(lat if lat > 1e-6 else 1e-6)
            s1 += x
            s2 += x * x
        arm.n += len(latencies)
        arm.s1 += s1
        arm.s2 += s2
        arm.ok += len(latencies)

    def observe_failure(self, endpoint: str, kind: FailureKind, affected: int = 1) -> None:
        super().observe_failure(endpoint, kind, affected)
        arm = self._arm(endpoint)
        arm.tried = True
        if kind is FailureKind.CONNECT:
            arm.bad += self.connect_failure_weight
        else:
            arm.bad += max(1, affected)

    # -- posteriors

    def _update_ref(self) -> float:
        """Relax the reference upwards with time, then lower it to the best arm's mean."""
        now = self.clock()
        ref = self._ref + self.relax * max(0.0, now - self._ref_at)
        for e in self.endpoints:
            arm = self._arm(e)
            if arm.n >= _MIN_EVIDENCE:
                ref = min(ref, arm.s1 / arm.n)
        self._ref, self._ref_at = ref, now
        return ref

    def _posterior(self, arm: _Arm) -> tuple[float, float, float, float]:
        """(mu_n, kappa_n, a_n, b_n) of the normal-gamma posterior on log latency."""
        n = arm.n
        mu0 = self._ref
        kappa = self.kappa0 + n
        mu = (self.kappa0 * mu0 + arm.s1) / kappa
        a = self.a0 + n / 2
        b = self.b0
        if n > 1e-9:
            mean = arm.s1 / n
            ss = max(0.0, arm.s2 - n * mean * mean)
            b += ss / 2 + self.kappa0 * n * (mean - mu0) ** 2 / (2 * kappa)
        return mu, kappa, a, b

    def _draw(self, endpoint: str, size: int) -> np.ndarray:
        """``size`` samples of an endpoint's score (expected seconds per message)."""
        import numpy as np

        arm = self._arm(endpoint)
        mu, kappa, a, b = self._posterior(arm)
        tau = self.rng.gamma(a, 1.0 / b, size)
        m = self.rng.normal(mu, 1.0 / np.sqrt(kappa * tau))
        latency = np.exp(np.minimum(m + 0.5 / tau, 6.0))  # cap at ~400 s
        p_fail = self.rng.beta(self.bad0 + arm.bad, self.ok0 + arm.ok, size)
        return np.asarray(latency + p_fail * self.failure_cost)

    def expected(self, endpoint: str) -> float:
        """Posterior mean score of ``endpoint`` (for status and tests)."""
        self._update_ref()
        arm = self._arm(endpoint)
        mu, kappa, a, b = self._posterior(arm)
        sigma2 = b / (a - 1)  # E[1/tau]
        latency = math.exp(mu + 0.5 * sigma2 * (1 + 1 / kappa))
        p_fail = (self.bad0 + arm.bad) / (self.bad0 + arm.bad + self.ok0 + arm.ok)
        return latency + p_fail * self.failure_cost

    # -- decisions

    def choose(self) -> str:
        if self._target is not None:
            target, self._target = self._target, None
            return target
        for e in self.endpoints:
            if not self.arms[e].tried:
                return e
        self._update_ref()
        draws = {e: float(self._draw(e, 1)[0]) for e in self.endpoints}
        return min(self.endpoints, key=lambda e: draws[e])

    def _beats(self, alt: np.ndarray, cur: np.ndarray) -> np.ndarray:
        import numpy as np

        return np.asarray(alt * (1 + self.margin) + self.min_gain < cur)

    def should_switch(self, current: str) -> bool:
        if not self.steers or current != self._current:
            return False
        self._update_ref()  # also during the dwell: the reference remembers good times
        now = self.clock()
        if now - self._since < self.dwell:
            return False
        import numpy as np

        others = [e for e in self.endpoints if e != current]
        cur = self._draw(current, self.samples)
        alts = np.stack([self._draw(e, self.samples) for e in others])
        best = alts.argmin(axis=0)
        better = self._beats(alts.min(axis=0), cur)
        target: str | None = None
        if better.mean() >= self.confidence:
            target = others[int(np.bincount(best[better]).argmax())]
        elif now - self._explored >= self.explore:
            self._explored = now
            if better[0]:  # one joint draw decides an exploratory switch
                target = others[int(best[0])]
        if target is None:
            return False
        self._target = target
        self.switches += 1
        return True

    def snapshot(self) -> dict[str, Any]:
        snap = super().snapshot()
        self._update_ref()
        for i, e in enumerate(self.endpoints):
            entry = snap["endpoints"][str(i)]
            entry["expected_ms"] = round(self.expected(e) * 1000, 3)
            entry["evidence"] = round(self._arm(e).n, 1)
        return snap


#: the values of ``[[upstream]] endpoint_policy``
POLICIES = ("ordered", "round_robin", "bandit")


def make_policy(
    name: str, endpoints: Sequence[str], *, dwell: float = 5.0, clock: Clock = time.monotonic,
    rng: np.random.Generator | None = None, **bandit: Any,
) -> EndpointPolicy:
    """Build the policy called ``name`` (one of :data:`POLICIES`)."""
    if name == "ordered":
        return OrderedPolicy(endpoints, clock)
    if name == "round_robin":
        return RoundRobinPolicy(endpoints, dwell, clock)
    if name == "bandit":
        return BanditPolicy(endpoints, dwell=dwell, clock=clock, rng=rng, **bandit)
    raise ValueError(f"unknown endpoint policy {name!r} (one of {', '.join(POLICIES)})")
