"""Retention (issue 18 part 3): ``[[retention]]`` bounds how long retained, session-queued
and forward-queued messages on matching topics are kept; expired ones are removed and
counted by reason."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rapidmq_edge.broker.broker import Broker, BrokerLimits
from rapidmq_edge.broker.message import Message
from rapidmq_edge.config import ConfigError, parse_config
from rapidmq_edge.config.retention import RetentionRule
from rapidmq_edge.pipeline.retention import Retention
from tests.conftest import free_port
from tests.gateway_proc import GatewayProcess
from tests.mqtt_helpers import PahoClient, wait_until


def test_rules_bound_expiry() -> None:
    now = [1000.0]
    r = Retention([RetentionRule("sensors/#", 60), RetentionRule("sensors/a/#", 5),
                   RetentionRule("logs/#", 30, tenant="acme")], clock=lambda: now[0])
    m = Message("sensors/a/t", b"x")
    r(m)
    assert m.expires_at == 1005.0  # the smallest matching rule
    m = Message("sensors/b", b"x", expires_at=1010.0)
    r(m)
    assert m.expires_at == 1010.0  # already sooner: kept
    m = Message("tenants/acme/logs/1", b"x")
    r(m)
    assert m.expires_at == 1030.0
    m = Message("other", b"x")
    r(m)
    assert m.expires_at is None and r.limited == 2


def test_the_sweep_pops_what_expired_from_the_index() -> None:
    """Retained messages filed by expiry: a sweep removes the expired ones (not one
    retained again meanwhile, which expires later), counts them, and leaves the rest; ones
    restored at start-up are filed by the first sweep; stale entries are compacted."""
    now = [1000.0]
    r = Retention([RetentionRule("s/#", 5)], clock=lambda: now[0])
    broker = Broker(BrokerLimits(), taps=[r])
    broker.retained["s/restored"] = Message("s/restored", b"R", 0, True, expires_at=1002.0)
    for i in range(3):
        broker.publish(Message(f"s/{i}", b"x", 1, True))
    broker.publish(Message("keep/1", b"k", 1, True))
    now[0] = 1003.0
    broker.publish(Message("s/0", b"again", 1, True))  # retained again: expires at 1008
    assert r.sweep(broker) == 1 and "s/restored" not in broker.retained
    now[0] = 1006.0
    assert r.sweep(broker) == 2
    assert sorted(broker.retained) == ["keep/1", "s/0"]
    now[0] = 1009.0
    assert r.sweep(broker) == 1 and sorted(broker.retained) == ["keep/1"]
    assert r.drops["retained_expired"] == 4
    for i in range(5000):  # one topic retained over and over: the index stays small
        broker.publish(Message("s/hot", b"%d" % i, 1, True))
    r.sweep(broker)
    assert r._filed_retained <= 2 * len(broker.retained) + 1024 + 1


def test_retention_config(tmp_path: Path) -> None:
    c = parse_config({"retention": [{"filter": "a/#", "retention_s": 3600, "tenant": "acme"}]},
                     tmp_path)
    assert c.retention == (RetentionRule("a/#", 3600.0, "acme"),)
    for bad in ({"filter": "a/#"}, {"filter": "a/#/b", "retention_s": 1},
                {"filter": "a", "retention_s": 0}, {"filter": "a", "retention_s": 1,
                                                     "tenant": "a/b"}):
        with pytest.raises(ConfigError):
            parse_config({"retention": [bad]}, tmp_path)


def test_retention_on_a_gateway(gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory({
        "retention": [{"filter": "sensors/#", "retention_s": 1}],
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{free_port()}"]}],
        "forward": [{"filter": "sensors/#", "upstream": "cloud", "qos": 1}],
    })
    keeper = PahoClient(gw.port, "keeper", clean_session=False)
    assert keeper.subscribe("sensors/#", qos=1) == [1]
    keeper.disconnect()
    pub = PahoClient(gw.port, "pub")
    pub.publish("sensors/a/t", b"R1", qos=1, retain=True)
    pub.publish("keep/x", b"K1", qos=1, retain=True)
    for i in range(3):
        pub.publish("sensors/a/t", b"Q%d" % i, qos=1)
    now = PahoClient(gw.port, "now")
    now.subscribe("sensors/#", qos=1)
    assert now.get(3).payload == b"R1"  # there before its retention runs out
    now.disconnect()
    sys = PahoClient(gw.port, "sys")
    sys.subscribe("$SYS/broker/retention/#", qos=0)
    seen: dict[str, bytes] = {}

    def dropped() -> bool:
        seen.update((m.topic, m.payload) for m in sys.drain())
        return (int(seen.get("$SYS/broker/retention/dropped/retained_expired", b"0")) >= 1
                and int(seen.get("$SYS/broker/retention/dropped/session_expired", b"0")) >= 3)

    assert wait_until(dropped, timeout=8), seen
    late = PahoClient(gw.port, "late")
    late.subscribe("sensors/#", qos=1)
    late.subscribe("keep/#", qos=1)
    got = [m.payload for m in late.drain(0.6)]
    assert got == [b"K1"]  # the unruled retained message stays
    keeper = PahoClient(gw.port, "keeper", clean_session=False)
    assert keeper.drain(0.6) == []  # its queued messages expired
    for c in (keeper, late, sys, pub):
        c.disconnect()
    time.sleep(0.2)
    gw.stop()
    db = sqlite3.connect(gw.data_dir / "broker.db")
    assert db.execute("SELECT topic FROM retained").fetchall() == [("keep/x",)]
    assert db.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)
    db.close()
    db = sqlite3.connect(gw.data_dir / "forward.db")
    unbounded = db.execute("SELECT count(*) FROM messages WHERE expires_at IS NULL "
                           "OR expires_at > created + 1.5").fetchone()
    db.close()
    assert unbounded == (0,)  # every queued message carries the retention bound
