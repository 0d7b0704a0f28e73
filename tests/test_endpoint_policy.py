"""Endpoint policies: pure behaviour with injected time and seeds, config, and a real run.

The integration test puts one of two real Mosquitto upstreams behind
:class:`bench.fault_proxy.FaultProxy`, degrades it after a healthy start, and checks that
the ``bandit`` uplink moves most traffic to the healthy one and that every message arrives.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bench.fault_proxy import FaultProxy, Faults
from rapidmq_edge.config import ConfigError, parse_config
from rapidmq_edge.config.forwarding import ENDPOINT_POLICIES
from rapidmq_edge.ops.status import render
from rapidmq_edge.uplink import Backoff, UplinkClient
from rapidmq_edge.uplink.endpoint_policy import (
    POLICIES,
    BanditPolicy,
    FailureKind,
    OrderedPolicy,
    RoundRobinPolicy,
    make_policy,
)

from .conftest import LOOPBACK, MosquittoBroker
from .test_uplink import UNLIMITED, MemorySource, Subscriber, until

A, B, C = "mqtt://a:1883", "mqtt://b:1883", "mqtt://c:1883"


class Clock:
    """Injected time."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(
    policy: BanditPolicy | RoundRobinPolicy, clock: Clock, latency: Callable[[str, float], float],
    seconds: float, seed: int = 0, per_tick: int = 30, tick: float = 0.1,
) -> list[tuple[float, str]]:
    """Drive ``policy`` like the client does: acks every tick, should_switch every 0.5 s.

    ``latency(endpoint, t)`` is the endpoint's median PUBACK latency at time ``t``; each ack
    gets log-normal noise. Returns the (time, endpoint) of every connection.
    """
    rng = np.random.default_rng(seed)
    cur = policy.choose()
    policy.connected(cur)
    log = [(clock.t, cur)]
    start = clock.t
    steps = round(seconds / tick)
    for i in range(1, steps + 1):
        clock.t = start + i * tick
        lat = latency(cur, clock.t) * np.exp(rng.normal(0, 0.2, per_tick))
        policy.observe_acks(cur, lat.tolist())
        if i % 5 == 0 and policy.should_switch(cur):
            cur = policy.choose()
            policy.connected(cur)
            log.append((clock.t, cur))
    return log


def where(log: list[tuple[float, str]], t: float) -> str:
    """The endpoint connected at time ``t``."""
    return [e for at, e in log if at <= t][-1]


# =========================================================================== pure


def test_ordered_is_the_old_failover_order() -> None:
    p = OrderedPolicy([A, B, C])
    assert [p.choose() for _ in range(7)] == [A, B, C, A, B, C, A]
    p.connected(A)
    p.observe_failure(A, FailureKind.LOST, 50)
    assert not p.steers and not p.wants_latency and not p.should_switch(A)
    assert p.choose() == B  # failures do not change the order


def test_client_defaults_to_ordered() -> None:
    client = UplinkClient("up", [A, B], "gw", MemorySource())
    assert isinstance(client.policy, OrderedPolicy)
    assert [client.policy.choose() for _ in range(3)] == [A, B, A]
    with pytest.raises(ValueError, match="cover exactly"):
        UplinkClient("up", [A, B], "gw", MemorySource(), policy=OrderedPolicy([A, C]))


def test_round_robin_moves_on_after_dwell() -> None:
    clock = Clock()
    p = RoundRobinPolicy([A, B, C], dwell=5, clock=clock)
    first = p.choose()
    p.connected(first)
    clock.t = 4.9
    assert not p.should_switch(first)
    clock.t = 5.0
    assert p.should_switch(first) and p.choose() == B and p.switches == 1
    assert not RoundRobinPolicy([A], dwell=1).steers


def test_make_policy_and_config_names_agree() -> None:
    assert POLICIES == ENDPOINT_POLICIES
    assert [make_policy(n, [A, B]).name for n in POLICIES] == list(POLICIES)
    with pytest.raises(ValueError, match="unknown endpoint policy 'random'"):
        make_policy("random", [A, B])
    with pytest.raises(ValueError, match="distinct"):
        BanditPolicy([A, A])


def test_bandit_tries_each_endpoint_first_in_order() -> None:
    p = BanditPolicy([A, B, C], rng=np.random.default_rng(0))
    seen = []
    for _ in range(3):
        e = p.choose()
        seen.append(e)
        p.connected(e)
    assert seen == [A, B, C]


