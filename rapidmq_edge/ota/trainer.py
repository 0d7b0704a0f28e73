"""Retrain a model from collected feedback (``rapidmq-edge model train``).

Why a small numpy trainer and not scikit-learn: the gateway-side contract is tiny (one
float32 input, a label and class probabilities), the rows are few (tens of thousands), and
numpy plus ``onnx.helper`` (the ``[train]`` extra; ``onnx`` is in ``dev`` too) keep the
operator's install small and CI installable without scikit-learn/skl2onnx. The model is a
multilayer perceptron: standardisation folded into the first layer, ``hidden`` ReLU units,
softmax; full-batch Adam on the cross-entropy, seeded (the same data and seed give the same
bytes). Exported as ONNX opset 17: ``Gemm, Relu, Gemm, Softmax -> probabilities`` and
``ArgMax -> label``, the component's contract (``intelligence.models.CONTRACTS``).

Labels: what the active model answered for each sampled row, with its confidence as a soft
target (distillation: the retrained model's confidences follow the active one's, which the
shadow gate's distribution-shift check compares), changed by the
operator's verdicts where they apply: for the ``priority`` component, rows of a stream
sampled during an incident the operator **confirmed** are labelled ``critical`` (an incident
worth acting on is forwarded first); rows during a **dismissed** incident keep their label.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..intelligence.features import FEATURE_SPEC
from ..intelligence.models import CONTRACTS
from .feedback import FeedbackRow

__all__ = ["Mlp", "TrainingSet", "export_onnx", "relabel", "soft_targets", "train",
           "train_mlp", "training_set"]

#: an incident without a closing time covers this many seconds after it opened
OPEN_INCIDENT_SPAN = 600.0


@dataclass
class TrainingSet:
    """Rows of one component: features ``X`` [N, width], labels ``y`` [N]."""

    component: str
    X: np.ndarray
    y: np.ndarray
    topics: list[str]
    times: np.ndarray
    models: dict[str, int]  # model version -> rows it scored
    #: the active model's confidence in each label (1.0 where unknown or relabelled)
    confidence: np.ndarray
    relabelled: int = 0


def training_set(rows: Sequence[FeedbackRow], component: str) -> TrainingSet:
    """The rows as arrays (ValueError when there are none or a row has another width)."""
    features, labels, _ = CONTRACTS[component]
    if not rows:
        raise ValueError(f"no {component} rows to train on")
    X = np.asarray([r.features for r in rows], dtype=np.float32)
    if X.shape[1] != len(features):
        raise ValueError(f"rows have {X.shape[1]} features, {component} takes {len(features)}")
    y = np.asarray([r.label for r in rows], dtype=np.int64)
    if y.min() < 0 or y.max() >= len(labels):
        raise ValueError(f"labels outside 0..{len(labels) - 1}")
    models: dict[str, int] = {}
    for r in rows:
        models[r.model] = models.get(r.model, 0) + 1
    conf = np.asarray([r.confidence for r in rows], dtype=np.float64)
    conf[~np.isfinite(conf)] = 1.0
    return TrainingSet(component, X, y, [r.topic for r in rows],
                       np.asarray([r.at for r in rows], dtype=np.float64), models,
                       np.clip(conf, 0.0, 1.0))


def relabel(ts: TrainingSet, verdicts: Sequence[dict[str, Any]]) -> int:
    """Apply the operator's verdicts (see the module docstring); returns rows changed."""
    if ts.component != "priority":
        return 0
    critical = CONTRACTS["priority"][1].index("critical")
    topics = np.asarray(ts.topics, dtype=object)
    changed = 0
    for v in verdicts:
        if v.get("verdict") != "confirmed" or not isinstance(v.get("stream"), str):
            continue
        t0 = v.get("opened_at")
        if not isinstance(t0, int | float):
            continue
        t1 = v.get("closed_at")
        t1 = t1 if isinstance(t1, int | float) else t0 + OPEN_INCIDENT_SPAN
        hit = (topics == v["stream"]) & (ts.times >= t0) & (ts.times <= t1) & \
            (ts.y != critical)
        changed += int(hit.sum())
        ts.y[hit] = critical
        ts.confidence[hit] = 1.0
    ts.relabelled += changed
    return changed


