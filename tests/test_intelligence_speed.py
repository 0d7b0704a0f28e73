"""The runtime's fast paths change no label: the proven anomaly gate, the priority label
cache, the payload templates' value layouts, the steady streams' update; and
``rapidmq-edge status`` shows the intelligence state."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import cbor2
import numpy as np
import onnx
import pytest

from firmware_sim.datasets import anomaly_dataset
from firmware_sim.generator import generate
from firmware_sim.scenario import Scenario
from rapidmq_edge.broker.broker import Broker, BrokerLimits
from rapidmq_edge.config.intelligence import IntelligenceSettings
from rapidmq_edge.intelligence import rules
from rapidmq_edge.intelligence.features import (
    PAYLOAD_HEAD,
    StreamTable,
    message_features,
    reading_value,
)
from rapidmq_edge.intelligence.healthy_region import (
    MODEL_BOX,
    HealthyRegion,
    healthy_region_for,
    rules_box,
    tree_ensemble,
    verify_box,
)
from rapidmq_edge.intelligence.models import load_scorer
from rapidmq_edge.intelligence.scoring import BatchScorer
from rapidmq_edge.intelligence.stream_detector import StreamDetector
from rapidmq_edge.intelligence.streams import (
    _ZERO,
    NO_VALUE,
    PARSE,
    TEMPLATE,
    Box,
    _scalar_step,
    reading_time,
    value_span,
)
from rapidmq_edge.ops.status import render
from rapidmq_edge.pipeline.intelligence_runtime import IntelligenceRuntime

MODELS = Path(__file__).resolve().parent.parent / "models"
#: a small held-out run (not the training seed), with faults of every kind
RUN = Scenario(seed=2002, devices=40, duration=900.0, coap_fraction=0.0, fault_rate=6.0,
               attackers=0, misconfigured=0, dashboards=0)


#: a longer run for the stream state: steady streams, outages (gaps), CBOR payloads (CoAP)
LONG = Scenario(seed=5, devices=30, duration=3600.0, coap_fraction=0.3, fault_rate=6.0,
                outage_rate=1.0)


@pytest.fixture(scope="module")
def run() -> object:
    return generate(RUN)


def _runtime(mode: str = "model", models: Path = MODELS) -> IntelligenceRuntime:
    rt = IntelligenceRuntime(IntelligenceSettings(enabled=True, models_dir=models,
                                                  priority=mode, anomaly=mode, threat="off"),
                             None, None, Broker(BrokerLimits()).publish)
    rt.priority = load_scorer(models, "priority", mode)  # no upstream turns it off
    rt.scorer = BatchScorer(rt.priority, rt.detector, True)
    return rt


def _reference_rows(keys: Sequence[str], ts: Sequence[float],
                    xs: Sequence[float], states: dict[str, list[float]]) -> list[list[float]]:
    """Stream features the plain way: every reading through the general update."""
    rows = []
    for k, t, x in zip(keys, ts, xs, strict=True):
        row, states[k] = _scalar_step(states.get(k, _ZERO), float(t), float(x))
        rows.append(row)
    return rows


def test_gate_box_is_proven_on_the_model_and_skips_most_healthy_readings(run: object) -> None:
    ens = tree_ensemble(onnx.load(str(MODELS / "anomaly.onnx")))
    gate = healthy_region_for(load_scorer(MODELS, "anomaly", "model"))
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
    gate = HealthyRegion(*np.asarray(rules_box(), np.float32).T.copy(), "rules")
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
    """Label cache + value layouts give every message the labels that the plain path gives
    it (``message_features`` + scorer for every message), and the batched detectors the
    verdicts one plain :class:`StreamDetector` per stream gives, reading by reading."""
    msgs = sorted(run.messages, key=lambda m: m.t)[:3000]  # type: ignore[attr-defined]
    rt = _runtime(mode)
    plain: dict[str, StreamDetector] = {}
    got_p, got_a, want_p, want_a = [], [], [], []
    for i in range(0, len(msgs), batch):
        c = msgs[i:i + batch]
        topics, payloads = [m.topic for m in c], [m.payload for m in c]
        qos, retain, times = [m.qos for m in c], [m.retain for m in c], [m.t for m in c]
        r = rt._score(topics, payloads, qos, retain, times, list(range(len(c))))
        got_p += list(r.priority or [])
        got_a += r.verdicts if r.verdicts is not None else [None] * len(c)
        want_p += rt.priority.predict(message_features(topics, payloads, qos, retain))[0].tolist()
        vals = [reading_value(p) for p in payloads]
        assert r.values == vals
        for topic, p, t, v in zip(topics, payloads, times, vals, strict=True):
            dt = reading_time(p)  # judged on the device's clock when it has one
            want_a.append(None if v is None else plain.setdefault(
                topic, StreamDetector(rt.detector)).update(t if dt is None else dt, v))
    assert got_p == want_p
    assert got_a == want_a
    assert any(v is not None for v in want_a) and len(set(want_p)) >= 3
    assert rt.scorer.cache_hits > len(msgs) // 2


def test_steady_streams_equal_the_general_update() -> None:
    """The steady-stream fast path of the stream table gives bit-identical rows and states
    to the general update on a simulator run with outages, faults and every sensor kind;
    readings it leaves out for a box are exactly those whose row is inside the box."""
    msgs = [m for m in sorted(generate(LONG).messages, key=lambda m: m.t)
            if m.value is not None]
    keys, ts, xs = [m.topic for m in msgs], [m.t for m in msgs], [float(m.value) for m in msgs]
    table, boxed = StreamTable(), StreamTable()
    gate = healthy_region_for(load_scorer(MODELS, "anomaly", "model"))
    assert gate is not None
    bounds = Box(gate.lo.tolist(), gate.hi.tolist())
    states: dict[str, list[float]] = {}
    rows: list[list[float]] = []
    kept = 0
    for i in range(0, len(msgs), 37):
        part = slice(i, i + 37)
        rows += table.update_rows(keys[part], ts[part], xs[part])
        pos, out = boxed.update_outside(keys[part], ts[part], xs[part], bounds)
        ref = _reference_rows(keys[part], ts[part], xs[part], states)
        inside = [j for j, row in enumerate(ref) if row in bounds]
        assert pos == [j for j in range(len(ref)) if j not in set(inside)]
        assert out == [ref[j] for j in pos]
        kept += len(pos)
    want = _reference_rows(keys, ts, xs, {})
    assert rows == want  # float64, bit for bit
    assert table._rows == states == boxed._rows
    steady = sum(1 for r in want if r[0] == 1.0 and r[9] == 0.0)
    assert steady > len(want) // 2 and any(r[9] == 1.0 for r in want)  # fast path and gaps
    assert 0 < kept < len(msgs) * 3 // 4  # the box spares the model many readings


def test_value_layouts_equal_reading_value() -> None:
    """The scorer reads every payload's value through its template's layout exactly as
    ``reading_value`` does: simulator payloads (JSON, CBOR, log lines) and awkward ones,
    each seen again with other digits after its layout is known."""
    payloads = [m.payload for m in generate(LONG).messages]
    odd = [b'{"value":1e999}', b'{"value":-0.0}', b'{"value": 12 , "value":7}',
           b'{"a":{"value":3}}', b'{"value":[1]}', b'{"val\\u0075e":2}', b'{"value":"4"}',
           b'{"value":5', b'{"value":6}  ', b"2023 ERROR value 9", b"", b"{",
           b'{"value":1.5e-3,"x":2}', cbor2.dumps({"value": 8.5}), json.dumps(
               {"value": 1.25, "pad": "x" * PAYLOAD_HEAD}).encode()]
    again = [p.replace(b"1", b"9").replace(b"0", b"7") for p in odd]  # same templates
    sc = BatchScorer(load_scorer(MODELS, "priority", "off"),
                     load_scorer(MODELS, "anomaly", "off"), True)
    seen = payloads + odd + again
    for i in range(0, len(seen), 50):
        batch = seen[i:i + 50]
        values, idx = sc._values(batch, [p[:PAYLOAD_HEAD].translate(TEMPLATE) for p in batch])
        want = [reading_value(p) for p in batch]
        assert values == want, batch
        assert [math.copysign(1, v) for v in values if v is not None] == [
            math.copysign(1, v) for v in want if v is not None]  # -0.0 stays -0.0
        assert idx == [j for j, v in enumerate(want) if v is not None]
    layouts = {value_span(p.translate(TEMPLATE)) for p in odd}
    assert NO_VALUE in layouts and PARSE in layouts and any(s[0] >= 0 for s in layouts)
    json_payloads = [p for p in payloads if p[:1] == b"{"]
    assert 0 < len(sc._spans) < len(json_payloads) // 10  # far fewer layouts than payloads


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
    assert "  intelligence: priority 1." in text and "anomaly detector" in text
    assert "1 streams watched" in text and "alerts 2" in text
    assert "summaries off" in text and "FALLBACK" not in text
    # a missing model: the rules stand in, and status says so
    fb = _runtime(models=tmp_path)
    text = render({"written_at": time.time(), "interval": 5, "gateway": "gw",
                   "broker": {}, "forwarding": None, "intelligence": fb.snapshot()})
    assert "priority RULES (fallback)" in text and "FALLBACK ACTIVE: priority: no manifest" in text
    assert "anomaly detector" in text  # needs no model file
    # no [intelligence]: no section
    assert "intelligence" not in render({"written_at": time.time(), "broker": {},
                                         "forwarding": None, "intelligence": None})
