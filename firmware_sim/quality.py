"""Quality and cost of detectors measured against the simulator's ground truth.

Used by ``models/train.py`` (model cards), ``bench/intelligence.py`` and the tests, so
every number is computed one way. Sessions are built exactly as the gateway builds them
(:func:`rapidmq_edge.intelligence.models.ort_session`: one intra-op thread, no spinning).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# re-exported: training, the bench and the tests score exactly as the gateway does
from rapidmq_edge.intelligence.models import ort_session as ort_session


def predict(session: Any, X: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Class indices and probabilities of ``X`` (float32 rows)."""
    name = session.get_inputs()[0].name
    labels, probs = [], []
    for i in range(0, len(X), batch):
        lab, pr = session.run(None, {name: np.ascontiguousarray(X[i:i + batch], np.float32)})
        labels.append(lab)
        probs.append(pr)
    if not labels:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(labels).astype(np.int64), np.concatenate(probs)


def fault_spans(faults: Sequence[str], merge: bool = True) -> list[list[Any]]:
    """The faults in one stream's readings, given their ``fault`` labels in order: one
    ``[kind, first, last, False]`` each (positions in the stream; the flag is for the caller
    to mark it detected). ``merge``: a fault interrupted by single healthy readings is one
    fault (a second healthy series of a device on the same topic interleaves with it)."""
    spans: list[list[Any]] = []
    k = 0
    n = len(faults)
    while k < n:
        f = faults[k]
        if f == "none":
            k += 1
            continue
        s = k
        while k + 1 < n and (faults[k + 1] == f or (
                merge and k + 2 < n and faults[k + 1] == "none" and faults[k + 2] == f)):
            k += 1
        spans.append([f, s, k, False])
        k += 1
    return spans


def per_class(y: np.ndarray, pred: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    """Precision, recall, F1 and support per class, plus macro-F1."""
    out: dict[str, Any] = {}
    f1s = []
    for k, name in enumerate(labels):
        tp = int(np.sum((pred == k) & (y == k)))
        fp = int(np.sum((pred == k) & (y != k)))
        fn = int(np.sum((pred != k) & (y == k)))
        p = tp / (tp + fp) if tp + fp else 1.0
        r = tp / (tp + fn) if tp + fn else 1.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        f1s.append(f1)
        out[name] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4),
                     "support": int(np.sum(y == k))}
    out["macro_f1"] = round(float(np.mean(f1s)), 4)
    return out


def anomaly_quality(y: np.ndarray, pred: np.ndarray, scored: np.ndarray,
                    labels: tuple[str, ...]) -> dict[str, Any]:
    """Per fault kind P/R on scored readings, and the binary anomalous-vs-healthy P/R."""
    y, pred = y[scored], pred[scored]
    res = per_class(y, pred, labels)
    tp = int(np.sum((pred > 0) & (y > 0)))
    fp = int(np.sum((pred > 0) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y > 0)))
    res["any_fault"] = {"precision": round(tp / (tp + fp) if tp + fp else 1.0, 4),
                        "recall": round(tp / (tp + fn) if tp + fn else 1.0, 4),
                        "support": int(np.sum(y > 0))}
    res["scored_readings"] = int(len(y))
    return res


def threat_quality(y: np.ndarray, pred: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    """Recall of attack windows (flagged as any threat), per kind, and benign FP rate."""
    attack, benign = y > 0, y == 0
    res: dict[str, Any] = {
        "recall": round(float(np.mean(pred[attack] > 0)) if attack.any() else 1.0, 4),
        "false_positive_rate": round(float(np.mean(pred[benign] > 0)) if benign.any() else 0.0,
                                     6),
        "attack_windows": int(attack.sum()), "benign_windows": int(benign.sum()),
        "per_kind_recall": {}, "per_kind_class_accuracy": {},
    }
    for k, name in enumerate(labels[1:], start=1):
        m = y == k
        if m.any():
            res["per_kind_recall"][name] = round(float(np.mean(pred[m] > 0)), 4)
            res["per_kind_class_accuracy"][name] = round(float(np.mean(pred[m] == k)), 4)
    return res


def inference_cost(session: Any, X: np.ndarray, batch_sizes: tuple[int, ...] = (1, 16, 64, 256),
                   budget_s: float = 0.3) -> dict[str, float]:
    """Median µs per row, amortized over a ``session.run`` of each batch size."""
    name = session.get_inputs()[0].name
    X = np.ascontiguousarray(X, np.float32)
    out: dict[str, float] = {}
    for b in batch_sizes:
        reps = max(1, len(X) // b)
        batches = [X[(i % reps) * b:(i % reps) * b + b] for i in range(min(reps, 64))]
        for bt in batches[:3]:
            session.run(None, {name: bt})
        times: list[int] = []
        deadline = time.perf_counter() + budget_s
        i = 0
        while time.perf_counter() < deadline or len(times) < 5:
            bt = batches[i % len(batches)]
            t0 = time.perf_counter_ns()
            session.run(None, {name: bt})
            times.append(time.perf_counter_ns() - t0)
            i += 1
        out[str(b)] = round(float(np.median(times)) / 1000.0 / len(batches[0]), 3)
    return out


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_manifest(path: str | Path) -> dict[str, Any]:
    """A model manifest (``models/<name>.json``)."""
    return dict(json.loads(Path(path).read_text()))
