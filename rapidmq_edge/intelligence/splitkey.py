"""Exact cache keys for a tree-ensemble scorer: the cell of its split grid a row falls in.

A ``TreeEnsembleClassifier`` compares feature ``j`` of a row only with the thresholds of
its ``BRANCH_LEQ`` nodes on ``j`` (``x <= t`` goes to the true child). Two rows with the
same outcome of ``x <= t`` for every distinct (feature, threshold) pair of the model take
the same branch in every node, reach the same leaves and get the same label and
probabilities. Those outcomes (one byte each) are the row's key: rows whose inputs
differ only inside one cell (payload length, digit share, topic words between two splits)
share it, so the runtime's priority cache asks the model once per cell instead of once per
distinct payload. The comparison is the model's own (float32 ``<=``; NaN is false), so it
stays exact. ``bench/intelligence_path.py`` checks the labels on a held-out run.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .gate import TreeEnsemble, tree_ensemble

log = logging.getLogger(__name__)


class SplitKey:
    """Maps float32 feature rows to their split-grid cell (bytes, usable as a dict key)."""

    def __init__(self, ens: TreeEnsemble) -> None:
        inner = ens.true_next >= 0
        feats = ens.feature[inner]
        vals = ens.threshold[inner]
        self.columns = sorted(set(feats.tolist()))
        self.thresholds = [np.unique(vals[feats == j]).astype(np.float32)
                           for j in self.columns]
        #: one entry per distinct (feature, threshold) split
        self._col = np.concatenate([np.full(len(t), j, dtype=np.intp) for j, t in
                                    zip(self.columns, self.thresholds, strict=True)])
        self._thr = np.concatenate(self.thresholds)

    @property
    def cells(self) -> int:
        """How many cells the grid has (product of the per-column split counts + 1)."""
        n = 1
        for t in self.thresholds:
            n *= len(t) + 1
        return n

    def keys(self, X: np.ndarray) -> list[bytes]:
        """One key per row of ``X`` (float32 [N, width])."""
        raw = np.less_equal(X.take(self._col, axis=1), self._thr).tobytes()
        w = len(self._thr)
        return [raw[i:i + w] for i in range(0, len(raw), w)]


def split_key_for(scorer: Any) -> SplitKey | None:
    """The split-grid key of an ONNX tree-ensemble scorer, None for anything else."""
    if getattr(scorer, "source", None) != "model" or getattr(scorer, "path", None) is None:
        return None
    try:
        import onnx

        return SplitKey(tree_ensemble(onnx.load(str(scorer.path))))
    except (ValueError, OSError, KeyError, ImportError) as exc:
        log.info("intelligence: %s model has no split grid (%s): label cache by input only",
                 scorer.name, exc)
        return None
