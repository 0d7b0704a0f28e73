"""Validate a candidate model file before it may run, even in shadow.

:func:`validate_candidate` checks, in this order, and raises :class:`CandidateRejected`
with the first failed check's ``reason``:

- ``size``: the file's byte length is the signed one;
- ``digest``: its SHA-256 is the signed one;
- ``load``: onnxruntime opens it (:func:`~rapidmq_edge.intelligence.models.ort_session`);
- ``shapes``: the declared input/output signature (when given) and the session's own are
  the component's contract (:data:`~rapidmq_edge.intelligence.models.CONTRACTS`): one input
  ``features`` float32 [N, width], outputs ``label`` int64 [N] then ``probabilities``
  float32 [N, labels];
- ``vectors``: every validation vector (a feature row and its expected label) scores to its
  label (and to its probabilities within a tolerance, when given).

It returns a :class:`ValidatedModel` holding a ready :class:`~.intelligence.models.Scorer`
(the class the runtime scores with), for shadow use and promotion.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..intelligence.models import CONTRACTS, Scorer, ort_session

__all__ = ["REASONS", "CandidateRejected", "TensorSpec", "ValidatedModel", "contract_signature",
           "validate_candidate"]

#: the reasons :class:`CandidateRejected` carries
REASONS = ("size", "digest", "load", "shapes", "vectors")
#: onnxruntime's type names for the dtypes a signature names
ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}
#: default absolute tolerance of expected probabilities
PROB_TOLERANCE = 1e-4


class CandidateRejected(Exception):
    """A candidate failed a check: ``reason`` (one of :data:`REASONS`) and ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype ("float32", "int64") and shape (None: any size)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class ValidatedModel:
    """A candidate that passed every check, with the scorer the runtime can use."""

    component: str
    path: Path
    digest: str  # SHA-256, hex
    size: int
    version: str
    scorer: Scorer
    load_ms: float  # session creation + vectors


