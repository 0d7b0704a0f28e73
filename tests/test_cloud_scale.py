"""Scale out: several ``cloud ingest`` processes into one PostgreSQL (issue 16, part 3).

Real Mosquitto 2 (``$share``), real PostgreSQL, consumer subprocesses; and what the NATS
MQTT listener does with a ``$share`` filter (it is not a shared subscription there)."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from .cloud_helpers import (
    Consumer,
    Publisher,
    StreamMaker,
    cloud_keys,
    pg_dsn,  # noqa: F401 - fixture
    pg_rows,
    pg_server,  # noqa: F401 - fixture
)
from .conftest import LOOPBACK, MosquittoBroker, free_port, wait_for_port

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

BROKER_CONF = "max_queued_messages 100000\nmax_inflight_messages 100\n"
BAD_KINDS = {"tampered", "unverifiable", "missing-message", "missing-batch", "wrong-key",
             "chain-broken", "replay"}


def _interleaved(keys: object, gws: list[str], n: int, batch: int) -> list[
        tuple[str, bytes, str | None]]:
    streams = []
    for gw in gws:
        mk = StreamMaker(keys, gw)  # type: ignore[arg-type]
        s = [mk.session()]
        for i in range(n):
            s.append(mk.message(f"{gw}-{i}".encode()))
            if (i + 1) % batch == 0:
                s.append(mk.batch())
        streams.append(s)
    return [x for group in zip(*streams, strict=True) for x in group]


def _count(dsn: str, sql: str = "SELECT COUNT(*) FROM messages") -> int:
    return int(asyncio.run(pg_rows(dsn, sql))[0][0])


def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_three_consumers_in_a_share_group_headers_through_the_database(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker], pg_dsn: str,  # noqa: F811
) -> None:
    """3 consumers in ``$share/g``, subscribed to the shared filter only: each batch header
    reaches one of them, the others verify their messages with it from PostgreSQL. One is
    killed with SIGKILL mid-stream and restarted: every message exactly once, none reported."""
    broker = mosquitto_factory(BROKER_CONF)
    keys = cloud_keys(tmp_path)
    cons = [Consumer(tmp_path, broker.port, keys, pg_dsn, f"c{i}", "--group", "g").start()
            for i in range(3)]
    items = _interleaved(keys, ["gw-a", "gw-b"], 300, 20)
    pub = Publisher(broker.port)
    rng = random.Random(3)
    try:
        for i in range(0, len(items), 20):
            pub.send(items[i:i + 20])
            time.sleep(0.01)
            if i == 200:
                cons[1].kill9()
                time.sleep(rng.uniform(0.1, 0.4))
                cons[1].start()
        pub.wait_acked()
        _until(lambda: _count(pg_dsn) == 600, 40, "600 rows")
        time.sleep(1.5)  # past --grace
    finally:
        pub.close()
        for c in cons:
            c.stop()
    per = asyncio.run(pg_rows(pg_dsn, "SELECT consumer, COUNT(*) FROM messages "
                                      "GROUP BY consumer"))
    assert {r[0] for r in per} == {"c0", "c1", "c2"}, per  # the group shared the work
    assert _count(pg_dsn, "SELECT COUNT(DISTINCT id) FROM messages") == 600
    # every batch / session header stored once, whichever consumer got it
    assert _count(pg_dsn, "SELECT COUNT(*) FROM cloud_control WHERE kind = 'batch'") == 30
    assert _count(pg_dsn, "SELECT COUNT(*) FROM cloud_control WHERE kind = 'session'") == 2
    reports = asyncio.run(pg_rows(pg_dsn, "SELECT kind, detail FROM cloud_reports"))
    assert not [r for r in reports if r[0] in BAD_KINDS], reports
    assert _count(pg_dsn, "SELECT COUNT(*) FROM cloud_pending") == 0


def test_partitioned_consumers_keep_each_gateway_on_one_consumer(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker], pg_dsn: str,  # noqa: F811
) -> None:
    """Without ``$share`` (NATS): ``--partition 0/2`` and ``1/2`` each see everything and keep
    the gateways that hash to them — every row once, each gateway written by one consumer
    (its order kept)."""
    broker = mosquitto_factory(BROKER_CONF)
    keys = cloud_keys(tmp_path)
    cons = [Consumer(tmp_path, broker.port, keys, pg_dsn, f"p{i}", "--partition", f"{i}/2")
            .start() for i in range(2)]
    gws = [f"gw-{k}" for k in range(6)]
    items = _interleaved(keys, gws, 40, 20)
    pub = Publisher(broker.port)
    try:
        pub.send(items)
        pub.wait_acked()
        _until(lambda: _count(pg_dsn) == 240, 30, "240 rows")
        time.sleep(1.5)
    finally:
        pub.close()
        for c in cons:
            c.stop()
    owners = asyncio.run(pg_rows(pg_dsn, "SELECT gateway, array_agg(DISTINCT consumer) "
                                         "FROM messages GROUP BY gateway"))
    assert len(owners) == 6 and all(len(r[1]) == 1 for r in owners), owners
    assert {r[1][0] for r in owners} == {"p0", "p1"}, owners  # both got some gateways
    assert _count(pg_dsn, "SELECT COUNT(DISTINCT id) FROM messages") == 240
    reports = asyncio.run(pg_rows(pg_dsn, "SELECT kind, detail FROM cloud_reports"))
    assert not [r for r in reports if r[0] in BAD_KINDS], reports


NATS_BIN = "/usr/sbin/nats-server"


def test_nats_mqtt_treats_share_as_a_plain_topic(tmp_path: Path) -> None:
    """The fact docs/cloud.md builds on: nats-server's MQTT listener (2.9) grants a
    ``$share/g/...`` subscription but matches it literally — two members get none of 20
    messages on ``t/x``, and both get a message published to ``$share/g/t/x`` itself. Hence
    ``--partition`` on NATS."""
    if shutil.which(NATS_BIN) is None:
        pytest.skip("nats-server not installed")
    port, mqtt_port = free_port(), free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f"server_name: share-probe\nlisten: {LOOPBACK}:{port}\n"
                    f"jetstream {{ store_dir: '{tmp_path / 'js'}' }}\n"
                    f"mqtt {{ listen: {LOOPBACK}:{mqtt_port} }}\n")
    with open(tmp_path / "nats.log", "wb") as log:
        proc = subprocess.Popen([NATS_BIN, "-c", str(conf)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    clients: list[mqtt.Client] = []
    try:
        assert wait_for_port(LOOPBACK, mqtt_port, 20), (tmp_path / "nats.log").read_text()
        got: dict[str, list[str]] = {"a": [], "b": []}
        subscribed = threading.Semaphore(0)
        for name in got:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name,
                            protocol=mqtt.MQTTv311, clean_session=False)
            c.on_message = lambda _c, _u, m, n=name: got[n].append(m.topic)
            c.on_subscribe = lambda *_a: subscribed.release()
            c.connect(LOOPBACK, mqtt_port)
            c.loop_start()
            c.subscribe("$share/g/t/#", 1)
            clients.append(c)
        for _ in got:
            assert subscribed.acquire(timeout=15)
        p = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="p", protocol=mqtt.MQTTv311)
        p.connect(LOOPBACK, mqtt_port)
        p.loop_start()
        clients.append(p)
        for i in range(20):
            p.publish("t/x", b"%d" % i, qos=1).wait_for_publish(5)
        p.publish("$share/g/t/x", b"literal", qos=1).wait_for_publish(5)
        _until(lambda: all(got.values()), 10, "the literal message")
        time.sleep(0.3)
        assert got == {"a": ["$share/g/t/x"], "b": ["$share/g/t/x"]}
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
        proc.terminate()
        proc.wait(10)


def test_mosquitto_restart_restores_plain_but_not_share_subscriptions(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    """The fact behind ``--partition`` on Mosquitto (docs/cloud.md): after a graceful restart
    (persistence saved) an offline persistent session gets the messages published meanwhile
    for its plain subscription, and none for its ``$share`` one — the broker acknowledged
    those to the publisher and dropped them."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from .cloud_chaos import _restart_broker

    state = tmp_path / "state"
    state.mkdir()
    broker = mosquitto_factory(f"persistence true\npersistence_location {state}/\n")
    got = {"shared": 0, "plain": 0}
    clients: list[mqtt.Client] = []

    def session(name: str, sub: str | None) -> mqtt.Client:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        c.on_message = lambda *_a: got.__setitem__(name, got[name] + 1)
        subscribed = threading.Event()
        c.on_subscribe = lambda *_a: subscribed.set()
        c.connect(LOOPBACK, broker.port, clean_start=False, properties=props)
        c.loop_start()
        if sub is not None:
            c.subscribe(sub, 1)
            assert subscribed.wait(10)
        clients.append(c)
        return c

    try:
        for name, sub in (("shared", "$share/g/t/#"), ("plain", "t/#")):
            c = session(name, sub)
            c.disconnect()
            c.loop_stop()
        _restart_broker(broker, hard=False)
        pub = Publisher(broker.port)
        pub.send([("t/x", b"%d" % i, None) for i in range(10)])
        pub.wait_acked()
        pub.close()
        for name in got:
            session(name, None)  # resume the sessions, no new SUBSCRIBE
        _until(lambda: got["plain"] == 10, 10, "the plain session's 10 messages")
        time.sleep(0.5)
        assert got == {"shared": 0, "plain": 10}
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
