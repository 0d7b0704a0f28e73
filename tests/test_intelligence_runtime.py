"""In-process pieces of the intelligence runtime: config, model verification, summaries,
the scored class in the forwarder, the threat watch on real rule/ONNX scorers."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

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
    def __init__(self, backlog: int = 0) -> None:
        self.reasons: list[int] = []
        self.rates: list[float] = []
        self.restored = 0
        self.backlog = backlog

    def disconnect(self, reason: int, why: str = "") -> None:
        self.reasons.append(reason)

    def limit_rate(self, rate: float) -> None:
        self.rates.append(rate)

    def restore_rate(self) -> None:
        self.restored += 1

    def pending_input(self) -> int:
        return self.backlog


def _send(watch: ClientWatch, now: list[float], cid: str, n: int, rate: float,
          topic: str = "spam/x", size: int = 800) -> None:
    for _ in range(n):
        now[0] += 1.0 / rate
        watch.published(cid, topic, size, True)


@pytest.mark.parametrize("mode", ["model", "rules"])
def test_threat_watch_flood_is_throttled_guessing_banned(mode: str) -> None:
    now = [100.0]
    verdicts: list[Any] = []
    watch = ClientWatch(load_scorer(MODELS, "threat", mode), ban_s=30.0,
                        clock=lambda: now[0], throttle_rate=2.0, on_verdict=verdicts.append)
    good, bad = _Link(), _Link()
    watch.connected(good, "dev", "u", 0)
    watch.connected(bad, "spam", "guest", 0)
    _send(watch, now, "spam", 3000, 1000.0)  # 3 s at 1,000 msg/s: 2,400 above 200/s
    for i in range(12):
        watch.connected(_Link(), "guess", f"user{i % 4}", 0x86)
    got = {v.client: (v.label, v.action) for v in watch.tick()}
    assert got == {"spam": ("flood", "throttled to 2/s"),
                   "guess": ("credential_guessing", "banned")}
    assert bad.rates == [2.0] and bad.reasons == [] and good.rates == []
    assert watch.admit("guess") == 0x8A and watch.admit("spam") == 0  # throttled, not banned
    flood = next(v for v in verdicts if v.client == "spam")
    assert flood.evidence["excess"] > 1000 and flood.evidence["allowed_rate"] == 200
    guess = next(v for v in verdicts if v.client == "guess")  # each verdict reaches on_verdict
    assert guess.evidence["auth_failures"] == 12
    now[0] += 31
    assert watch.admit("guess") == 0  # the ban is over


def test_a_throttled_flood_that_keeps_sending_is_disconnected_and_banned() -> None:
    now = [100.0]
    watch = ClientWatch(load_scorer(MODELS, "threat", "model"), ban_s=30.0,
                        clock=lambda: now[0], throttle_rate=2.0)
    bad = _Link()
    watch.connected(bad, "spam", None, 0)
    _send(watch, now, "spam", 3000, 1500.0)
    assert [v.action for v in watch.tick()] == ["throttled to 2/s"]
    bad.backlog = 2 << 20  # its socket stays full: it sends on at the throttled rate's door
    actions = []
    for _ in range(3):
        _send(watch, now, "spam", 2, 2.0)  # what the throttle lets through
        actions += [v.action for v in watch.tick()]
    assert actions == ["disconnected"] and bad.reasons == [0x96]
    assert watch.admit("spam") == 0x8A
    st = watch.status()
    assert (st["throttled"], st["throttled_now"], st["disconnected"]) == (1, 0, 1)
    now[0] += 31  # back after the ban, flooding again: disconnected at once (a strike)
    again = _Link()
    watch.connected(again, "spam", None, 0)
    _send(watch, now, "spam", 3000, 1500.0)
    assert [v.action for v in watch.tick()] == ["disconnected"] and again.rates == []


def test_a_throttle_is_lifted_when_the_client_is_back_to_normal() -> None:
    now = [100.0]
    watch = ClientWatch(load_scorer(MODELS, "threat", "model"), clock=lambda: now[0],
                        throttle_rate=2.0)
    link = _Link()
    watch.connected(link, "c", None, 0)
    _send(watch, now, "c", 3000, 2000.0)
    assert [v.action for v in watch.tick()] == ["throttled to 2/s"]
    for _ in range(5):  # its socket drained: nothing waits
        _send(watch, now, "c", 1, 1.0)
        assert watch.tick() == []
    assert link.restored == 1 and watch.status()["throttles_lifted"] == 1
    assert watch.status()["throttled_now"] == 0


def test_healthy_devices_are_never_judged() -> None:
    """One topic at 0.1 to 50 msg/s for a minute, a flush of what a device buffered while
    away, a client the model alone calls a scanner: no verdict, no throttle."""
    now = [100.0]
    watch = ClientWatch(load_scorer(MODELS, "threat", "model"), clock=lambda: now[0],
                        throttle_rate=2.0)
    links = {}
    rates = {"d0": 0.1, "d1": 2.0, "d2": 5.0, "d3": 10.0, "d4": 50.0}
    for cid in rates:
        links[cid] = _Link()
        watch.connected(links[cid], cid, None, 0)
    verdicts = []
    for _ in range(60):  # 60 s, interleaved one second at a time
        for cid, rate in rates.items():
            n = int(rate) + (1 if (now[0] * rate) % 1 < rate % 1 else 0)
            for _ in range(n):
                watch.published(cid, f"sensors/{cid}/temp", 24, True)
        now[0] += 1.0
        verdicts += watch.tick()
    assert verdicts == [] and all(not ln.rates for ln in links.values())
    assert 25 < watch.paces["d4"].normal <= 50  # learning its normal rate (63 % in a minute)
    # d2 goes away for 10 min and flushes what it buffered (3,000 readings) at once
    watch.closed(links["d2"], "d2")
    now[0] += 600
    watch.connected(links["d2"], "d2", None, 0)
    _send(watch, now, "d2", 3000, 5000.0, topic="sensors/d2/temp", size=24)
    assert watch.tick() == [] and links["d2"].rates == []


def test_a_throttle_never_goes_below_twice_the_clients_normal_rate() -> None:
    now = [100.0]
    watch = ClientWatch(load_scorer(MODELS, "threat", "model"), clock=lambda: now[0],
                        throttle_rate=2.0)
    link = _Link()
    watch.connected(link, "busy", None, 0)
    for _ in range(120):  # a normal 40 msg/s for two minutes
        _send(watch, now, "busy", 40, 40.0)
        watch.tick()
    _send(watch, now, "busy", 6000, 3000.0)  # then a real flood
    assert [v.label for v in watch.tick()] == ["flood"]
    assert link.rates and link.rates[0] >= 40  # not below what it normally sends




def test_threat_watch_judges_evidence_whose_window_ended_before_the_tick() -> None:
    """A busy loop may tick late: a scan whose 10 s window completed before the next tick is
    still judged on it (the tick used to drop completed windows first, and with them the
    evidence of a client that did nothing more)."""
    now = [105.0]
    watch = ClientWatch(load_scorer(MODELS, "threat", "rules"), ban_s=30.0,
                        clock=lambda: now[0])
    link = _Link()
    watch.connected(link, "scan", None, 0)
    for i in range(12):
        now[0] += 0.3
        watch.subscribed("scan", f"cmd/{i:04d}/ota", False)
    now[0] = 112.0  # the window [100, 110) is over; the tick comes only now
    got = [(v.client, v.label, v.action) for v in watch.tick()]
    assert got == [("scan", "topic_scanning", "disconnected")] and link.reasons == [0x87]


def test_threat_watch_judges_the_window_a_clients_next_event_closed_before_the_tick() -> None:
    """Evidence after the last tick in a window that the client's own next event closed
    (in the next window, before any tick) is judged at the next tick, on that window's
    counts (it used to be dropped unjudged, and the tick saw only the new window)."""
    now = [100.0]
    watch = ClientWatch(load_scorer(MODELS, "threat", "rules"), ban_s=30.0,
                        clock=lambda: now[0])
    link = _Link()
    watch.connected(link, "scan", None, 0)
    watch.subscribed("scan", "cmd/0000/ota", False)
    assert watch.tick() == []  # one refusal so far: nothing to say
    for i in range(1, 12):  # the scan, after that tick and before the window's end
        now[0] = 101.0 + 0.7 * i
        watch.subscribed("scan", f"cmd/{i:04d}/ota", False)
    now[0] = 110.05
    watch.published("scan", "a/b", 10, True)  # window [110, 120) opens: [100, 110) closes
    now[0] = 110.2
    got = [(v.client, v.label, v.action) for v in watch.tick()]
    assert got == [("scan", "topic_scanning", "disconnected")] and link.reasons == [0x87]