@pytest.mark.parametrize("seed", range(4))
def test_bandit_leaves_a_degraded_endpoint_and_comes_back(seed: int) -> None:
    clock = Clock()
    p = BanditPolicy([A, B], dwell=2, clock=clock, rng=np.random.default_rng(seed))

    def latency(e: str, t: float) -> float:
        if e == A:
            return 0.050 if 30 <= t < 70 else 0.002  # A degrades, then recovers
        return 0.080 if t >= 70 else 0.002  # B degrades when A has recovered

    log = simulate(p, clock, latency, 120, seed)
    assert where(log, 29) == A
    switched_away = [t for t, e in log if e == B and t >= 30][0]
    assert switched_away <= 40, log
    back = [t for t, e in log if e == A and t >= 70][0]
    assert back <= 90, log
    assert where(log, 120) == A
    assert len(log) <= 5, log  # no flapping in between


@pytest.mark.parametrize("seed", range(4))
def test_bandit_does_not_flap_between_equal_endpoints(seed: int) -> None:
    clock = Clock()
    p = BanditPolicy([A, B, C], dwell=5, clock=clock, rng=np.random.default_rng(seed))
    lat = {A: 0.002, B: 0.0025, C: 0.002}
    log = simulate(p, clock, lambda e, t: lat[e], 600, seed)
    assert len(log) <= 4, log  # at most a few exploratory probes in 10 minutes
    gaps = [b[0] - a[0] for a, b in zip(log, log[1:], strict=False)]
    assert all(g >= 5 for g in gaps), log  # hysteresis: never before the dwell


def test_bandit_leaves_an_endpoint_that_keeps_dropping_the_connection() -> None:
    clock = Clock()
    p = BanditPolicy([A, B], dwell=2, clock=clock, rng=np.random.default_rng(1))
    p.connected(p.choose())
    rng = np.random.default_rng(2)
    for i in range(1, 101):  # 10 s on A: same latency as B would have, but resets
        clock.t = i * 0.1
        p.observe_acks(A, (0.002 * np.exp(rng.normal(0, 0.2, 30))).tolist())
        if i % 10 == 0:
            p.observe_failure(A, FailureKind.LOST, affected=100)
    assert p.expected(A) > 5 * p.expected(B)
    assert p.should_switch(A) and p.choose() == B


def test_bandit_avoids_an_endpoint_that_refuses_connections() -> None:
    clock = Clock()
    p = BanditPolicy([A, B], clock=clock, rng=np.random.default_rng(3))
    for e in (A, B):
        assert p.choose() == e
        p.connected(e)
        p.observe_acks(e, [0.002] * 200)
    for _ in range(3):
        p.observe_failure(A, FailureKind.CONNECT)
    picks = Counter(p.choose() for _ in range(200))
    assert picks[B] >= 190, picks


def test_bandit_evidence_decays_back_to_the_prior() -> None:
    clock = Clock()
    p = BanditPolicy([A, B], dwell=5, memory=10, clock=clock, rng=np.random.default_rng(4))
    p.connected(p.choose())
    p.observe_acks(A, [0.2] * 1000)  # A looked terrible
    p.observe_acks(B, [0.002] * 1000)
    assert p.expected(A) > 0.15 and p.expected(B) < 0.004
    clock.t = 300.0  # 30 half-lives later: the evidence is gone
    snap = p.snapshot()
    assert snap["endpoints"]["0"]["url"] == A and snap["endpoints"]["0"]["evidence"] < 0.01
    # both back to the prior: "like the best endpoint lately" (B's 2 ms, relaxed 8x since)
    assert p.expected(A) == pytest.approx(p.expected(B), rel=1e-3)
    assert 0.016 < p.expected(A) < 0.08


def test_bandit_ack_latencies_are_cheap_to_record() -> None:
    p = BanditPolicy([A, B])
    p.connected(A)
    lats = [0.002] * 100
    import time

    t0 = time.perf_counter()
    for _ in range(200):
        p.observe_acks(A, lats)
    per_ack = (time.perf_counter() - t0) / 20000
    assert per_ack < 5e-6, per_ack  # generous: ~0.1 µs on a laptop


def test_status_renders_the_bandit_view() -> None:
    clock = Clock()
    p = BanditPolicy([A, B], clock=clock, rng=np.random.default_rng(0))
    p.connected(p.choose())
    p.observe_acks(A, [0.05] * 500)
    up = {"connected": True, "current_url": A, "queued": 0, "oldest_age": 0, "inflight": 0,
          "acked": 500, "drain_rate": 0.0, "endpoint_policy": p.snapshot()}
    doc = {"written_at": 1.0, "interval": 5, "gateway": "gw", "broker": {},
           "forwarding": {"queued": 0, "queued_bytes": 0, "drops": {}, "upstreams": {"up": up}}}
    text = render(doc, now=2.0)
    assert "    endpoints (bandit, 0 switches): mqtt://a:1883 ~5" in text, text
    assert ", mqtt://b:1883 ~" in text
    up["endpoint_policy"] = OrderedPolicy([A, B]).snapshot()
    assert "endpoints (" not in render(doc, now=2.0)


