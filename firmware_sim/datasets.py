"""Turn a generated :class:`FleetRun` into the feature matrices and labels of the three models.

The features come from :mod:`rapidmq_edge.intelligence.features`, fed in time order and in
micro-batches exactly as the gateway runtime feeds them, so training, benchmarks and tests
measure what the gateway will compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rapidmq_edge.intelligence.features import (
    ClientWindows,
    StreamTable,
    message_features,
)

from .scenario import FAULTS, PRIORITIES, THREATS, FleetRun

#: micro-batch size used when replaying a run through the stream features
REPLAY_BATCH = 64


@dataclass
class Dataset:
    """Rows ``X`` (float32), class indices ``y`` into ``labels``, and ``scored`` (False for
    rows excluded from quality measurements, e.g. a fault's grace readings)."""

    X: np.ndarray
    y: np.ndarray
    labels: tuple[str, ...]
    scored: np.ndarray


def anomaly_dataset(run: FleetRun, batch: int = REPLAY_BATCH) -> Dataset:
    """One row per sensor reading (stream = topic), labels :data:`FAULTS`."""
    msgs = [m for m in run.messages if m.value is not None]
    table = StreamTable()
    parts = []
    for i in range(0, len(msgs), batch):
        chunk = msgs[i:i + batch]
        parts.append(table.update_keys([m.topic for m in chunk], [m.t for m in chunk],
                                       [m.value for m in chunk]))  # type: ignore[misc]
    X = np.concatenate(parts) if parts else np.zeros((0, 10), np.float32)
    idx = {f: i for i, f in enumerate(FAULTS)}
    y = np.asarray([idx[m.fault] for m in msgs], dtype=np.int64)
    scored = np.asarray([not m.grace for m in msgs], dtype=bool)
    return Dataset(X, y, FAULTS, scored)


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
