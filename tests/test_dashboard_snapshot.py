"""The dashboard's snapshot on a real broker, in process: counts and rates per topic and
publisher from the counting tap, totals equal to the ``$SYS`` counters, incidents taken
from the gateway's own alerts (opened with their band, then closed), drops as ``/metrics``
labels them, shadow runs from an OTA's state. (The clock is the only thing stood in for.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from rapidmq_edge.broker.broker import Broker, BrokerLimits
from rapidmq_edge.broker.message import Message
from rapidmq_edge.ops.dashboard_snapshot import DashboardSource, drops, shadow_runs
from rapidmq_edge.ops.sys_topics import sys_values
from rapidmq_edge.ops.traffic import ClientActivity, TrafficCounter, protocol_of


def _msg(topic: str, origin: str, payload: bytes = b"21.5", retain: bool = False) -> Message:
    return Message(topic, payload, 1, retain, {}, None, origin)


def test_snapshot_counts_rates_incidents_and_drops() -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any], Broker]:
        traffic = TrafficCounter()
        broker = Broker(BrokerLimits(), None, [traffic])
        now = [100.0]
        src = DashboardSource(lambda: {"gateway": "gw", "broker": sys_values(broker)}, broker,
                              traffic, ClientActivity(), lambda: 3.25, clock=lambda: now[0])
        src.listen_for_alerts()
        for _ in range(10):
            broker.publish(_msg("site/a/temp", "dev-1"))
        broker.publish(_msg("site/a/config", "http-ops", b"x", retain=True))
        first = src.build()
        now[0] += 2.0
        for _ in range(40):
            broker.publish(_msg("site/a/temp", "dev-1"))
        for _ in range(6):
            broker.publish(_msg("site/b/hum", "coap:10.0.0.7"))
        alert = {"state": "open", "kind": "spike", "stream": "site/a/temp", "reading": 40.0,
                 "expected": 4.1, "band": [3.9, 4.3], "score": 1.0, "at": 1.0}
        broker.publish(_msg("$edge/alerts/spike/site/a/temp", "$edge",
                            json.dumps(alert).encode()))
        second = src.build()
        src.close()
        return first, second, broker

    first, second, broker = asyncio.run(scenario())
    # totals are the $SYS counters; rates are the difference since the previous build
    assert first["totals"]["in"] == 11 and first["rates"]["in"] == 0.0
    assert second["totals"]["in"] == int(sys_values(broker)["messages/received"]) == 58
    assert second["rates"]["in"] == (40 + 6 + 1) / 2.0
    assert second["rates"]["by_protocol"] == {"mqtt": 20.0, "http": 0.0, "coap": 3.0,
                                              "gateway": 0.5}
    topics = {t["topic"]: t for t in second["topics"]}
    assert topics["site/a/temp"]["messages"] == 50 and topics["site/a/temp"]["rate"] == 20.0
    assert topics["site/a/config"]["retained"] and not topics["site/a/temp"]["retained"]
    assert second["commit_ms"] == 3.25
    assert second["gateway"] == "gw"
    assert second["intelligence"] is None  # no runtime in this status
    # every message but the alert (delivered to the dashboard's own subscription) had none
    assert drops(broker, None)["local: no_subscribers"] == int(
        sys_values(broker)["messages/received"]) - 1
    assert protocol_of("http-ops") == "http" and protocol_of("dev-1") == "mqtt"


def test_incidents_from_alerts_with_the_runtime_status() -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        traffic = TrafficCounter()
        broker = Broker(BrokerLimits(), None, [traffic])
        intel = {"models": {"anomaly": {"source": "detector", "version": "d/1"}},
                 "incidents": {"open": 1, "opened": 1, "closed": 0}}
        ota = {"components": {"priority": {"state": "shadow", "version": "1.1",
                                           "shadow": {"agreement": 0.991, "compared": 5000}}}}
        src = DashboardSource(lambda: {"broker": sys_values(broker), "intelligence": intel,
                                       "ota": ota}, broker, traffic, ClientActivity(),
                              lambda: None)
        src.listen_for_alerts()
        alert = {"state": "open", "kind": "spike", "stream": "pump/p", "reading": 40.0,
                 "expected": 4.1, "band": [3.9, 4.3], "score": 1.0, "at": 1.0}
        broker.publish(_msg("$edge/alerts/spike/pump/p", "$edge", json.dumps(alert).encode()))
        opened = src.build()["intelligence"]
        broker.publish(_msg("$edge/alerts/spike/pump/p", "$edge", json.dumps(
            {"state": "closed", "kind": "spike", "stream": "pump/p", "duration_s": 60.0,
             "at": 61.0}).encode()))
        closed = src.build()["intelligence"]
        src.close()
        return opened, closed

    opened, closed = asyncio.run(scenario())
    assert [(r["stream"], r["reading"], r["band"]) for r in opened["open"]] == [
        ("pump/p", 40.0, [3.9, 4.3])]
    assert opened["models"]["anomaly"]["version"] == "d/1"
    assert opened["shadow"] == [{"component": "priority", "version": "1.1",
                                 "agreement": 0.991, "compared": 5000, "decision": None}]
    assert closed["open"] == []
    assert closed["closed"][0]["band"] == [3.9, 4.3]  # kept from the opening alert
    assert closed["closed"][0]["duration_s"] == 60.0
    assert shadow_runs(None) == []
