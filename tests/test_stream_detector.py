"""The per-stream anomaly detector (``intelligence/stream_detector.py``) on seeded synthetic
streams and on one shared NAB file.

Healthy streams (daily cycles, coarse values, heavy tails, irregular sampling) must stay
nearly quiet; a level shift, a spike, a stuck sensor and a variance change must each open
one episode soon after they start. The default parameters are NAB-tuned (aggressive: a
false episode costs NAB 0.11 of a missed window), so "nearly quiet" is a measured bound,
not zero: see the log in bench/anomaly_nab.py.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rapidmq_edge.intelligence.stream_detector import (
    DetectorParams,
    DetectorTable,
    StreamDetector,
)

NAB = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "nab"
DAY = 86400.0
STEP = 300.0  # 5 min
T0 = 1_700_000_000.0
WEEK_READINGS = int(7 * DAY / STEP)
#: false episodes allowed per healthy week of 5-min readings (measured 2-7 with the
#: NAB-tuned defaults over seeds 0-4; see the module docstring)
HEALTHY_MAX = 7

Gen = Callable[[random.Random, float, int], float]


def _run(gen: Gen, n: int, seed: int, irregular: bool = False,
         params: DetectorParams | None = None) -> tuple[list[tuple[int, str]], list[bool]]:
    """(index, kind) of every opening reading of a stream of ``n`` readings, and whether
    an episode is open after each reading."""
    rng = random.Random(seed)
    det = StreamDetector(params)
    t = T0
    out = []
    state = []
    for i in range(n):
        t += rng.expovariate(1.0 / STEP) if irregular else STEP
        v = det.update(t, gen(rng, t, i))
        assert 0.0 <= v.likelihood <= 1.0
        assert (v.score >= 0.5) == v.opens
        state.append(v.in_episode)
        if v.opens:
            out.append((i, v.kind))
    return out, state


def _daily(rng: random.Random, t: float, i: int) -> float:
    return 20.0 + 10.0 * math.sin(2 * math.pi * t / DAY) + rng.gauss(0.0, 1.0)


def _coarse(rng: random.Random, t: float, i: int) -> float:
    """A CPU-like metric with a handful of distinct values and long runs."""
    return float(round(30.0 + 0.8 * rng.gauss(0.0, 1.0)))


def _student(rng: random.Random, t: float, i: int) -> float:
    z = rng.gauss(0.0, 1.0)
    chi = sum(rng.gauss(0.0, 1.0) ** 2 for _ in range(3))
    return 50.0 + z / math.sqrt(chi / 3)


def _laplace(rng: random.Random, t: float, i: int) -> float:
    e = rng.expovariate(1.0)
    return 50.0 + (e if rng.random() < 0.5 else -e)


@pytest.mark.parametrize("gen,irregular", [
    (_daily, False), (_daily, True), (_coarse, False), (_student, False), (_laplace, False),
], ids=["daily", "daily-irregular", "coarse", "student-t3", "laplace"])
def test_healthy_streams_stay_nearly_quiet(gen: Gen, irregular: bool) -> None:
    opens, _ = _run(gen, WEEK_READINGS, seed=1, irregular=irregular)
    assert len(opens) <= HEALTHY_MAX, opens


def _with(base: Gen, start: int, change: Callable[[random.Random, float, int, float], float]
          ) -> Gen:
    def gen(rng: random.Random, t: float, i: int) -> float:
        x = base(rng, t, i)
        return change(rng, t, i, x) if i >= start else x
    return gen


START = 1500
#: an anomaly must be inside an episode within this many readings of its start: one it
#: opens, or one a false alarm opened before it (the incident is open either way; with the
#: NAB-tuned defaults this happens, see HEALTHY_MAX)
WITHIN = 12


def _hold(rng: random.Random, t: float, i: int, x: float, held: list[float]) -> float:
    if not held:
        held.append(x)
    return held[0]


@pytest.mark.parametrize("name,change", [
    ("level shift", lambda r, t, i, x: x + 8.0),
    ("spike", lambda r, t, i, x: x + 25.0 if i == START else x),
    ("variance change", lambda r, t, i, x: x + r.gauss(0.0, 6.0)),
])
def test_anomalies_are_in_an_episode_soon(name: str, change: Callable[..., float]) -> None:
    fresh = 0
    for seed in range(4):
        opens, state = _run(_with(_daily, START, change), START + 300, seed)
        assert any(state[START:START + WITHIN + 1]), (name, seed, opens)
        fresh += any(START <= i <= START + WITHIN for i, _ in opens)
    assert fresh >= 1, name  # and open their own when no false alarm was open


def test_one_episode_per_anomaly() -> None:
    """A shift that lasts 200 readings opens at most one episode, not one per reading."""
    gen = _with(_daily, START, lambda r, t, i, x: x + 8.0 if i < START + 200 else x)
    for seed in range(4):
        opens, state = _run(gen, START + 200, seed)
        assert len([o for o in opens if o[0] >= START]) <= 1, opens
        assert any(state[START:START + WITHIN + 1]), seed


def test_flat_where_it_never_was_is_stuck() -> None:
    held: list[float] = []
    kinds = []
    for seed in range(4):
        held.clear()
        gen = _with(_daily, START, lambda r, t, i, x: _hold(r, t, i, x, held))
        opens, _ = _run(gen, START + 100, seed)
        kinds += [k for i, k in opens if START <= i <= START + WITHIN]
    assert kinds and set(kinds) == {"stuck"}, kinds


def test_verdict_band_and_table() -> None:
    table = DetectorTable()
    rng = random.Random(3)
    ts = [T0 + STEP * i for i in range(400)]
    xs = [_daily(rng, t, i) for i, t in enumerate(ts)]
    keys = ["a", "b"] * 200
    vs = table.update(keys, ts, xs)
    assert len(table) == 2 and len(vs) == 400
    last = vs[-1]
    assert last.lo <= last.expected <= last.hi
    one = StreamDetector()
    assert [one.update(t, x).score for t, x in zip(ts[::2], xs[::2], strict=True)] == \
        [v.score for v in vs[::2]]


def _epoch(s: str) -> float:
    return datetime.fromisoformat(s.strip()).replace(tzinfo=UTC).timestamp()


def test_nab_machine_temperature() -> None:
    """Real data: a detection inside at least one labelled window, few false positives
    (NAB's probationary 15 % is excluded, as its scorer does). The shared NAB subset must
    be there: a missing file fails, it does not skip."""
    name = "realKnownCause/machine_temperature_system_failure.csv"
    path = NAB / "data" / name
    assert path.is_file(), f"{path} is missing (shared/datasets/nab)"
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    windows = json.loads((NAB / "labels" / "windows.json").read_text())[name]
    index = {r["timestamp"][:19]: i for i, r in enumerate(rows)}
    spans = [(index[a[:19]], index[b[:19]]) for a, b in windows]
    probation = min(int(0.15 * len(rows)), 750)
    det = StreamDetector()
    opens = [i for i, r in enumerate(rows)
             if det.update(_epoch(r["timestamp"]), float(r["value"])).opens]
    inside = [i for i in opens if any(a <= i <= b for a, b in spans)]
    false = [i for i in opens if i >= probation and not any(a <= i <= b for a, b in spans)]
    assert inside, opens
    assert 1000 * len(false) / len(rows) < 1.0, false
