"""The runtime's fast paths change no label: the proven anomaly gate, the priority label
cache, the scalar stream rows; and ``rapidmq-edge status`` shows the intelligence state."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from firmware_sim.datasets import anomaly_dataset
from firmware_sim.generator import generate
from firmware_sim.scenario import Scenario
from rapidmq_edge.broker.broker import Broker, BrokerLimits
from rapidmq_edge.config_intelligence import IntelligenceSettings
from rapidmq_edge.intelligence import rules
from rapidmq_edge.intelligence.features import (
    MESSAGE_FEATURES,
    StreamTable,
    message_features,
    reading_value,
)
from rapidmq_edge.intelligence.gate import (
    MODEL_BOX,
    Gate,
    gate_for,
    rules_box,
    tree_ensemble,
    verify_box,
)
from rapidmq_edge.intelligence.models import load_scorer
from rapidmq_edge.intelligence.runtime import IntelligenceRuntime
from rapidmq_edge.intelligence.splitkey import split_key_for
from rapidmq_edge.ops.status import render

MODELS = Path(__file__).resolve().parent.parent / "models"
#: a small held-out run (not the training seed), with faults of every kind
RUN = Scenario(seed=2002, devices=40, duration=900.0, coap_fraction=0.0, fault_rate=6.0,
               attackers=0, misconfigured=0, dashboards=0)


@pytest.fixture(scope="module")
def run() -> object:
    return generate(RUN)


def _runtime(mode: str = "model", models: Path = MODELS) -> IntelligenceRuntime:
    rt = IntelligenceRuntime(IntelligenceSettings(enabled=True, models_dir=models,
                                                  priority=mode, anomaly=mode, threat="off"),
                             Broker(BrokerLimits()), None)
    rt.priority = load_scorer(models, "priority", mode)  # no upstream turns it off
    rt._prio_split = split_key_for(rt.priority)
    return rt


def test_gate_box_is_proven_on_the_model_and_skips_most_healthy_readings(run: object) -> None:
    ens = tree_ensemble(onnx.load(str(MODELS / "anomaly.onnx")))
    gate = gate_for(load_scorer(MODELS, "anomaly", "model"))
    assert gate is not None and gate.source == "model"
    assert verify_box(ens, gate.lo, gate.hi)
    # the verifier can say no: a box reaching well into drift territory is refused
    wide = [list(b) for b in MODEL_BOX]
    wide[2] = [-30.0, 30.0]
    assert not verify_box(ens, *(np.asarray(wide, np.float32).T.copy()))
    ds = anomaly_dataset(run)  # type: ignore[arg-type]
    sess = load_scorer(MODELS, "anomaly", "model")
    labels, _ = sess.predict(ds.X)
    inside = gate.inside(ds.X)
    assert inside[ds.y == 0].mean() > 0.6  # most healthy readings skip the model
    assert np.all(labels[inside] == 0)  # and the model says "none" for every one of them
    assert np.any(labels != 0)  # the run has faults the gate leaves to the model


def test_rules_box_is_none_for_the_rules() -> None:
    gate = Gate(*np.asarray(rules_box(), np.float32).T.copy(), "rules")
    rng = np.random.default_rng(7)
    lo = np.maximum(gate.lo, -60)
    hi = np.minimum(gate.hi, 60)
    X = (lo + rng.random((20000, len(lo))) * (hi - lo)).astype(np.float32)
    X[:, 6] = np.round(X[:, 6])  # stuck counts are whole
    X[:5, :] = hi  # the corners too
    X[5:10, :] = lo
    assert gate.inside(X).all()
    assert not rules.anomaly_rules(X).any()
    edge = X[:1].copy()
    edge[0, 2] = rules.DRIFT_Z  # on the threshold: a drift, outside the box
    assert not gate.inside(edge).any() and rules.anomaly_rules(edge)[0] != 0


@pytest.mark.parametrize("mode", ["model", "rules"])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_runtime_labels_equal_the_plain_path(run: object, mode: str, batch: int) -> None:
    """Label cache + gate + scalar rows give every message the label that features +
    scorer give it without them (priority and anomaly, scalar and vectorised paths)."""
    msgs = sorted(run.messages, key=lambda m: m.t)[:3000]  # type: ignore[attr-defined]
    rt = _runtime(mode)
    ref_table = StreamTable()
    got_p, got_a, want_p, want_a = [], [], [], []
    for i in range(0, len(msgs), batch):
        c = msgs[i:i + batch]
        topics, payloads = [m.topic for m in c], [m.payload for m in c]
        qos, retain, times = [m.qos for m in c], [m.retain for m in c], [m.t for m in c]
        r = rt._score(topics, payloads, qos, retain, times, list(range(len(c))))
        got_p += list(r.priority or [])
        got_a += (r.anomaly.tolist() if r.anomaly is not None else [0] * len(c))
        want_p += rt.priority.predict(message_features(topics, payloads, qos, retain))[0].tolist()
        vals = [reading_value(p) for p in payloads]
        idx = [j for j, v in enumerate(vals) if v is not None]
        a = [0] * len(c)
        if idx:
            F = ref_table.update_keys([topics[j] for j in idx], [times[j] for j in idx],
                                      [vals[j] for j in idx])  # type: ignore[misc]
            for j, lab in zip(idx, rt.anomaly.predict(F)[0].tolist(), strict=True):
                a[j] = lab
        want_a += a
    assert got_p == want_p
    assert got_a == want_a
    assert any(want_a) and len(set(want_p)) >= 3
    assert rt.prio_cache_hits > len(msgs) // 2 and rt.anomaly_gated > len(msgs) // 4
    if mode == "model":
        assert rt.prio_cell_hits > 0  # level-1 misses answered by their split-grid cell


def test_split_grid_cells_have_one_output_and_thresholds_separate_them(run: object) -> None:
    """Rows in one cell of the priority model's split grid get identical probabilities; the
    two sides of a split threshold are different cells."""
    msgs = run.messages[:4000]  # type: ignore[attr-defined]
    sc = load_scorer(MODELS, "priority", "model")
    split = split_key_for(sc)
    assert split is not None and split_key_for(load_scorer(MODELS, "priority", "rules")) is None
    X = message_features([m.topic for m in msgs], [m.payload for m in msgs],
                         [m.qos for m in msgs], [m.retain for m in msgs])
    keys = split.keys(X)
    _, probs = sc.session.run(None, {"features": X})
    first: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        j = first.setdefault(k, i)
        assert np.array_equal(probs[i], probs[j]), (i, j)
    assert len(first) < len(msgs) // 4  # far fewer cells than messages
    # moving one value across a split threshold: another cell
    col = split.columns.index(MESSAGE_FEATURES.index("size_log2"))
    t = split.thresholds[col][len(split.thresholds[col]) // 2]
    a, b = X[:1].copy(), X[:1].copy()
    a[0, split.columns[col]] = t
    b[0, split.columns[col]] = np.nextafter(t, np.float32(np.inf))
    assert split.keys(a) != split.keys(b)
    assert split.keys(np.vstack([a, a])) == split.keys(a) * 2


def test_scalar_rows_equal_update_keys() -> None:
    a, b = StreamTable(), StreamTable()
    rng = np.random.default_rng(3)
    for k in range(200):
        keys = [f"s/{j}" for j in rng.integers(0, 4, 3)]
        ts = [k * 1.0 + j * 0.01 for j in range(3)]
        xs = rng.normal(20, 1, 3).round(1).tolist()
        rows = a.update_rows(keys, ts, xs)
        assert np.array_equal(np.array(rows, dtype=np.float32), b.update_keys(keys, ts, xs))


def test_reading_value_without_value_key() -> None:
    assert reading_value(b'{"ts":1.5,"event":"open","door":"d1"}') is None
    assert reading_value(b'{"val\\u0075e": 3.5}') == 3.5  # an escaped key is still found
    assert reading_value(b'{"ts":1.5,"value":-2.5e1,"unit":"C"}') == -25.0


def test_status_shows_the_intelligence_section(tmp_path: Path) -> None:
    rt = _runtime()
    rt._score(["site/a/temp/1/reading"], [b'{"value":21.5}'], [0], [False], [time.time()],
              [0])
    rt.scored, rt.batches, rt.alerts = 1, 1, 2
    text = render({"written_at": time.time(), "interval": 5, "gateway": "gw",
                   "broker": {}, "forwarding": None, "intelligence": rt.snapshot()})
    assert "  intelligence: priority 1." in text and "anomaly 1." in text
    assert "anomaly gate model" in text and "alerts 2" in text
    assert "summaries off" in text and "FALLBACK" not in text
    # a missing model: the rules stand in, and status says so
    fb = _runtime(models=tmp_path)
    text = render({"written_at": time.time(), "interval": 5, "gateway": "gw",
                   "broker": {}, "forwarding": None, "intelligence": fb.snapshot()})
    assert "priority RULES (fallback)" in text and "FALLBACK ACTIVE: priority: no manifest" in text
    assert "anomaly gate rules" in text
    # no [intelligence]: no section
    assert "intelligence" not in render({"written_at": time.time(), "broker": {},
                                         "forwarding": None, "intelligence": None})
