"""In-process pieces of the intelligence runtime: config, model verification, summaries,
the scored class in the forwarder, the threat watch on real rule/ONNX scorers."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rapidmq_edge.broker.message import Message
from rapidmq_edge.config import ConfigError, parse_config
from rapidmq_edge.config.forwarding import parse_forwarding
from rapidmq_edge.intelligence.models import ModelRejected, load_scorer, verify_and_load
from rapidmq_edge.intelligence.summarise import Summariser
from rapidmq_edge.intelligence.threat import ClientWatch
from rapidmq_edge.pipeline.forwarder import Forwarder
from rapidmq_edge.store.forward_queue import ForwardQueue

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.parametrize(("table", "message"), [
    ({"batch_window_ms": -1}, "intelligence.batch_window_ms: must be a number from 0 to 1000"),
    ({"priority": "ml"}, 'intelligence.priority: must be one of "model", "rules", "off"'),
    ({"classes": {"bulk": "low"}}, "intelligence.classes.bulk: must be one of"),
    ({"classes": {"urgent": "alarm"}}, "intelligence.classes.urgent: unknown key"),
    ({"summarise_classes": ["bulk", "x"]}, "intelligence.summarise_classes: must hold only"),
    ({"alert_topic": "a/#"}, "intelligence.alert_topic: must be a topic without wildcards"),
    ({"treshold": 1}, "intelligence.treshold: unknown key"),
])
def test_config_errors_name_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"intelligence": table}, Path("."))
    assert str(err.value).startswith(message), str(err.value)


def test_config_defaults_and_mapping(tmp_path: Path) -> None:
    c = parse_config({}, tmp_path).intelligence
    assert not c.enabled and not c.summarising and c.batch_window_ms == 1.0
    c = parse_config({"intelligence": {"enabled": True, "models_dir": "m",
                                       "classes": {"high": "alarm"},
                                       "summarise_classes": ["bulk"],
                                       "summarise_disk_percent": 90}}, tmp_path).intelligence
    assert c.models_dir == tmp_path / "m" and c.classes["high"] == 0 and c.classes["bulk"] == 3
    assert c.summarise_classes == (3,) and c.summarising


def test_manifest_checks_reject_and_fall_back(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    sess, man = verify_and_load(models, "priority")
    assert man["feature_spec"] == "rmqe-features/1" and sess is not None
    # another feature spec
    doc = json.loads((models / "priority.json").read_text())
    (models / "priority.json").write_text(json.dumps({**doc, "feature_spec": "rmqe-features/0"}))
    with pytest.raises(ModelRejected, match="feature spec"):
        verify_and_load(models, "priority")
    # golden rows that no longer score as recorded (a swapped model with a forged digest)
    gold = dict(doc["golden"])
    gold["labels"] = [(x + 1) % 4 for x in gold["labels"]]
    (models / "priority.json").write_text(json.dumps({**doc, "golden": gold}))
    with pytest.raises(ModelRejected, match="golden rows"):
        verify_and_load(models, "priority")
    (models / "priority.json").write_text("{not json")
    sc = load_scorer(models, "priority", "model")
    assert sc.source == "rules" and sc.fallback and "unreadable manifest" in sc.fallback
    # the rules answer in the model's place with the same labels
    X = np.zeros((2, sc.width), np.float32)
    labels, conf = sc.predict(X)
    assert labels.tolist() == [2, 2] and conf.tolist() == [1.0, 1.0]  # "normal"
    assert load_scorer(models, "anomaly", "off").source == "off"


def test_summariser_windows() -> None:
    s = Summariser(window=10.0)
    for t, v in [(0.0, 3.0), (1.0, -1.0), (2.0, 4.0)]:
        s.add("a/b", t, v, 3, None)
    s.add("c", 5.0, 7.0, 2, None)
    assert s.due(9.0) == []
    (first,) = s.due(10.0)
    body = json.loads(first.payload())
    assert (body["count"], body["min"], body["max"], body["mean"]) == (3, -1.0, 4.0, 2.0)
    assert body["stream"] == "a/b" and body["start"] == 0.0 and body["end"] == 2.0
    assert [x.stream for x in s.due(11.0, everything=True)] == ["c"]
    assert s.readings == 4 and s.emitted == 2


def test_forwarder_uses_scored_class_unless_rule_is_explicit(tmp_path: Path) -> None:
    fw = parse_forwarding({
        "upstream": [{"name": "a", "urls": ["mqtt://127.0.0.1:1"]},
                     {"name": "b", "urls": ["mqtt://127.0.0.1:2"]}],
        "forward": [{"filter": "#", "upstream": "a"},
                    {"filter": "#", "upstream": "b", "priority": "bulk"}],
    }, tmp_path)

    async def run() -> dict[str, int]:
        q = ForwardQueue(tmp_path / "f.db", "normal", 0.001)
        f = Forwarder("gw", fw.forward, fw.upstreams, q)
        f(Message("x/y", b"1"), 0)  # scored: alarm
        f(Message("x/y", b"2"))  # not scored: the rule's class
        await asyncio.sleep(0.05)
        got = {f"{u}:{m.payload.decode()}": m.priority for u in ("a", "b")
               for m in q.fetch(u, 10)}
        await q.close()
        return got

    got = asyncio.run(run())
    assert got == {"a:1": 0, "a:2": 2, "b:1": 3, "b:2": 3}


class _Link:
    def __init__(self) -> None:
        self.reasons: list[int] = []
        self.rates: list[float] = []

    def disconnect(self, reason: int, why: str = "") -> None:
        self.reasons.append(reason)

    def limit_rate(self, rate: float) -> None:
        self.rates.append(rate)


@pytest.mark.parametrize("mode", ["model", "rules"])
def test_threat_watch_flood_and_guessing(mode: str) -> None:
    now = [100.0]
    watch = ClientWatch(load_scorer(MODELS, "threat", mode), ban_s=30.0,
                        clock=lambda: now[0])
    good, bad = _Link(), _Link()
    watch.connected(good, "dev", "u", 0)
    watch.connected(bad, "spam", "guest", 0)
    for i in range(400):
        now[0] += 0.002
        watch.published("spam", f"spam/x/{i % 2}", 800, True)
        if i % 40 == 0:
            watch.published("dev", "site/t", 60, True)
    for i in range(12):
        watch.connected(_Link(), "guess", f"user{i % 4}", 0x86)
    verdicts = {v.client: v.label for v in watch.tick()}
    assert verdicts == {"spam": "flood", "guess": "credential_guessing"}
    assert bad.reasons == [0x96] and good.reasons == []
    assert watch.admit("spam") == 0x8A and watch.admit("guess") == 0x8A
    assert watch.admit("dev") == 0
    now[0] += 31
    assert watch.admit("spam") == 0  # the ban is over
    assert watch.status()["disconnected"] == 1


@pytest.mark.parametrize("mode", ["model", "rules"])
def test_threat_watch_throttles_a_first_flood_then_escalates(mode: str) -> None:
    now = [100.0]
    watch = ClientWatch(load_scorer(MODELS, "threat", mode), ban_s=30.0,
                        clock=lambda: now[0], throttle_rate=2.0)

    def flood(cid: str, n: int, dt: float) -> None:
        for i in range(n):
            now[0] += dt
            watch.published(cid, f"spam/x/{i % 2}", 800, True)

    bad = _Link()
    watch.connected(bad, "spam", None, 0)
    flood("spam", 400, 0.002)
    assert [(v.client, v.action) for v in watch.tick()] == [("spam", "throttled to 2/s")]
    assert bad.rates == [2.0] and bad.reasons == []
    assert watch.admit("spam") == 0  # throttled, not banned
    flood("spam", 12, 0.5)  # held at its limit: 12 in 6 s is not a flood
    assert watch.tick() == [] and bad.reasons == []
    flood("spam", 300, 0.002)  # still flooding in a window after the throttle
    assert [v.action for v in watch.tick()] == ["disconnected"]
    assert bad.reasons == [0x96] and watch.admit("spam") == 0x8A
    st = watch.status()
    assert (st["throttled"], st["throttled_now"], st["disconnected"]) == (1, 0, 1)
    # a client id throttled before that floods again within ban_s is not throttled twice
    now[0] += 31
    assert watch.admit("spam") == 0
    again = _Link()
    watch.connected(again, "spam", None, 0)
    flood("spam", 400, 0.002)
    assert [v.action for v in watch.tick()] == ["disconnected"]
    assert again.rates == [] and again.reasons == [0x96]


def test_threat_watch_throttles_when_not_certain() -> None:
    """The band [throttle_confidence, min_confidence) throttles and never disconnects;
    ``action = "throttle"`` never disconnects either."""
    now = [100.0]
    for action, dt in [("disconnect", 0.0001), ("throttle", 0.002)]:
        watch = ClientWatch(load_scorer(MODELS, "threat", "model"), action=action,
                            throttle_rate=5.0, throttle_confidence=0.5, clock=lambda: now[0])
        link = _Link()
        watch.connected(link, "c", None, 0)
        for _ in range(2):  # 400 publishes in 0.04 s: a flood, but only probably (0.56)
            for i in range(400):
                now[0] += dt
                watch.published("c", f"spam/x/{i % 2}", 800, True)
            verdicts = watch.tick()
            assert [v.action for v in verdicts] in (["throttled to 5/s"], [])
            assert all(0.5 <= v.confidence < 0.7 for v in verdicts) or action == "throttle"
        assert link.reasons == [] and link.rates == [5.0]
        assert watch.status()["throttled_now"] == 1 and watch.admit("c") == 0
