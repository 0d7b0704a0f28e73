"""The runtime's fast paths change no label: the priority label cache, the payload
templates' value layouts, the batched stream detectors; and ``rapidmq-edge status`` shows
the intelligence state."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import cbor2
import pytest

from firmware_sim.generator import generate
from firmware_sim.scenario import Scenario
from rapidmq_edge.broker.broker import Broker, BrokerLimits
from rapidmq_edge.config.intelligence import IntelligenceSettings
from rapidmq_edge.intelligence.features import PAYLOAD_HEAD, message_features, reading_value
from rapidmq_edge.intelligence.models import load_scorer
from rapidmq_edge.intelligence.scoring import BatchScorer
from rapidmq_edge.intelligence.stream_detector import StreamDetector
from rapidmq_edge.intelligence.streams import (
    NO_VALUE,
    PARSE,
    TEMPLATE,
    reading_time,
    value_span,
)
from rapidmq_edge.ops.status import render
from rapidmq_edge.pipeline.intelligence_runtime import IntelligenceRuntime

MODELS = Path(__file__).resolve().parent.parent / "models"
#: a small held-out run (not the training seed), with faults of every kind
RUN = Scenario(seed=2002, devices=40, duration=900.0, coap_fraction=0.0, fault_rate=6.0,
               attackers=0, misconfigured=0, dashboards=0)


#: a longer run: every sensor kind, outages, CBOR payloads (CoAP)
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
    sc = BatchScorer(load_scorer(MODELS, "priority", "off"), None, True)
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
