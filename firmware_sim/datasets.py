"""Turn a generated :class:`FleetRun` into the feature matrices and labels of the three models.

The features come from :mod:`rapidmq_edge.intelligence.features`, fed in time order and in
micro-batches exactly as the gateway runtime feeds them, so training, benchmarks and tests
measure what the gateway will compute.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rapidmq_edge.intelligence.fault_classifier import (
    ANOMALY_LABELS,
    RESIDUAL_FEATURES,
    ClassifiedTable,
)
from rapidmq_edge.intelligence.features import ClientWindows, message_features

from .scenario import PRIORITIES, THREATS, FleetRun

#: micro-batch size used when replaying a run through the stream detector
REPLAY_BATCH = 64


@dataclass
class Dataset:
    """Rows ``X`` (float32), class indices ``y`` into ``labels``, and ``scored`` (False for
    rows excluded from quality measurements, e.g. a fault's grace readings)."""

    X: np.ndarray
    y: np.ndarray
    labels: tuple[str, ...]
    scored: np.ndarray


def residual_dataset(run: FleetRun, batch: int = REPLAY_BATCH) -> Dataset:
    """One row of residual features (:data:`RESIDUAL_FEATURES`, the stream detector's
    verdicts turned into the fault classifier's input) per sensor reading, in time order and
    micro-batches as the gateway computes them; labels :data:`ANOMALY_LABELS`."""
    msgs = [m for m in run.messages if m.value is not None]
    table = ClassifiedTable()
    base = run.scenario.start_epoch
    parts = []
    for i in range(0, len(msgs), batch):
        chunk = msgs[i:i + batch]
        keys = [m.topic for m in chunk]
        ts = [base + m.t for m in chunk]
        xs = [float(m.value) for m in chunk]  # type: ignore[arg-type]
        parts.append(table.rows(keys, ts, xs, table.detectors.update(keys, ts, xs),
                                every=True)[1])
    X = (np.concatenate(parts) if parts
         else np.zeros((0, len(RESIDUAL_FEATURES)), np.float32))
    idx = {f: i for i, f in enumerate(ANOMALY_LABELS)}
    y = np.asarray([idx[m.fault] for m in msgs], dtype=np.int64)
    scored = np.asarray([not m.grace for m in msgs], dtype=bool)
    return Dataset(X, y, ANOMALY_LABELS, scored)


def healthy_stream(seed: int, n: int, noise_kind: str | None = None
                   ) -> tuple[list[float], list[float]]:
    """Times and values of one realistic healthy stream, drawn from ``seed``: a sampling
    step of 5 s to 15 min, regular or exponential, now and then a gap of 12-200 steps; a
    level anywhere, Gaussian, Laplace or Student-t noise (df 2.5, 3), AR(1) correlated or
    not; a daily cycle (sine or square) and a weekly one or not; values quantised to 0.3-4
    noise sds or not. Seeds 0-99 are the tests' and benchmarks'; training uses others.
    ``noise_kind`` ("gauss", "t3", "t2", "laplace") overrides the drawn noise (the other
    draws unchanged)."""
    rng = random.Random(seed)
    step = rng.choice([5.0, 10.0, 30.0, 60.0, 300.0, 300.0, 600.0, 900.0])
    irregular = rng.random() < 0.3
    base = rng.uniform(-50.0, 500.0)
    sd = abs(base) * rng.uniform(0.002, 0.05) + rng.uniform(0.05, 2.0)
    amp_d = sd * rng.choice([0.0, 0.0, rng.uniform(1.0, 15.0)])
    amp_w = sd * rng.choice([0.0, 0.0, 0.0, rng.uniform(1.0, 6.0)])
    noise = rng.choice(["gauss", "gauss", "t3", "laplace", "t2"])
    if noise_kind is not None:
        noise = noise_kind
    q = rng.choice([0.0, 0.0, sd * rng.uniform(0.3, 1.5), sd * rng.uniform(1.5, 4.0)])
    ar = rng.choice([0.0, 0.0, rng.uniform(0.3, 0.95)])
    square = rng.random() < 0.1
    gaps = rng.random() < 0.4
    phase = rng.uniform(0.0, 86400.0)
    t = 1_700_000_000.0 + rng.uniform(0.0, 7 * 86400.0)
    e = 0.0
    ts: list[float] = []
    xs: list[float] = []
    for _ in range(n):
        if gaps and rng.random() < 0.004:
            t += step * rng.uniform(12.0, 200.0)
        t += rng.expovariate(1.0 / step) if irregular else step * rng.gauss(1.0, 0.03)
        if noise == "gauss":
            w = rng.gauss(0.0, 1.0)
        elif noise == "laplace":
            w = rng.expovariate(1.0) * (1.0 if rng.random() < 0.5 else -1.0) / math.sqrt(2.0)
        else:
            df = 3.0 if noise == "t3" else 2.5
            w = rng.gauss(0.0, 1.0) / math.sqrt(rng.gammavariate(df / 2, 2.0) / df) * 0.6
        e = ar * e + math.sqrt(1.0 - ar * ar) * w
        ph = 2 * math.pi * (t + phase) / 86400.0
        cyc = math.sin(ph)
        if square:
            cyc = 1.0 if cyc > 0 else -1.0
        x = base + amp_d * cyc + amp_w * math.sin(ph / 7 + 1.0) + sd * e
        if q > 0:
            x = round(x / q) * q
        ts.append(t)
        xs.append(x)
    return ts, xs


def healthy_dataset(seeds: Sequence[int], n: int = 900,
                    noise_kinds: Sequence[str] | None = None) -> Dataset:
    """Residual rows of :func:`healthy_stream` ``seeds`` (``n`` readings each), all
    labelled ``none``: what the fault classifier must leave alone on real telemetry;
    ``noise_kinds``: the i-th seed's noise is ``noise_kinds[i % len]``."""
    parts = []
    for i, seed in enumerate(seeds):
        ts, xs = healthy_stream(seed, n, noise_kinds[i % len(noise_kinds)]
                                if noise_kinds else None)
        keys = [0] * n
        table = ClassifiedTable()
        parts.append(table.rows(keys, ts, xs, table.detectors.update(keys, ts, xs),
                                every=True)[1])
    X = (np.concatenate(parts) if parts
         else np.zeros((0, len(RESIDUAL_FEATURES)), np.float32))
    return Dataset(X, np.zeros(len(X), dtype=np.int64), ANOMALY_LABELS,
                   np.ones(len(X), dtype=bool))


def priority_dataset(run: FleetRun) -> Dataset:
    """One row per message, labels :data:`PRIORITIES`."""
    msgs = run.messages
    X = message_features([m.topic for m in msgs], [m.payload for m in msgs],
                         [m.qos for m in msgs], [m.retain for m in msgs])
    idx = {p: i for i, p in enumerate(PRIORITIES)}
    y = np.asarray([idx[m.priority] for m in msgs], dtype=np.int64)
    return Dataset(X, y, PRIORITIES, np.ones(len(msgs), dtype=bool))


def client_dataset(run: FleetRun) -> Dataset:
    """One row per (client, 10 s window) with any action, labels :data:`THREATS`."""
    win = ClientWindows()
    truth: dict[tuple[str, int], str] = {}
    for a in run.actions:
        if a.action == "connect":
            win.connect(a.client, a.t, a.ok, a.username)
        elif a.action == "disconnect":
            win.disconnect(a.client, a.t)
        elif a.action == "publish":
            win.publish(a.client, a.t, a.topic, a.size, a.ok)
        elif a.action == "subscribe":
            win.subscribe(a.client, a.t, a.topic, a.ok)
        if a.label != "benign":
            truth[(a.client, int(a.t // win.window))] = a.label
    rows = win.flush()
    idx = {p: i for i, p in enumerate(THREATS)}
    y = np.asarray([idx[truth.get((c, w), "benign")] for c, w in zip(rows.clients, rows.windows,
                                                                     strict=True)], dtype=np.int64)
    return Dataset(rows.features, y, THREATS, np.ones(len(y), dtype=bool))
