"""Retention sweep cost (``rapidmq_edge/pipeline/retention.py``): the expiry index against
the walk it replaced, side by side on the same broker state.

A broker (no store: the same ``delete_retained`` calls either way) holds ``--retained``
retained messages (default 100,000), ``--expiring`` of them (default 1 %) under a
``[[retention]]`` rule that has just run out, the others under one that has not. Every
message is published through the broker with the retention tap (which files it in the
index). Then, CPU time (``time.process_time``) per sweep:

* ``walk``: the sweep before the index (every retained message and every session looked
  at, each sweep), reproduced here as the reference;
* ``index``: ``Retention.sweep`` (pops what expired);

each for the sweep that finds the 1 % expired and for an idle sweep (nothing expired: the
steady state between expiries). ``tap_ns``: the retention tap's cost per publish with and
without the index filing (the write path's share), for retained and plain messages.

    .venv/bin/python bench/retention.py [--retained 100000] [--expiring 1000] [--rounds 5]

prints one JSON document (milliseconds of CPU per sweep, median of ``--rounds``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

from rapidmq_edge.broker.broker import Broker, BrokerLimits
from rapidmq_edge.broker.message import Message
from rapidmq_edge.config.retention import RetentionRule
from rapidmq_edge.pipeline.retention import Retention

T0 = 1_000_000.0


def walk_sweep(r: Retention, broker: Broker) -> int:
    """The sweep before the expiry index (pipeline/retention.py at 8c7a1a8)."""
    now = r.clock()
    gone = [t for t, m in broker.retained.items() if m.expired(now)]
    for topic in gone:
        del broker.retained[topic]
        if broker.store is not None:
            broker.store.delete_retained(topic)
    queued = sum(s.drop_expired(now) for s in list(broker.sessions.values()))
    r.drops["retained_expired"] += len(gone)
    r.drops["session_expired"] += queued
    return len(gone) + queued


def build(retained: int, expiring: int) -> tuple[Retention, Broker, list[float]]:
    now = [T0]
    r = Retention([RetentionRule("short/#", 60), RetentionRule("long/#", 86400)],
                  clock=lambda: now[0])
    broker = Broker(BrokerLimits(), taps=[r])
    r.sweep(broker)  # files what was restored (nothing here), as the gateway's start does
    for i in range(expiring):
        broker.publish(Message(f"short/dev{i}/t", b"x" * 32, 1, True))
    for i in range(retained - expiring):
        broker.publish(Message(f"long/dev{i}/t", b"x" * 32, 1, True))
    now[0] = T0 + 61  # the short rule has run out
    return r, broker, now


def cpu_ms(fn: Callable[[], int]) -> tuple[float, int]:
    t = time.process_time()
    n = fn()
    return (time.process_time() - t) * 1000, n


def tap_ns(n: int, index: bool, retain: bool, rounds: int) -> float:
    """CPU ns per message of the tap (the best of ``rounds``: a shared machine's noise)."""
    best = float("inf")
    for _ in range(rounds):
        r = Retention([RetentionRule("short/#", 60)], clock=lambda: T0)
        msgs = [Message(f"short/dev{i % 1000}/t", b"x", 1, retain) for i in range(n)]
        tap = r if index else _tap_without_index(r)
        t = time.process_time_ns()
        for m in msgs:
            tap(m)
        best = min(best, (time.process_time_ns() - t) / n)
    return best


def _tap_without_index(r: Retention) -> Callable[[Message], None]:
    """The tap before the index (bounds the expiry, files nothing)."""

    def tap(msg: Message) -> None:
        if msg.topic.startswith("$"):
            return
        seconds = r.limit(msg.topic)
        if seconds is None:
            return
        deadline = r.clock() + seconds
        if msg.expires_at is None or msg.expires_at > deadline:
            msg.expires_at = deadline
            r.limited += 1

    return tap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--retained", type=int, default=100_000)
    ap.add_argument("--expiring", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    load_before = os.getloadavg()
    res: dict[str, list[float]] = {k: [] for k in (
        "walk_expiring", "walk_idle", "index_expiring", "index_idle")}
    removed = {}
    for _ in range(a.rounds):
        for kind, sweep in (("walk", walk_sweep), ("index", Retention.sweep)):
            r, broker, _now = build(a.retained, a.expiring)
            ms, n = cpu_ms(lambda r=r, b=broker, s=sweep: s(r, b))  # type: ignore[misc]
            res[f"{kind}_expiring"].append(ms)
            removed[kind] = n
            ms, n = cpu_ms(lambda r=r, b=broker, s=sweep: s(r, b))  # type: ignore[misc]
            res[f"{kind}_idle"].append(ms)
            assert n == 0 and len(broker.retained) == a.retained - a.expiring
    med = {k: round(statistics.median(v), 3) for k, v in res.items()}
    print(json.dumps({
        "bench": "retention_sweep", "retained": a.retained, "expiring": a.expiring,
        "rounds": a.rounds, "removed": removed, "cpu_ms_per_sweep": med,
        "speedup_expiring": round(med["walk_expiring"] / max(med["index_expiring"], 1e-3), 1),
        "speedup_idle": round(med["walk_idle"] / max(med["index_idle"], 1e-3), 1),
        "tap_ns_per_message": {
            f"{kind}_{'with' if index else 'without'}_index": round(
                tap_ns(100_000, index, kind == "retained", a.rounds), 1)
            for kind in ("retained", "plain") for index in (True, False)},
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
    }, indent=2))


if __name__ == "__main__":
    main()
