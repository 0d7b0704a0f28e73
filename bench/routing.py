"""Endpoint choice under a degraded endpoint: ``ordered`` vs ``round_robin`` vs ``bandit``.

Two real Mosquitto brokers (A, B; ``set_tcp_nodelay true``, ``max_inflight_messages 100``)
each sit behind a :class:`bench.fault_proxy.FaultProxy` run by this process. For every
scenario the three policies run at the same time, each in its own subprocess: an
:class:`~rapidmq_edge.uplink.UplinkClient` (window 100, URLs ``[A, B]``) fed a steady stream
of ``--rate`` QoS 1 messages/s (64 B) for ``--duration`` s plus a burst of ``--burst``
messages put at once while A is degraded. The proxies follow the scenario's schedule:

* ``slow``: A gets +50 ms ± 10 ms on the PUBACK path from 10 s on (no errors at all);
* ``flaky``: A gets +50 ms ± 10 ms, 0.1 resets/s per connection and 10 % refused
  connections from 10 s to 30 s, then recovers;
* ``shifting``: A as in ``flaky`` from 10 s to 25 s; then A recovers and B degrades the same
  way until the end.

Reported per policy: end-to-end latency (put → PUBACK, so it includes waiting out a
reconnect) p50/p99/p99.9/max, PUBACK round trip (last write → PUBACK) p50/p99/p99.9, the
delivered rate, the burst's drain rate, the share of messages acknowledged through a
degraded endpoint while it was degraded, switches/reconnects, and lost messages (must be 0).
Ratios are against ``ordered`` (today's failover). The ``assignment`` section evaluates a
simulated-annealing (QUBO-style) assignment of streams to endpoints against exhaustive
search and against "everything on the best endpoint", on a queueing model fitted to the
measured round trips (see docs/benchmarks.md, "Endpoint choice").

Usage::

    .venv/bin/python bench/routing.py                      # ~2.5 min
    .venv/bin/python bench/routing.py --duration 20 --scenarios slow   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fault_proxy import FaultProxy, Faults  # noqa: E402
from rapidmq_edge.uplink import Outgoing  # noqa: E402

HOST = "127.0.0.1"
POLICIES = ("ordered", "round_robin", "bandit")
DEGRADED = Faults(delay=0.05, jitter=0.01, reset_rate=0.1, refuse=0.1)
SLOW = Faults(delay=0.05, jitter=0.01)
HEALTHY = Faults()
# scenario -> list of (start s, endpoint index, faults)
SCENARIOS: dict[str, list[tuple[float, int, Faults]]] = {
    "slow": [(10, 0, SLOW)],
    "flaky": [(10, 0, DEGRADED), (30, 0, HEALTHY)],
    "shifting": [(10, 0, DEGRADED), (25, 0, HEALTHY), (25, 1, DEGRADED)],
}
BURST_AT = 15.0


# --------------------------------------------------------------------------- child


class RateSource:
    """In-memory queue recording put, write (fetch) and ack times per message."""

    def __init__(self) -> None:
        self.put_at: list[float] = []
        self.sent_at: list[float] = []
        self.acked_at: list[float] = []
        self.via: list[str] = []
        self.ready: list[int] = []
        self.leased: set[int] = set()
        self.requeued = 0
        self.event = asyncio.Event()
        self.client: Any = None

    def put(self, n: int = 1) -> None:
        now = time.monotonic()
        for _ in range(n):
            i = len(self.put_at)
            self.put_at.append(now)
            self.sent_at.append(0.0)
            self.acked_at.append(0.0)
            self.via.append("")
            heapq.heappush(self.ready, i)
        self.event.set()

    def fetch(self, upstream: str, limit: int) -> list[Outgoing]:

        now = time.monotonic()
        out: list[Outgoing] = []
        while self.ready and len(out) < limit:
            i = heapq.heappop(self.ready)
            self.leased.add(i)
            self.sent_at[i] = now
            out.append(Outgoing(i, "bench/routing", b"%08d" % i + b"." * 56, 1))
        return out

    def ack(self, upstream: str, ids: list[int]) -> None:
        now = time.monotonic()
        url = self.client.current_url or ""
        for i in ids:
            self.leased.discard(i)
            if not self.acked_at[i]:
                self.acked_at[i] = now
                self.via[i] = url

    def drop(self, upstream: str, ids: list[int], reason: str) -> None:
        raise AssertionError(f"bench messages dropped ({reason}): {ids[:5]}")

    def requeue(self, upstream: str, ids: list[int]) -> None:
        for i in ids:
            self.leased.discard(i)
            heapq.heappush(self.ready, i)
        self.requeued += len(ids)
        self.event.set()

    async def wait_for_data(self, upstream: str) -> None:
        while not self.ready:
            self.event.clear()
            await self.event.wait()


def _pct(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2) if len(values) else float("nan")


async def _child(cfg: dict[str, Any]) -> dict[str, Any]:
    from rapidmq_edge.uplink import Backoff, UplinkClient
    from rapidmq_edge.uplink.endpoint_policy import make_policy

    urls: list[str] = cfg["urls"]
    policy = make_policy(cfg["policy"], urls, dwell=cfg["dwell"],
                         rng=np.random.default_rng(cfg["seed"]))
    src = RateSource()
    client = UplinkClient(
        "bench", urls, f"routing-{cfg['policy']}", src, window=100, keep_alive=10,
        backoff=Backoff(0.1, 2.0, rand=random.Random(cfg["seed"]).random), connect_timeout=2,
        policy=policy,
    )
    src.client = client
    t0 = cfg["t0"]  # CLOCK_MONOTONIC is system-wide: the parent's schedule uses the same t0
    connections: list[tuple[float, str]] = []
    on_connect = policy.connected

    def connected(endpoint: str) -> None:
        connections.append((round(time.monotonic() - t0, 2), chr(65 + urls.index(endpoint))))
        on_connect(endpoint)

    policy.connected = connected  # type: ignore[method-assign]
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    task = asyncio.create_task(client.run())
    rate, duration = cfg["rate"], cfg["duration"]
    tick = 0.01
    burst_first = -1
    k = 0
    while (now := time.monotonic()) < t0 + duration:
        due = int((now - t0) * rate) - k
        if due > 0:
            src.put(due)
            k += due
        if burst_first < 0 and now - t0 >= BURST_AT:
            burst_first = len(src.put_at)
            src.put(cfg["burst"])
        await asyncio.sleep(tick)
    n = len(src.put_at)
    deadline = time.monotonic() + 30
    while any(a == 0.0 for a in src.acked_at) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await client.stop(drain_timeout=1)
    await asyncio.wait_for(task, 10)

    put = np.array(src.put_at) - t0
    acked = np.array(src.acked_at)
    ok = acked > 0
    steady = ok.copy()  # the burst is measured by its drain rate, not in the latencies
    if burst_first >= 0:
        steady[burst_first:burst_first + cfg["burst"]] = False
    lat = acked - np.array(src.put_at)
    e2e = lat[steady]
    rtt = (acked - np.array(src.sent_at))[steady]
    bounds = sorted({0.0, duration, *(float(s) for s, _, _ in cfg["schedule"])})
    phases = {
        f"{lo:g}-{hi:g}s": _pct(lat[steady & (put >= lo) & (put < hi)], 99)
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    }
    via = np.array(src.via)
    # messages acked through an endpoint while the schedule had it degraded
    windows: list[tuple[float, float, str]] = []
    sched = cfg["schedule"]
    for start, idx, faults in sched:
        if faults == [0.0, 0.0, 0.0, 0.0]:
            continue
        ends = [s for s, j, f in sched if j == idx and s > start]
        windows.append((start, min(ends) if ends else math.inf, urls[idx]))
    ack_t = acked - t0
    bad = np.zeros(n, dtype=bool)
    in_window = np.zeros(n, dtype=bool)
    for lo, hi, url in windows:
        w = ok & (ack_t >= lo) & (ack_t < hi)
        in_window |= w
        bad |= w & (via == url)
    burst = slice(burst_first, burst_first + cfg["burst"]) if burst_first >= 0 else slice(0)
    burst_done = float(acked[burst].max() - np.array(src.put_at)[burst].min()) \
        if burst_first >= 0 and ok[burst].all() else float("nan")
    return {
        "policy": cfg["policy"],
        "messages": n,
        "lost": int(n - ok.sum()),
        "e2e_ms": {"p50": _pct(e2e, 50), "p99": _pct(e2e, 99), "p999": _pct(e2e, 99.9),
                   "max": _pct(e2e, 100)},
        "e2e_p99_ms_by_phase": phases,
        "puback_rtt_ms": {"p50": _pct(rtt, 50), "p99": _pct(rtt, 99), "p999": _pct(rtt, 99.9)},
        "delivered_msg_per_s": round(float(ok.sum()) / float(ack_t[ok].max() - put.min()), 1),
        "burst_msg_per_s": round(cfg["burst"] / burst_done, 1) if burst_done > 0 else None,
        "via_degraded_share": round(float(bad.sum()) / max(1, int(in_window.sum())), 3),
        "acked_via": {f"{chr(65 + i)}": int((via == u).sum()) for i, u in enumerate(urls)},
        "switches": client.switches,
        "reconnects": client.reconnects,
        "requeued": src.requeued,
        "connections": connections,
    }


# --------------------------------------------------------------------------- parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _mosquitto(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    conf = tmp / f"m{port}.conf"
    conf.write_text(
        f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
        "max_inflight_messages 100\nset_tcp_nodelay true\nlog_dest none\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


async def _scenario(
    name: str, proxies: list[FaultProxy], args: argparse.Namespace
) -> dict[str, Any]:
    urls = [f"mqtt://{HOST}:{p.port}" for p in proxies]
    for p in proxies:
        p.set(HEALTHY)
    schedule = SCENARIOS[name]
    t0 = time.monotonic() + 3.0  # children import first; the clock starts for all at once
    children = []
    for i, policy in enumerate(POLICIES):
        cfg = {"policy": policy, "urls": urls, "rate": args.rate, "duration": args.duration,
               "burst": args.burst, "dwell": args.dwell, "seed": args.seed + i,
               "t0": t0, "schedule": [
                   [s, j, [f.delay, f.jitter, f.reset_rate, f.refuse]] for s, j, f in schedule]}
        children.append(await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--child", json.dumps(cfg),
            stdout=asyncio.subprocess.PIPE))
    for start, idx, faults in sorted(schedule, key=lambda x: x[0]):
        await asyncio.sleep(max(0.0, t0 + start - time.monotonic()))
        proxies[idx].set(faults)
    outs = await asyncio.gather(*(c.communicate() for c in children))
    results = {r["policy"]: r for r in (json.loads(o[0]) for o in outs)}
    ref = results["ordered"]
    for r in results.values():
        r["vs_ordered"] = {
            "e2e_p99": _ratio(r["e2e_ms"]["p99"], ref["e2e_ms"]["p99"]),
            "e2e_p999": _ratio(r["e2e_ms"]["p999"], ref["e2e_ms"]["p999"]),
            "burst_rate": _ratio(r["burst_msg_per_s"], ref["burst_msg_per_s"]),
        }
    return results


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# --------------------------------------------------------------------------- assignment


def _cost(assign: tuple[int, ...], rates: list[float], rtt: list[float],
          cap: list[float]) -> float:
    """Mean latency (s) per message: M/M/1-style ``rtt / (1 - load / capacity)`` per endpoint."""
    load = [0.0] * len(rtt)
    for s, e in enumerate(assign):
        load[e] += rates[s]
    total = 0.0
    for e, lo in enumerate(load):
        if lo >= cap[e]:
            return math.inf
        total += lo * rtt[e] / (1 - lo / cap[e])
    return total / sum(rates)


def _anneal(rates: list[float], rtt: list[float], cap: list[float], steps: int,
            rng: random.Random) -> tuple[tuple[int, ...], float]:
    """Simulated annealing over one-hot stream → endpoint assignments (the QUBO's feasible
    set; infeasible loads cost a large finite penalty so the walk can cross them)."""
    def f(a: tuple[int, ...]) -> float:
        c = _cost(a, rates, rtt, cap)
        return c if math.isfinite(c) else 10.0
    cur = tuple(rng.randrange(len(rtt)) for _ in rates)
    fc = f(cur)
    best, fb = cur, fc
    t_hi, t_lo = max(rtt), min(rtt) / 100
    for k in range(steps):
        temp = t_hi * (t_lo / t_hi) ** (k / steps)
        s = rng.randrange(len(rates))
        cand = cur[:s] + (rng.randrange(len(rtt)),) + cur[s + 1:]
        fn = f(cand)
        if fn <= fc or rng.random() < math.exp((fc - fn) / temp):
            cur, fc = cand, fn
            if fc < fb:
                best, fb = cur, fc
    return best, fb


def _greedy(rates: list[float], rtt: list[float], cap: list[float]) -> tuple[int, ...]:
    """Largest stream first, each to the endpoint where it adds the least cost."""
    assign = [0] * len(rates)
    placed: list[int] = []
    for s in sorted(range(len(rates)), key=lambda i: -rates[i]):
        placed.append(s)
        best_e, best_c = 0, math.inf
        for e in range(len(rtt)):
            assign[s] = e
            sub = [rates[i] if i in placed else 0.0 for i in range(len(rates))]
            c = _cost(tuple(assign), sub, rtt, cap) if sum(sub) else 0.0
            if c < best_c:
                best_e, best_c = e, c
        assign[s] = best_e
    return tuple(assign)


def _ms(cost: float) -> float | str:
    return round(cost * 1000, 3) if math.isfinite(cost) and cost < 10 else "overloaded"


def assignment_study(cases: dict[str, tuple[float, float, float]], window: int = 100,
                     seed: int = 0) -> dict[str, Any]:
    """For each case (degraded RTT s, healthy RTT s, offered msg/s) split over 12 streams:
    all on the healthiest endpoint vs greedy vs exhaustive (2^12) vs simulated annealing."""
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    for label, (rtt_bad, rtt_good, total) in cases.items():
        rtt = [rtt_bad, rtt_good]
        cap = [window / r for r in rtt]  # Little: at most `window` in flight per round trip
        rates = [0.5 + i / 12 for i in range(12)]
        rates = [r * total / sum(rates) for r in rates]
        t = time.perf_counter()
        exact = min(itertools.product(range(2), repeat=len(rates)),
                    key=lambda a: _cost(a, rates, rtt, cap))
        t_exact = time.perf_counter() - t
        exact_cost = _cost(exact, rates, rtt, cap)
        t = time.perf_counter()
        _, sa_cost = _anneal(rates, rtt, cap, 20000, rng)
        t_sa = time.perf_counter() - t
        out[label] = {
            "rtt_ms": [round(r * 1000, 2) for r in rtt],
            "capacity_msg_per_s": [round(c) for c in cap],
            "offered_msg_per_s": round(total),
            "mean_latency_ms": {
                "all_on_best": _ms(_cost((1,) * len(rates), rates, rtt, cap)),
                "greedy": _ms(_cost(_greedy(rates, rtt, cap), rates, rtt, cap)),
                "exhaustive": _ms(exact_cost),
                "annealing": _ms(sa_cost),
            },
            "exhaustive_streams_on_degraded": sum(1 for e in exact if e == 0),
            "annealing_beats_exhaustive": bool(
                math.isfinite(exact_cost) and sa_cost < exact_cost - 1e-12),
            "solve_ms": {"exhaustive": round(t_exact * 1000, 1),
                         "annealing_20k": round(t_sa * 1000, 1)},
        }
    return out


# --------------------------------------------------------------------------- main


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="routing-bench-"))
    brokers = [_mosquitto(tmp) for _ in range(2)]
    proxies = [FaultProxy(HOST, port, seed=args.seed + i) for i, (_, port) in enumerate(brokers)]
    for p in proxies:
        await p.start()
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    try:
        for name in args.scenarios:
            results[name] = await _scenario(name, proxies, args)
    finally:
        for p in proxies:
            await p.close()
        for proc, _ in brokers:
            proc.terminate()
            proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    rtts = [r["puback_rtt_ms"]["p50"] for s in results.values() for r in s.values()]
    healthy = min(rtts) / 1000 if rtts else 0.001
    degraded = healthy + DEGRADED.delay + DEGRADED.jitter / 2
    return {
        "bench": "routing",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "config": {"rate_msg_per_s": args.rate, "duration_s": args.duration,
                   "burst": args.burst, "burst_at_s": BURST_AT, "dwell_s": args.dwell,
                   "window": 100, "seed": args.seed,
                   "degraded": {"delay_ms": 50, "jitter_ms": 10, "resets_per_s": 0.1,
                                "refused": 0.1}},
        "scenarios": results,
        "assignment": assignment_study({
            # this run's measured round trips and offered load (3 streams of `rate` each)
            "measured": (degraded, healthy, 3 * args.rate),
            # a WAN: 40 ms healthy, 90 ms degraded; 1000 msg/s, then 3000 msg/s offered,
            # more than one connection with a window of 100 carries (100 / 40 ms = 2500)
            "wan_light": (0.09, 0.04, 1000.0),
            "wan_saturating": (0.09, 0.04, 3000.0),
        }),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=400.0, help="steady msg/s per policy")
    ap.add_argument("--duration", type=float, default=40.0, help="s per scenario")
    ap.add_argument("--burst", type=int, default=5000, help="messages put at once at 15 s")
    ap.add_argument("--dwell", type=float, default=2.0, help="endpoint_dwell (s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(json.loads(args.child)))))
        return
    result = asyncio.run(_main(args))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
