"""The committed ONNX models: manifests, real onnxruntime sessions, held-out quality floors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from firmware_sim.datasets import client_dataset, priority_dataset, residual_dataset
from firmware_sim.generator import generate
from firmware_sim.quality import (
    anomaly_quality,
    ort_session,
    per_class,
    predict,
    sha256_file,
    threat_quality,
)
from firmware_sim.scenario import Scenario
from rapidmq_edge.intelligence.fault_classifier import CombineParams
from rapidmq_edge.intelligence.features import (
    ANOMALY_LABELS,
    CLIENT_FEATURES,
    FEATURE_SPEC,
    MESSAGE_FEATURES,
    PRIORITY_LABELS,
    RESIDUAL_FEATURES,
    THREAT_LABELS,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
CONTRACT = {
    "priority": (MESSAGE_FEATURES, PRIORITY_LABELS),
    "anomaly": (RESIDUAL_FEATURES, ANOMALY_LABELS),
    "threat": (CLIENT_FEATURES, THREAT_LABELS),
}
#: a fresh run with a seed used neither for training (1001) nor for the model cards (2002)
FRESH = Scenario(seed=4242, devices=80, duration=1800.0, coap_fraction=0.2, fault_rate=4.0,
                 attackers=15, misconfigured=4, dashboards=1)


@pytest.fixture(scope="module")
def fresh_run():  # type: ignore[no-untyped-def]
    return generate(FRESH)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_manifest_matches_model_and_feature_contract(name: str) -> None:
    features, labels = CONTRACT[name]
    man = json.loads((MODELS / f"{name}.json").read_text())
    path = MODELS / man["file"]
    assert man["name"] == name and man["feature_spec"] == FEATURE_SPEC
    assert man["sha256"] == sha256_file(path) and man["bytes"] == path.stat().st_size
    assert path.stat().st_size < 1_000_000
    assert man["input"]["feature_names"] == list(features)
    assert man["input"]["shape"] == [None, len(features)] and man["labels"] == list(labels)
    assert (MODELS / f"{name}.md").read_text().count(man["sha256"]) == 1
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["feature_spec"] == FEATURE_SPEC and json.loads(meta["labels"]) == list(labels)
    assert [n.op_type for n in proto.graph.node] == ["TreeEnsembleClassifier"]  # one node
    sess = ort_session(path)
    (inp,) = sess.get_inputs()
    assert inp.name == man["input"]["name"] and inp.shape[1] == len(features)
    assert [o.name for o in sess.get_outputs()] == [o["name"] for o in man["outputs"]]
    gold = man["golden"]
    got, probs = predict(sess, np.asarray(gold["inputs"], np.float32))
    assert got.tolist() == gold["labels"] and len(gold["labels"]) >= 2
    assert probs.shape == (len(gold["labels"]), len(labels))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    with pytest.raises(Exception, match="(?i)dimension|shape|invalid"):
        sess.run(None, {inp.name: np.zeros((1, len(features) + 1), np.float32)})


def test_priority_quality_on_a_fresh_run(fresh_run) -> None:  # type: ignore[no-untyped-def]
    ds = priority_dataset(fresh_run)
    pred, _ = predict(ort_session(MODELS / "priority.onnx"), ds.X)
    q = per_class(ds.y, pred, ds.labels)
    assert q["macro_f1"] >= 0.9, q


def test_anomaly_quality_on_a_fresh_run(fresh_run) -> None:  # type: ignore[no-untyped-def]
    """Every reading's residual row, read at the gateway's fault threshold (the combined
    verdicts, per reading and per episode, are tests/test_stream_detector_classifier.py's)."""
    ds = residual_dataset(fresh_run)
    probs = ort_session(MODELS / "anomaly.onnx").run(None, {"features": ds.X})[1]
    fault = 1.0 - probs[:, 0] > CombineParams().p_fault
    pred = np.where(fault, 1 + np.argmax(probs[:, 1:], axis=1), 0)
    q = anomaly_quality(ds.y, pred, ds.scored, ds.labels)
    assert q["any_fault"]["precision"] >= 0.95 and q["any_fault"]["recall"] >= 0.95, q
    for kind in ANOMALY_LABELS[1:]:
        assert q[kind]["support"] > 0, kind
        assert q[kind]["precision"] >= 0.9 and q[kind]["recall"] >= 0.9, (kind, q[kind])


def test_threat_quality_on_a_fresh_run(fresh_run) -> None:  # type: ignore[no-untyped-def]
    ds = client_dataset(fresh_run)
    pred, _ = predict(ort_session(MODELS / "threat.onnx"), ds.X)
    q = threat_quality(ds.y, pred, ds.labels)
    assert q["attack_windows"] > 20 and q["recall"] >= 0.9, q
    assert q["false_positive_rate"] <= 0.005, q