def contract_signature(component: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The (inputs, outputs) a model of ``component`` must have."""
    try:
        features, labels, _ = CONTRACTS[component]
    except KeyError:
        raise CandidateRejected("shapes", f"no model contract for component {component!r}"
                                ) from None
    return ((TensorSpec("features", "float32", (None, len(features))),),
            (TensorSpec("label", "int64", (None,)),
             TensorSpec("probabilities", "float32", (None, len(labels)))))


def validate_candidate(component: str, model_path: Path, expected_digest: str | bytes,
                       expected_size: int, inputs: Iterable[Any] | None = None,
                       outputs: Iterable[Any] | None = None, vectors: Iterable[Any] = (),
                       version: str = "", require_vectors: bool = True) -> ValidatedModel:
    """Check ``model_path`` as a model of ``component`` (module docstring) or raise
    :class:`CandidateRejected`. ``inputs`` / ``outputs``: the declared signature (specs as
    :class:`TensorSpec`, mappings with name/dtype/shape, or (name, dtype, shape));
    ``vectors``: (row, label) pairs or mappings with ``input`` and ``label`` (optionally
    ``probabilities`` and ``tolerance``)."""
    t0 = time.perf_counter()
    want_in, want_out = contract_signature(component)
    digest = expected_digest.hex() if isinstance(expected_digest, bytes) else expected_digest
    size, got_digest = _size_and_digest(model_path)
    if size != expected_size:
        raise CandidateRejected("size", f"{model_path.name} is {size} bytes, signed "
                                        f"{expected_size}")
    if got_digest != digest.lower():
        raise CandidateRejected("digest", f"{model_path.name} sha256 {got_digest[:16]}... is "
                                          f"not the signed {digest[:16]}...")
    try:
        sess = ort_session(model_path)
    except Exception as exc:
        raise CandidateRejected("load", f"onnxruntime cannot load {model_path.name}: "
                                        f"{str(exc)[:300]}") from None
    if inputs is not None:
        _same("declared inputs", [_spec(x) for x in inputs], want_in)
    if outputs is not None:
        _same("declared outputs", [_spec(x) for x in outputs], want_out)
    _same("model inputs", [_from_ort(x) for x in sess.get_inputs()], want_in)
    _same("model outputs", [_from_ort(x) for x in sess.get_outputs()], want_out)
    features, labels, _ = CONTRACTS[component]
    scorer = Scorer(component, "model", f"{version or '?'}+{digest[:12]}", labels,
                    len(features), session=sess, path=model_path)
    _check_vectors(scorer, list(vectors), require_vectors)
    return ValidatedModel(component, model_path, digest, size, version, scorer,
                          (time.perf_counter() - t0) * 1000)


def _size_and_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise CandidateRejected("size", f"cannot read {path}: {exc.strerror or exc}") from None
    return size, h.hexdigest()


def _spec(x: Any) -> TensorSpec:
    """A declared tensor in any of the accepted forms as a :class:`TensorSpec`."""
    if isinstance(x, TensorSpec):
        return x
    if isinstance(x, Mapping):
        name, dtype, shape = x.get("name"), x.get("dtype"), x.get("shape")
    elif isinstance(x, Sequence) and not isinstance(x, str | bytes) and len(x) == 3:
        name, dtype, shape = x
    else:
        raise CandidateRejected("shapes", f"unreadable tensor signature {x!r:.80}")
    if not isinstance(name, str) or not isinstance(dtype, str) or \
            not isinstance(shape, Sequence) or isinstance(shape, str | bytes):
        raise CandidateRejected("shapes", f"unreadable tensor signature {x!r:.80}")
    return TensorSpec(name, dtype, tuple(_dim(d) for d in shape))


def _dim(d: Any) -> int | None:
    """A fixed dimension, or None for a free one (None, -1, a symbolic name)."""
    if isinstance(d, bool):
        raise CandidateRejected("shapes", f"dimension {d!r} is not a size")
    if isinstance(d, int):
        return d if d >= 0 else None
    if d is None or isinstance(d, str):
        return None
    raise CandidateRejected("shapes", f"dimension {d!r} is not a size")


def _from_ort(node: Any) -> TensorSpec:
    dtype = next((k for k, v in ORT_TYPES.items() if v == node.type), node.type)
    return TensorSpec(node.name, dtype, tuple(_dim(d) for d in node.shape))


def _same(what: str, got: list[TensorSpec], want: tuple[TensorSpec, ...]) -> None:
    """``got`` is ``want``; the batch dimension (the first) may be fixed or free."""
    def show(specs: Sequence[TensorSpec]) -> str:
        return ", ".join(f"{s.name} {s.dtype} {list(s.shape)}" for s in specs)

    ok = len(got) == len(want) and all(
        g.name == w.name and g.dtype == w.dtype and len(g.shape) == len(w.shape)
        and g.shape[1:] == w.shape[1:] for g, w in zip(got, want, strict=False))
    if not ok:
        raise CandidateRejected("shapes", f"{what} are [{show(got)}], the contract is "
                                          f"[{show(want)}]")


def _check_vectors(scorer: Scorer, vectors: list[Any], required: bool) -> None:
    if not vectors:
        if required:
            raise CandidateRejected("vectors", "no validation vectors")
        return
    rows, want, probs, tols = [], [], [], []
    for i, v in enumerate(vectors):
        if isinstance(v, Mapping):
            row, label = v.get("input", v.get("inputs")), v.get("label")
            probs.append(v.get("probabilities"))
            tols.append(float(v.get("tolerance", PROB_TOLERANCE)))
        elif isinstance(v, Sequence) and len(v) == 2:
            row, label = v
            probs.append(None)
            tols.append(PROB_TOLERANCE)
        else:
            raise CandidateRejected("vectors", f"vector {i} is not (row, label)")
        if not isinstance(label, int) or isinstance(label, bool):
            raise CandidateRejected("vectors", f"vector {i} has no integer label")
        rows.append(row)
        want.append(label)
    try:
        X = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise CandidateRejected("vectors", f"vector rows are not numbers: {exc}") from None
    if X.ndim != 2 or X.shape[1] != scorer.width:
        raise CandidateRejected("vectors", f"vector rows are {list(X.shape)}, the model "
                                           f"takes [N, {scorer.width}]")
    try:
        got, _ = scorer.predict(X)
        full = scorer.session.run(None, {"features": X})[1]
    except Exception as exc:
        raise CandidateRejected("vectors", f"the model fails on its vectors: "
                                           f"{str(exc)[:300]}") from None
    for i, (g, w) in enumerate(zip(got.tolist(), want, strict=True)):
        if g != w:
            raise CandidateRejected("vectors", f"vector {i} scores label {g}, expected {w}")
    for i, (p, tol) in enumerate(zip(probs, tols, strict=True)):
        if p is not None and not np.allclose(full[i], np.asarray(p, np.float32), atol=tol):
            raise CandidateRejected("vectors", f"vector {i} probabilities "
                                               f"{np.round(full[i], 5).tolist()} differ from "
                                               f"{p} beyond {tol:g}")
