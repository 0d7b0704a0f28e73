"""A proven "healthy" region of the anomaly scorer, so most readings skip the model.

Most sensor readings sit well inside their stream's normal range. For those the anomaly
model says "none", but asking it costs an onnxruntime call per micro-batch. The healthy
region is an axis-aligned box of :data:`~.features.STREAM_FEATURES` rows for which the scorer's
answer is **proven** to be "none" for every row inside, not merely observed:

* for the ONNX model (one ``TreeEnsembleClassifier`` node, sums of leaf weights, argmax)
  :func:`verify_box` walks every tree with interval bounds, collects the leaves a row of
  the box can reach, and checks that in every tree the worst reachable leaf still leaves
  "none" ahead of each other class by a summed margin > :data:`MARGIN`;
* for the rule fallback (:func:`.rules.anomaly_rules`) :func:`rules_box` is the region the
  rule thresholds leave alone.

So skipping changes no label: a row inside the box gets the label the scorer would give
it ("none"), a row outside is scored as before. The box is checked against the loaded
model at start (a few ms); a model it does not hold for (a retrained one) scores every
reading and the log says so (operators see it as the "anomaly gate").
``bench/healthy_region.py`` searches a box on the training run, reports the share of
held-out readings it lets skip the model, and confirms the labels are equal.
Bounds are float32 values and inclusive, so the float32 rounding of a float64 feature
inside the box stays inside (rounding to nearest is monotone).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import rules
from .features import ANOMALY_LABELS, STREAM_FEATURES

log = logging.getLogger(__name__)

_NONE = ANOMALY_LABELS.index("none")
#: "none" must lead every other class by this much (summed leaf weights; float32 sums of a
#: few dozen terms of ~0.04 are exact to ~1e-7)
MARGIN = 1e-4

#: the committed ``models/anomaly.onnx``'s box (lo, hi per feature), searched by
#: ``bench/healthy_region.py --search``; re-verified against the loaded model at start
MODEL_BOX: tuple[tuple[float, float], ...] = (
    (0.0, 1.0),     # warm
    (-2.5, 2.5),    # z_fast
    (-2.5, 2.5),    # z_slow
    (-3.0, 3.25),   # dz
    (-1.5, 1.5),    # level
    (-0.3, 0.3),    # slope
    (0.0, 0.0),     # stuck
    (-0.1, 0.2),    # log_dt
    (-0.1, 0.1),    # burst
    (0.0, 0.0),     # gap
)

class HealthyRegion:
    """Rows inside ``[lo, hi]`` (inclusive, every column) are "none" without scoring."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, source: str) -> None:
        self.lo = np.asarray(lo, dtype=np.float32)
        self.hi = np.asarray(hi, dtype=np.float32)
        self.source = source

    def inside(self, X: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows of ``X`` inside the box (NaN is never inside)."""
        return np.all((self.lo <= X) & (self.hi >= X), axis=1)

    def as_dict(self) -> dict[str, Any]:
        """The box by feature name (status, bench JSON)."""
        return {name: [float(a), float(b)]
                for name, a, b in zip(STREAM_FEATURES, self.lo, self.hi, strict=True)}


def _f32(box: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(box, dtype=np.float32)
    return arr[:, 0].copy(), arr[:, 1].copy()


@dataclass(frozen=True)
class TreeEnsemble:
    """The arrays of one ONNX ``TreeEnsembleClassifier`` (``BRANCH_LEQ`` splits)."""

    feature: np.ndarray    # per node (global index)
    threshold: np.ndarray  # float32
    true_next: np.ndarray  # global index of the child for x <= threshold, -1 for a leaf
    false_next: np.ndarray
    leaf_weights: np.ndarray  # [nodes, classes]
    roots: list[int]


def tree_ensemble(model: Any) -> TreeEnsemble:
    """Read the tree arrays of an ONNX model (``onnx.ModelProto``) with one
    ``TreeEnsembleClassifier`` node; ValueError for anything else."""
    from onnx import helper

    nodes = [n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier"]
    if len(nodes) != 1:
        raise ValueError("not a single TreeEnsembleClassifier")
    a = {x.name: helper.get_attribute_value(x) for x in nodes[0].attribute}
    if a.get("post_transform", b"NONE") not in (b"NONE", "NONE"):
        raise ValueError(f"post_transform {a['post_transform']!r} is not NONE")
    modes = [m.decode() if isinstance(m, bytes) else m for m in a["nodes_modes"]]
    if set(modes) - {"BRANCH_LEQ", "LEAF"}:
        raise ValueError(f"node modes {sorted(set(modes))} are not BRANCH_LEQ/LEAF")
    if any(a.get("nodes_missing_value_tracks_true", [])):
        raise ValueError("missing-value tracking is not supported")
    labels = list(a["classlabels_int64s"])
    if labels != list(range(len(labels))):
        raise ValueError("class labels are not 0..n-1")
    tids, nids = a["nodes_treeids"], a["nodes_nodeids"]
    index = {(t, n): i for i, (t, n) in enumerate(zip(tids, nids, strict=True))}
    n = len(tids)
    tnext = np.full(n, -1, np.int64)
    fnext = np.full(n, -1, np.int64)
    for i, (t, m) in enumerate(zip(tids, modes, strict=True)):
        if m != "LEAF":
            tnext[i] = index[(t, a["nodes_truenodeids"][i])]
            fnext[i] = index[(t, a["nodes_falsenodeids"][i])]
    weights = np.zeros((n, len(labels)), np.float64)
    for t, nid, c, w in zip(a["class_treeids"], a["class_nodeids"], a["class_ids"],
                            a["class_weights"], strict=True):
        weights[index[(t, nid)], c] += w
    roots = sorted({index[(t, 0)] for t in tids})
    return TreeEnsemble(np.asarray(a["nodes_featureids"], np.int64),
                        np.asarray(a["nodes_values"], np.float32), tnext, fnext, weights, roots)


def box_margin(ens: TreeEnsemble, lo: np.ndarray, hi: np.ndarray) -> float:
    """The smallest lead of "none" over any other class for any row in the box
    (> 0: every row in the box is labelled "none")."""
    n_cls = ens.leaf_weights.shape[1]
    total = np.zeros(n_cls)
    feat, thr, tn, fn, w = (ens.feature, ens.threshold, ens.true_next, ens.false_next,
                            ens.leaf_weights)
    for root in ens.roots:
        worst = np.full(n_cls, np.inf)
        stack = [root]
        while stack:
            i = stack.pop()
            if tn[i] < 0:
                lead = w[i, _NONE] - w[i]
                np.minimum(worst, lead, out=worst)
                continue
            f, v = feat[i], thr[i]
            if hi[f] <= v:      # every row goes left (x <= threshold)
                stack.append(int(tn[i]))
            elif lo[f] > v:     # every row goes right
                stack.append(int(fn[i]))
            else:
                stack.append(int(tn[i]))
                stack.append(int(fn[i]))
        total += worst
    total[_NONE] = np.inf
    return float(total.min())


def verify_box(ens: TreeEnsemble, lo: np.ndarray, hi: np.ndarray) -> bool:
    """True when the ensemble labels every row in ``[lo, hi]`` "none"."""
    return bool(np.all(lo <= hi)) and box_margin(ens, lo, hi) > MARGIN


def rules_box() -> tuple[tuple[float, float], ...]:
    """The region :func:`.rules.anomaly_rules` labels "none" (any warm-up; below each
    rule's threshold; bounds a float32 step inside the strict thresholds)."""
    below = float(np.nextafter(np.float32(min(rules.DRIFT_Z, rules.SPIKE_Z)), np.float32(0)))
    burst = float(np.nextafter(np.float32(rules.BURST_LOG_DT), np.float32(0)))
    big = 1e9
    return (
        (0.0, 1.0),                                   # warm
        (-big, big),                                  # z_fast (spike needs dz too)
        (-below, below),                              # z_slow < DRIFT_Z
        (-below, below),                              # dz < SPIKE_Z: never a spike
        (-big, big), (-big, big),                     # level, slope
        (0.0, float(rules.STUCK_REPEATS - 1)),        # stuck
        (burst, big),                                 # log_dt > BURST_LOG_DT
        (-big, big), (-big, big),                     # burst, gap
    )


def healthy_region_for(scorer: Any, box: Sequence[tuple[float, float]] = MODEL_BOX
                       ) -> HealthyRegion | None:
    """The healthy region of an anomaly :class:`~.models.Scorer`: the rules' region for the rules,
    ``box`` for the ONNX model when it verifies against the model's trees, else None."""
    if scorer.source == "rules":
        lo, hi = _f32(rules_box())
        return HealthyRegion(lo, hi, "rules")
    if scorer.source != "model" or getattr(scorer, "path", None) is None:
        return None
    try:
        import onnx

        ens = tree_ensemble(onnx.load(str(scorer.path)))
    except Exception as exc:  # any doubt: no region, the model scores every reading
        log.warning("intelligence: anomaly gate off (%s)", exc)
        return None
    lo, hi = _f32(box)
    if not verify_box(ens, lo, hi):
        log.warning("intelligence: anomaly gate off: its box is not all 'none' for model %s",
                    scorer.version)
        return None
    return HealthyRegion(lo, hi, "model")


def search_box(ens: TreeEnsemble, X: np.ndarray, start: Sequence[tuple[float, float]],
               steps: Sequence[float], rounds: int = 40) -> tuple[tuple[float, float], ...]:
    """Grow a verified box from ``start``: each round widens the one bound (by its
    feature's step) that adds the most rows of ``X`` while the box still verifies."""
    lo, hi = _f32(start)
    if not verify_box(ens, lo, hi):
        raise ValueError("the start box does not verify")
    for _ in range(rounds):
        best: tuple[int, np.ndarray, np.ndarray] | None = None
        base = int(np.all((lo <= X) & (hi >= X), axis=1).sum())
        for j, step in enumerate(steps):
            if step <= 0:
                continue
            for side in (0, 1):
                lo2, hi2 = lo.copy(), hi.copy()
                if side == 0:
                    lo2[j] = np.float32(lo[j] - step)
                else:
                    hi2[j] = np.float32(hi[j] + step)
                gain = int(np.all((lo2 <= X) & (hi2 >= X), axis=1).sum()) - base
                if gain <= 0 or (best is not None and gain <= best[0]):
                    continue
                if verify_box(ens, lo2, hi2):
                    best = (gain, lo2, hi2)
        if best is None:
            break
        _, lo, hi = best
    return tuple((float(a), float(b)) for a, b in zip(lo, hi, strict=True))
