"""The operator side of a model update: read a model's interface and compute its validation
vectors by running it in onnxruntime (what ``rapidmq-edge ota sign`` puts in the manifest).

Vectors: ``rows`` deterministic feature rows of the component's width
(:data:`rapidmq_edge.intelligence.models.CONTRACTS`): an all-zero row, then rows drawn from a
NumPy generator seeded by the component name, scaled like the features (0-8); the expected
labels are what the model itself outputs for them at signing time. A gateway that gets other
labels from the installed copy has a different or broken model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ..intelligence.models import CONTRACTS, ort_session
from .manifest import TensorSpec, Vectors

__all__ = ["feature_width", "model_interface", "model_vectors"]

_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64",
           "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(string)": "string"}


def feature_width(component: str) -> int:
    """The input width of a model slot; ValueError for an unknown component."""
    if component not in CONTRACTS:
        raise ValueError(f"unknown component {component!r}; one of {sorted(CONTRACTS)}")
    return len(CONTRACTS[component][0])


def _spec(arg: Any) -> TensorSpec:
    name, kind = str(arg.name), str(arg.type)
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorSpec(name, _DTYPES.get(kind, kind), shape)


def model_interface(model: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """``(inputs, outputs)`` of an ONNX model as onnxruntime loads it; ValueError if it
    cannot be loaded."""
    try:
        sess = ort_session(model)
    except Exception as exc:
        raise ValueError(f"onnxruntime cannot load {model}: {exc}") from None
    return (tuple(_spec(i) for i in sess.get_inputs()),
            tuple(_spec(o) for o in sess.get_outputs()))


def model_vectors(component: str, model: Path, rows: int = 8) -> Vectors:
    """Validation vectors for ``model`` in slot ``component`` (module docstring)."""
    width = feature_width(component)
    seed = int.from_bytes(hashlib.sha256(f"rapidmq-edge ota vectors {component}".encode())
                          .digest()[:8], "big")
    rng = np.random.default_rng(seed)
    X = np.zeros((rows, width), dtype=np.float32)
    X[1:] = (rng.random((rows - 1, width)) * 8.0).astype(np.float32)
    X[1:] *= rng.random((rows - 1, width)) < 0.3  # sparse, like one-hot/count features
    try:
        sess = ort_session(model)
        name = sess.get_inputs()[0].name
        labels = sess.run(None, {name: X})[0]
    except Exception as exc:
        raise ValueError(f"{model} does not run on {width}-wide {component} rows: {exc}"
                         ) from None
    return Vectors(tuple(tuple(float(x) for x in r) for r in X),
                   tuple(int(v) for v in np.asarray(labels).reshape(-1)[:rows]))