@dataclass
class Mlp:
    """Trained weights (standardisation folded into ``w1``/``b1``)."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        """The forward pass in numpy (float32), as the exported graph computes it."""
        h = np.maximum(X @ self.w1 + self.b1, 0.0)
        z = h @ self.w2 + self.b2
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        out: np.ndarray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return out


def soft_targets(y: np.ndarray, confidence: np.ndarray, n_labels: int) -> np.ndarray:
    """Distillation targets: ``confidence`` on the label, the rest spread evenly (so the
    new model's confidences follow the active one's: the shadow gate compares them)."""
    n = len(y)
    rest = (1.0 - confidence) / max(1, n_labels - 1)
    Y = np.repeat(rest[:, None], n_labels, axis=1)
    Y[np.arange(n), y] = confidence
    return Y


def train_mlp(X: np.ndarray, y: np.ndarray, n_labels: int, *, hidden: int = 32,
              epochs: int = 400, lr: float = 0.01, l2: float = 1e-4, seed: int = 0,
              confidence: np.ndarray | None = None) -> Mlp:
    """Fit the perceptron (full-batch Adam on the cross-entropy against
    :func:`soft_targets`; one-hot without ``confidence``); deterministic."""
    rng = np.random.default_rng(seed)
    X = np.asarray(X, dtype=np.float64)
    n, width = X.shape
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd[sd < 1e-9] = 1.0
    Z = (X - mu) / sd
    Y = soft_targets(y, np.ones(n) if confidence is None else confidence, n_labels)
    params = [rng.normal(0, math.sqrt(2.0 / width), (width, hidden)), np.zeros(hidden),
              rng.normal(0, math.sqrt(1.0 / hidden), (hidden, n_labels)), np.zeros(n_labels)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1_, b2_, eps = 0.9, 0.999, 1e-8
    for step in range(1, epochs + 1):
        w1, c1, w2, c2 = params
        pre = Z @ w1 + c1
        h = np.maximum(pre, 0.0)
        logits = h @ w2 + c2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - Y) / n
        gw2 = h.T @ g + l2 * w2
        gc2 = g.sum(axis=0)
        gh = (g @ w2.T) * (pre > 0)
        gw1 = Z.T @ gh + l2 * w1
        gc1 = gh.sum(axis=0)
        for i, grad in enumerate((gw1, gc1, gw2, gc2)):
            m[i] = b1_ * m[i] + (1 - b1_) * grad
            v[i] = b2_ * v[i] + (1 - b2_) * grad * grad
            mh = m[i] / (1 - b1_ ** step)
            vh = v[i] / (1 - b2_ ** step)
            params[i] = params[i] - lr * mh / (np.sqrt(vh) + eps)
    w1, c1, w2, c2 = params
    fw1 = w1 / sd[:, None]
    fc1 = c1 - (mu / sd) @ w1
    f32 = np.float32
    return Mlp(fw1.astype(f32), fc1.astype(f32), w2.astype(f32), c2.astype(f32))


def export_onnx(mlp: Mlp, component: str, version: str) -> bytes:
    """The model as ONNX bytes in ``component``'s contract (``features`` float32 [N, width]
    in; ``label`` int64 [N], ``probabilities`` float32 [N, labels] out)."""
    from onnx import TensorProto, checker, helper, numpy_helper

    features, labels, _ = CONTRACTS[component]
    width, k = len(features), len(labels)
    inits = [numpy_helper.from_array(a, name) for a, name in
             ((mlp.w1, "w1"), (mlp.b1, "b1"), (mlp.w2, "w2"), (mlp.b2, "b2"))]
    nodes = [
        helper.make_node("Gemm", ["features", "w1", "b1"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, f"rapidmq_edge_{component}_feedback",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="rapidmq-edge model train")
    model.ir_version = 8  # onnxruntime >= 1.14 reads it
    model.doc_string = f"RapidMQ Edge {component} model {version} (retrained from feedback)"
    for key, value in {"name": component, "version": version, "feature_spec": FEATURE_SPEC,
                       "labels": json.dumps(list(labels))}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    checker.check_model(model)
    return bytes(model.SerializeToString())


def train(rows: Sequence[FeedbackRow], verdicts: Sequence[dict[str, Any]], component: str,
          out: Path, *, version: str, hidden: int = 32, epochs: int = 400, seed: int = 0,
          holdout: float = 0.2) -> dict[str, Any]:
    """Train on ``rows`` (with ``verdicts``), write ``out`` (the ONNX model) and
    ``out.with_suffix(".json")`` (version, data, quality); returns that report. Quality is
    the agreement with the (relabelled) labels on a held-out share of the rows."""
    ts = training_set(rows, component)
    changed = relabel(ts, verdicts)
    n = len(ts.y)
    order = np.random.default_rng(seed).permutation(n)
    n_hold = int(n * holdout) if n >= 10 else 0
    hold, fit = order[:n_hold], order[n_hold:]
    labels = CONTRACTS[component][1]
    mlp = train_mlp(ts.X[fit], ts.y[fit], len(labels), hidden=hidden, epochs=epochs,
                    seed=seed, confidence=ts.confidence[fit])
    data = export_onnx(mlp, component, version)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)

    def agreement(idx: np.ndarray) -> float | None:
        if not len(idx):
            return None
        pred = mlp.probabilities(ts.X[idx]).argmax(axis=1)
        return round(float((pred == ts.y[idx]).mean()), 4)

    import hashlib

    report = {
        "name": component, "version": version, "feature_spec": FEATURE_SPEC,
        "file": out.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
        "trainer": {"kind": "mlp", "hidden": hidden, "epochs": epochs, "seed": seed},
        "data": {"rows": n, "fit": len(fit), "holdout": len(hold),
                 "labels": {labels[i]: int(c) for i, c in
                            enumerate(np.bincount(ts.y, minlength=len(labels)))},
                 "relabelled_by_verdicts": changed,
                 "verdicts": len(verdicts), "models": ts.models},
        "quality": {"agreement_fit": agreement(fit), "agreement_holdout": agreement(hold)},
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return report