# =========================================================================== config


def _upstream_config(extra: str) -> dict[str, object]:
    import tomllib

    return tomllib.loads(
        '[[upstream]]\nname = "cloud"\nurls = ["mqtt://a:1883", "mqtt://b:1883"]\n' + extra
    )


def test_config_endpoint_policy(tmp_path: Path) -> None:
    cfg = parse_config(_upstream_config(""), tmp_path)
    up = cfg.forwarding.upstreams[0]
    assert (up.endpoint_policy, up.endpoint_dwell) == ("ordered", 5.0)
    cfg = parse_config(
        _upstream_config('endpoint_policy = "bandit"\nendpoint_dwell = 2.5'), tmp_path)
    up = cfg.forwarding.upstreams[0]
    assert (up.endpoint_policy, up.endpoint_dwell) == ("bandit", 2.5)


@pytest.mark.parametrize(("extra", "message"), [
    ('endpoint_policy = "fastest"', 'upstream[0].endpoint_policy: must be one of "ordered", '
                                    '"round_robin", "bandit", got "fastest"'),
    ("endpoint_dwell = 0", "upstream[0].endpoint_dwell: must be a number"),
])
def test_config_endpoint_policy_errors(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_upstream_config(extra), tmp_path)
    assert str(info.value).startswith(message), str(info.value)


def test_config_rejects_duplicate_urls(tmp_path: Path) -> None:
    data = _upstream_config("")
    data["upstream"][0]["urls"] = ["mqtt://a:1883", "mqtt://a:1883"]  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"upstream\[0\]\.urls\[1\]: duplicate URL"):
        parse_config(data, tmp_path)


# =========================================================================== real brokers


@pytest.mark.interop
@pytest.mark.timeout(60)
def test_bandit_moves_traffic_off_a_degraded_broker(
        mosquitto_factory: Callable[..., MosquittoBroker]) -> None:
    conf = UNLIMITED + "max_inflight_messages 100\nset_tcp_nodelay true\n"
    slow, healthy = mosquitto_factory(conf), mosquitto_factory(conf)
    sub_slow = Subscriber(slow.port, "up/#", 1)
    try:
        sub_healthy = Subscriber(healthy.port, "up/#", 1)
    except BaseException:
        sub_slow.close()
        raise
    try:
        _run_bandit_against(slow, healthy, sub_slow, sub_healthy)
    finally:
        sub_slow.close()
        sub_healthy.close()


def _run_bandit_against(slow: MosquittoBroker, healthy: MosquittoBroker,
                        sub_slow: Subscriber, sub_healthy: Subscriber) -> None:
    n = 3000

    async def main() -> UplinkClient:
        proxy = FaultProxy(LOOPBACK, slow.port, seed=5)
        await proxy.start()
        urls = [f"mqtt://{LOOPBACK}:{proxy.port}", f"mqtt://{LOOPBACK}:{healthy.port}"]
        policy = BanditPolicy(urls, dwell=0.5, rng=np.random.default_rng(7))
        src = MemorySource()
        client = UplinkClient("cloud", urls, "gw-bandit", src, policy=policy,
                              backoff=Backoff(0.05, 0.5), connect_timeout=2,
                              steer_interval=0.1)
        task = asyncio.create_task(client.run())
        try:
            for i in range(n):  # ~750 msg/s for 4 s
                src.put("up/b")
                if i % 15 == 14:
                    await asyncio.sleep(0.02)
                if i == 300:  # the first endpoint degrades after a healthy start
                    proxy.set(Faults(delay=0.04, jitter=0.01))
            await until(lambda: len(src.acked) == n, 20, "all acks")
        finally:
            await client.stop(drain_timeout=1)
            await asyncio.wait_for(task, 5)
            await proxy.close()
        assert not src.leased
        return client

    client = asyncio.run(main())
    asyncio.run(until(lambda: len(set(sub_slow.ids) | set(sub_healthy.ids)) >= n, 10, "all"))
    got = Counter(sub_slow.ids) + Counter(sub_healthy.ids)
    assert set(got) == set(range(n))  # nothing lost (duplicates only from a clean switch)
    assert client.switches >= 1, client.policy.snapshot()
    on_healthy = len(set(sub_healthy.ids))
    assert on_healthy >= 0.6 * n, (on_healthy, client.policy.snapshot())
