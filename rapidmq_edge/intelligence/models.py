"""Load the ONNX models by manifest, verify them, and fall back to the rules on any doubt.

A model is used only when its manifest (``models/<name>.json``) names the feature spec this
gateway computes, the file's SHA-256 matches, the input width and labels are the expected
ones, and the manifest's golden rows score to their recorded labels in a real
onnxruntime session. Anything else (missing, corrupt, tampered, other spec) logs why and
yields the rule-based :class:`Scorer` of :mod:`.rules`: the gateway keeps running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import rules
from .features import (
    ANOMALY_LABELS,
    CLIENT_FEATURES,
    FEATURE_SPEC,
    MESSAGE_FEATURES,
    PRIORITY_LABELS,
    RESIDUAL_FEATURES,
    THREAT_LABELS,
)

log = logging.getLogger(__name__)

#: model name -> (feature columns, labels, rule fallback)
CONTRACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...],
                           Callable[[np.ndarray], np.ndarray]]] = {
    "priority": (MESSAGE_FEATURES, PRIORITY_LABELS, rules.priority_rules),
    "anomaly": (RESIDUAL_FEATURES, ANOMALY_LABELS, rules.residual_rules),
    "threat": (CLIENT_FEATURES, THREAT_LABELS, rules.threat_rules),
}


class ModelRejected(Exception):
    """A model file or manifest failed verification; the message says which check."""


def ort_session(path: Path) -> Any:
    """An onnxruntime session: 1 intra-op thread, sequential, no spinning threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


@dataclass
class Scorer:
    """Scores feature rows: ``predict(X)`` -> (class indices, confidence of each).

    ``source`` is "model" (an ONNX session), "rules" (:mod:`.rules`) or "off";
    ``fallback`` is why a wanted model is not used (None when nothing fell back).
    """

    name: str
    source: str
    version: str
    labels: tuple[str, ...]
    width: int
    session: Any = None
    rule: Callable[[np.ndarray], np.ndarray] | None = None
    fallback: str | None = None
    path: Path | None = None  # the verified ONNX file
    outputs: list[str] | None = None  # named, run() skips listing them per call (~1 µs)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels (int64) and the probability of each chosen label (1.0 for rules)."""
        if self.session is not None:
            if self.outputs is None:
                self.outputs = [o.name for o in self.session.get_outputs()]
            label, probs = self.session.run(self.outputs, {"features": X})
            conf = probs[np.arange(len(label)), label] if len(label) else np.zeros(0, np.float32)
            return label, conf
        assert self.rule is not None
        out = self.rule(X)
        return out, np.ones(len(out), dtype=np.float32)

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``[N, labels]`` (the rules' label: probability 1)."""
        if self.session is not None:
            if self.outputs is None:
                self.outputs = [o.name for o in self.session.get_outputs()]
            probs: np.ndarray = self.session.run(self.outputs[1:2], {"features": X})[0]
            return probs
        assert self.rule is not None
        out = np.zeros((len(X), len(self.labels)), dtype=np.float32)
        out[np.arange(len(X)), self.rule(X)] = 1.0
        return out

    def predict_labels(self, X: np.ndarray) -> list[int]:
        """:meth:`predict`'s labels alone (no confidences to gather), as a list."""
        if self.session is not None:
            if self.outputs is None:
                self.outputs = [o.name for o in self.session.get_outputs()]
            out: list[int] = self.session.run(self.outputs[:1], {"features": X})[0].tolist()
            return out
        assert self.rule is not None
        rules: list[int] = self.rule(X).tolist()
        return rules


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_and_load(models_dir: Path, name: str) -> tuple[Any, dict[str, Any]]:
    """The onnxruntime session of model ``name`` and its manifest, or ModelRejected."""
    features, labels, _ = CONTRACTS[name]
    man_path = models_dir / f"{name}.json"
    try:
        man = json.loads(man_path.read_text())
    except FileNotFoundError:
        raise ModelRejected(f"no manifest {man_path}") from None
    except (OSError, ValueError) as exc:
        raise ModelRejected(f"unreadable manifest {man_path}: {exc}") from None
    if not isinstance(man, dict):
        raise ModelRejected(f"manifest {man_path} is not a JSON object")
    if man.get("feature_spec") != FEATURE_SPEC:
        raise ModelRejected(
            f"feature spec {man.get('feature_spec')!r} is not this gateway's {FEATURE_SPEC!r}")
    if man.get("labels") != list(labels):
        raise ModelRejected(f"labels {man.get('labels')!r} are not {list(labels)!r}")
    inp = man.get("input") or {}
    if inp.get("feature_names") != list(features):
        raise ModelRejected("input feature names differ from this gateway's features")
    path = models_dir / str(man.get("file", f"{name}.onnx"))
    if path.resolve().parent != models_dir.resolve():
        raise ModelRejected(f"model file {man.get('file')!r} is outside {models_dir}")
    try:
        digest = _sha256(path)
    except OSError as exc:
        raise ModelRejected(f"cannot read {path}: {exc.strerror or exc}") from None
    if digest != man.get("sha256"):
        raise ModelRejected(f"{path.name} sha256 {digest[:16]}... does not match the manifest")
    try:
        sess = ort_session(path)
    except Exception as exc:
        raise ModelRejected(f"onnxruntime cannot load {path.name}: {exc}") from None
    ins = sess.get_inputs()
    if len(ins) != 1 or ins[0].name != "features" or ins[0].shape[1] != len(features):
        raise ModelRejected(f"{path.name} input is not features [N, {len(features)}]")
    gold = man.get("golden") or {}
    rows = np.asarray(gold.get("inputs", []), dtype=np.float32)
    want = list(gold.get("labels", []))
    if len(want) < 2 or rows.shape != (len(want), len(features)):
        raise ModelRejected("manifest has no usable golden rows")
    try:
        got = sess.run(None, {"features": rows})[0].tolist()
    except Exception as exc:
        raise ModelRejected(f"{path.name} fails on its golden rows: {exc}") from None
    if got != want:
        raise ModelRejected(f"{path.name} scores its golden rows as {got}, not {want}")
    return sess, man


def load_scorer(models_dir: Path, name: str, mode: str) -> Scorer:
    """The scorer for ``mode`` ("model", "rules", "off"); a rejected model -> rules."""
    features, labels, rule = CONTRACTS[name]
    if mode == "off":
        return Scorer(name, "off", "", labels, len(features))
    if mode == "rules":
        return Scorer(name, "rules", "rules", labels, len(features), rule=rule)
    try:
        sess, man = verify_and_load(models_dir, name)
    except ModelRejected as exc:
        log.error("intelligence: %s model not used, rule fallback active: %s", name, exc)
        return Scorer(name, "rules", "rules", labels, len(features), rule=rule,
                      fallback=str(exc))
    version = f"{man.get('version', '?')}+{str(man['sha256'])[:12]}"
    log.info("intelligence: %s model %s loaded from %s", name, version, models_dir)
    return Scorer(name, "model", version, labels, len(features), session=sess,
                  path=models_dir / str(man.get("file", f"{name}.onnx")))


class ShadowSink(Protocol):
    """Where a :class:`Shadow` reports (``ota.shadow.ShadowEvaluator.feed``)."""

    def feed(self, active_labels: np.ndarray, active_conf: np.ndarray,
             cand_labels: np.ndarray | None, cand_conf: np.ndarray | None, *,
             cand_seconds: float = 0.0, active_seconds: float = 0.0,
             rows_run: int | None = None, exceptions: int = 0, error: str = "") -> None: ...


class Shadow:
    """A candidate scorer beside the active one: scores the rows the active one scored and
    reports both answers to ``sink``; it never decides and never raises (a candidate that
    raises counts an exception in the sink)."""

    def __init__(self, candidate: Scorer, sink: ShadowSink) -> None:
        self.candidate = candidate
        self.sink = sink
        #: per message key (priority): (active label, confidence, candidate label, confidence)
        self.known: dict[Any, tuple[int, float, int, float]] = {}
        self.errors = 0  # failures of the sink itself (logged once, counted)

    def rows(self, X: np.ndarray, labels: np.ndarray, conf: np.ndarray,
             active_seconds: float) -> None:
        """The active scorer gave ``labels``/``conf`` for ``X`` in ``active_seconds``."""
        try:
            t0 = time.thread_time()
            try:
                c_lab, c_conf = self.candidate.predict(X)
            except Exception as exc:  # the candidate's failure, counted against it
                self.sink.feed(labels, conf, None, None,
                               cand_seconds=time.thread_time() - t0,
                               active_seconds=active_seconds, exceptions=1,
                               error=f"{type(exc).__name__}: {exc}")
                return
            self.sink.feed(labels, conf, c_lab, c_conf, cand_seconds=time.thread_time() - t0,
                           active_seconds=active_seconds)
        except Exception:
            self._failed()

    def keyed(self, active: Scorer, keys: list[Any],
              rows: Callable[[list[int]], np.ndarray], limit: int = 65_536) -> None:
        """Per message ``keys`` (equal key, equal feature row): rows of keys not seen yet
        (``rows(positions)``) are scored by both ``active`` and the candidate, timed; then
        every message is reported with its key's answers."""
        if not keys:
            return
        try:
            known = self.known
            miss = [i for i, k in enumerate(keys) if k not in known]
            if miss:
                uniq = list({keys[i]: i for i in miss}.values())
                X = rows(uniq)
                t0 = time.thread_time()
                a_lab, a_conf = active.predict(X)
                t1 = time.thread_time()
                try:
                    c_lab, c_conf = self.candidate.predict(X)
                except Exception as exc:
                    self.sink.feed(a_lab, a_conf, None, None,
                                   cand_seconds=time.thread_time() - t1,
                                   active_seconds=t1 - t0, rows_run=len(uniq), exceptions=1,
                                   error=f"{type(exc).__name__}: {exc}")
                    return
                t2 = time.thread_time()
                if len(known) + len(uniq) > limit:
                    known.clear()
                for i, al, ac, cl, cc in zip(uniq, a_lab.tolist(), a_conf.tolist(),
                                             c_lab.tolist(), c_conf.tolist(), strict=True):
                    known[keys[i]] = (al, ac, cl, cc)
                seconds = (t1 - t0, t2 - t1, len(uniq))
            else:
                seconds = (0.0, 0.0, 0)
            al, ac, cl, cc = zip(*map(known.__getitem__, keys), strict=True)
            self.sink.feed(al, ac, cl, cc,  # type: ignore[arg-type]
                           cand_seconds=seconds[1], active_seconds=seconds[0],
                           rows_run=seconds[2])
        except Exception:
            self._failed()

    def _failed(self) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 1000 == 0:
            log.exception("intelligence: shadow of %s failed (%d times)", self.candidate.name,
                          self.errors)
