"""Durable broker state across real restarts of the gateway process (see docs/durability.md).

Every test runs the real gateway (``python -m rapidmq_edge run``) with its SQLite store in
the gateway's data dir and restarts it gracefully (SIGTERM) or hard (SIGKILL: no shutdown
code runs, only what was committed survives). The database is inspected with ``sqlite3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import tomli_w
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rapidmq_edge.broker.message import Delivery, Message
from rapidmq_edge.broker.persistence import delivery_row, load, subscription_row
from rapidmq_edge.mqtt.packets import SubOptions
from rapidmq_edge.store.session_store import SessionStore

from .gateway_proc import GatewayProcess
from .mqtt_helpers import (
    CONNACK,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    MQTTv5,
    MQTTv311,
    PahoClient,
    RawClient,
    build_connect,
    build_publish,
    build_subscribe,
    parse_publish,
    unique,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

TABLES = ("sessions", "subscriptions", "deliveries", "inbound_qos2", "retained")
Factory = Callable[..., GatewayProcess]


# --------------------------------------------------------------------------- helpers


def db_path(gw: GatewayProcess) -> Path:
    return gw.data_dir / "broker.db"


def read_db(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one query on the store, opened read-only (works while the gateway runs: WAL)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        return db.execute(sql, params).fetchall()


def on_disk(gw: GatewayProcess, sql: str, params: tuple[Any, ...] = ()) -> bool:
    """True once ``sql`` returns a row (polled: SUBACK/PUBREC-received are not fsync barriers)."""
    def check() -> bool:
        try:
            return bool(read_db(db_path(gw), sql, params))
        except sqlite3.OperationalError:  # not created yet / busy
            return False

    return wait_until(check, timeout=5)


def wait_subscription_on_disk(gw: GatewayProcess, cid: str, filt: str) -> None:
    assert on_disk(gw, "SELECT 1 FROM subscriptions WHERE client_id = ? AND filter = ?",
                   (cid, filt)), f"subscription {cid} {filt} never reached the database"


def expiry_props(seconds: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = seconds
    return props


def persistent(port: int, cid: str, version: int) -> PahoClient:
    """A client resuming/creating a persistent session (3.1.1 clean 0 / 5.0 expiry 3600)."""
    if version == MQTTv5:
        return PahoClient(port, cid, protocol=MQTTv5, clean_session=False,
                          properties=expiry_props(3600))
    return PahoClient(port, cid, clean_session=False)


def restart(gw: GatewayProcess, hard: bool) -> None:
    gw.restart(hard=hard)


def payloads(msgs: list[mqtt.MQTTMessage]) -> list[bytes]:
    return [m.payload for m in msgs]


def pid_of(body: bytes) -> int:
    return int(struct.unpack_from("!H", body)[0])


# --------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("version", [MQTTv311, MQTTv5], ids=["v311", "v5"])
def test_persistent_session_and_subscriptions_survive_restart(
    gateway_factory: Factory, version: int, hard: bool
) -> None:
    gw = gateway_factory()
    cid, topic = unique("ps"), unique("ps-t")
    sub = persistent(gw.port, cid, version)
    assert sub.connack is not None and not sub.connack.session_present
    assert sub.subscribe(f"{topic}/#", qos=1) == [1]
    assert sub.subscribe(f"{topic}/zero", qos=0) == [0]
    if hard:  # SUBACK is not held for the commit: see docs/durability.md
        wait_subscription_on_disk(gw, cid, f"{topic}/#")
        wait_subscription_on_disk(gw, cid, f"{topic}/zero")
    # the subscriber stays connected while the gateway goes down under it
    restart(gw, hard)
    sub.stop()

    sub = persistent(gw.port, cid, version)
    try:
        assert sub.connack is not None and sub.connack.session_present, sub.connack
        with PahoClient(gw.port) as pub:  # no resubscribe: the stored subscriptions route
            pub.publish(f"{topic}/a", b"one", qos=1)
            pub.publish(f"{topic}/zero", b"two", qos=0)
        got = sub.get_n(2)
        assert sorted((m.topic, m.payload, m.qos) for m in got) == [
            (f"{topic}/a", b"one", 1), (f"{topic}/zero", b"two", 0)]
        sub.assert_no_message(0.3)
    finally:
        sub.disconnect()


def raw_persistent(gw: GatewayProcess, cid: str, version: int) -> tuple[RawClient, bool]:
    """A raw client resuming a persistent session; returns (client, session present)."""
    level = 5 if version == MQTTv5 else 4
    raw = RawClient(gw.port, version=level)
    kwargs: dict[str, Any] = {}
    if level == 5:
        kwargs["properties"] = b"\x11" + struct.pack("!I", 3600)  # session expiry
    present, code = raw.connect(cid, clean=False, **kwargs)
    assert code == 0
    return raw, present


def receive_in_wire_order(raw: RawClient, n: int) -> list[tuple[bytes, int, bool]]:
    """Read ``n`` PUBLISH packets (payload, qos, dup) in wire order, completing every
    QoS 1/2 handshake. (paho hands QoS 2 messages to the app only at PUBREL, so its
    callback order is not the wire order.)"""
    got: list[tuple[bytes, int, bool]] = []
    open_q2: set[int] = set()
    while len(got) < n or open_q2:
        p = raw.recv_packet()
        if p.type == PUBREL:
            pid = pid_of(p.body)
            assert pid in open_q2, f"PUBREL for unknown packet id {pid}"
            open_q2.discard(pid)
            raw.pubcomp(pid)
            continue
        pub = parse_publish(p, raw.version)
        got.append((pub.payload, pub.qos, pub.dup))
        if pub.qos == 1:
            raw.puback(pub.packet_id)
        elif pub.qos == 2:
            open_q2.add(pub.packet_id)
            raw.pubrec(pub.packet_id)
    return got


@pytest.mark.parametrize("version", [MQTTv311, MQTTv5], ids=["v311", "v5"])
def test_queued_qos1_qos2_survive_sigkill_exactly_once_in_order(
    gateway_factory: Factory, version: int
) -> None:
    gw = gateway_factory()
    cid, topic = unique("q"), unique("q-t")
    sub = persistent(gw.port, cid, version)
    assert sub.subscribe(topic, qos=2) == [2]
    wait_subscription_on_disk(gw, cid, topic)
    sub.disconnect()  # offline from here on; the session stays

    sent = [(f"m{i:02d}".encode(), 1 + i % 2) for i in range(20)]
    with PahoClient(gw.port) as pub:
        for payload, qos in sent:
            pub.publish(topic, payload, qos=qos)  # waits for PUBACK / PUBCOMP
    restart(gw, hard=True)

    raw, present = raw_persistent(gw, cid, version)
    with raw:
        assert present
        got = receive_in_wire_order(raw, len(sent))
        assert [(payload, qos) for payload, qos, _dup in got] == sent
        assert not any(dup for _p, _q, dup in got)  # queued, never sent before
        raw.assert_no_packet(0.5)
        raw.disconnect()
    # delivered and acknowledged: nothing is delivered again after another restart
    restart(gw, hard=False)
    raw, present = raw_persistent(gw, cid, version)
    with raw:
        assert present
        raw.assert_no_packet(0.5)
        raw.disconnect()


@pytest.mark.parametrize("version", [MQTTv311, MQTTv5], ids=["v311", "v5"])
def test_connack_suback_unsuback_only_after_commit(gateway_factory: Factory,
                                                   version: int) -> None:
    """CONNACK (persistent session), SUBACK and UNSUBACK are sent only once what they
    acknowledge is committed: a SIGKILL the instant one arrives loses nothing. The long
    group-commit window makes the crash land inside it deterministically."""
    gw = gateway_factory(config={"persistence": {"commit_delay_ms": 800}})
    cid, topic = unique("ack-commit"), unique("ack-commit-t")
    raw, present = raw_persistent(gw, cid, version)
    with raw:
        assert not present
        restart(gw, hard=True)  # the instant CONNACK arrived
    raw, present = raw_persistent(gw, cid, version)
    with raw:
        assert present, "CONNACK was sent before the session was committed"
        assert raw.subscribe([(f"{topic}/keep", 1), (f"{topic}/drop", 1)]) == [1, 1]
        restart(gw, hard=True)  # the instant SUBACK arrived
    raw, present = raw_persistent(gw, cid, version)
    with raw:
        assert present
        raw.unsubscribe([f"{topic}/drop"])
        restart(gw, hard=True)  # the instant UNSUBACK arrived
    raw, present = raw_persistent(gw, cid, version)
    with raw:
        assert present
        with PahoClient(gw.port) as pub:
            pub.publish(f"{topic}/drop", b"unsubscribed", qos=1)
            pub.publish(f"{topic}/keep", b"subscribed", qos=1)
        p = raw.expect_publish()
        assert (p.topic, p.payload) == (f"{topic}/keep", b"subscribed")
        raw.puback(p.packet_id)
        raw.assert_no_packet(0.3)
        raw.disconnect()


def test_nothing_overtakes_a_delayed_connack(gateway_factory: Factory) -> None:
    """While CONNACK waits for the commit, the packets the client sent after CONNECT are
    processed in order, and nothing (resent or queued messages, their answers) is written
    before the CONNACK."""
    gw = gateway_factory(config={"persistence": {"commit_delay_ms": 300}})
    cid, topic = unique("order"), unique("order-t")
    with RawClient(gw.port) as raw:
        assert raw.connect(cid, clean=False) == (False, 0)
        assert raw.subscribe([(topic, 1)]) == [1]
        with PahoClient(gw.port) as pub:
            pub.publish(topic, b"inflight", qos=1)
            first = raw.expect_publish()  # never acknowledged: resent on reconnect
            raw.disconnect()
            pub.publish(topic, b"queued", qos=1)
    with RawClient(gw.port) as raw:
        raw.send(build_connect(cid, clean=False) + build_subscribe(7, [(f"{topic}/x", 1)])
                 + build_publish(f"{topic}/own", b"own", qos=1, packet_id=9) + b"\xc0\x00")
        got = [raw.recv_packet() for _ in range(6)]
        types = [p.type for p in got]
        assert types[0] == CONNACK and got[0].body == b"\x01\x00", got[0]
        pubs = [parse_publish(p, 4) for p in got if p.type == PUBLISH]
        assert [(p.payload, p.dup) for p in pubs] == [(b"inflight", True), (b"queued", False)]
        assert pubs[0].packet_id == first.packet_id
        assert sorted(types[1:]) == sorted([PUBLISH, PUBLISH, SUBACK, PUBACK, PINGRESP])
        assert types.index(SUBACK) < types.index(PUBACK)  # acks in the client's order
        for p in pubs:
            raw.puback(p.packet_id)
        raw.disconnect()


# --------------------------------------------------------------------------- in flight


def test_inflight_qos1_is_redelivered_with_dup_after_sigkill(gateway_factory: Factory) -> None:
    gw = gateway_factory()
    cid, topic = unique("if1"), unique("if1-t")
    with RawClient(gw.port) as raw:
        assert raw.connect(cid, clean=False) == (False, 0)
        assert raw.subscribe([(topic, 1)]) == [1]
        with PahoClient(gw.port) as pub:
            pub.publish(topic, b"unacked", qos=1)  # PUBACK: the in-flight record is on disk
        first = raw.expect_publish()
        assert (first.payload, first.qos, first.dup) == (b"unacked", 1, False)
        restart(gw, hard=True)  # never PUBACKed

    with RawClient(gw.port) as raw:
        assert raw.connect(cid, clean=False) == (True, 0)
        again = raw.expect_publish()
        assert (again.topic, again.payload, again.qos) == (topic, b"unacked", 1)
        assert again.dup, "a redelivered PUBLISH must have DUP set"
        assert again.packet_id == first.packet_id
        raw.assert_no_packet(0.3)
        raw.puback(again.packet_id)
        raw.disconnect()
    restart(gw, hard=False)
    with RawClient(gw.port) as raw:
        assert raw.connect(cid, clean=False) == (True, 0)
        raw.assert_no_packet(0.5)
        raw.disconnect()


def test_inflight_qos2_after_pubrec_gets_pubrel_after_sigkill(gateway_factory: Factory) -> None:
    gw = gateway_factory()
    cid, topic = unique("if2"), unique("if2-t")
    with RawClient(gw.port) as raw:
        assert raw.connect(cid, clean=False) == (False, 0)
        assert raw.subscribe([(topic, 2)]) == [2]
        with PahoClient(gw.port) as pub:
            pub.publish(topic, b"twice?", qos=2)
        p = raw.expect_publish()
        assert (p.payload, p.qos) == (b"twice?", 2)
        raw.pubrec(p.packet_id)
        assert pid_of(raw.expect(PUBREL).body) == p.packet_id
        # PUBREL is sent before "PUBREC received" is committed: wait for it (no barrier)
        assert on_disk(gw, "SELECT 1 FROM deliveries WHERE client_id = ? AND released = 1",
                       (cid,))
        restart(gw, hard=True)  # PUBCOMP never sent

    with RawClient(gw.port) as raw:
        assert raw.connect(cid, clean=False) == (True, 0)
        rel = raw.recv_packet()
        assert rel.type == PUBREL, f"expected PUBREL, got packet type {rel.type}"
        assert rel.flags == 0x2 and pid_of(rel.body) == p.packet_id
        raw.assert_no_packet(0.3)  # in particular: no second PUBLISH
        raw.pubcomp(p.packet_id)
        raw.disconnect()
    restart(gw, hard=False)
    assert read_db(db_path(gw), "SELECT * FROM deliveries WHERE client_id = ?", (cid,)) == []
    with RawClient(gw.port) as raw:
        assert raw.connect(cid, clean=False) == (True, 0)
        raw.assert_no_packet(0.5)
        raw.disconnect()


def test_session_expiry_counts_gateway_downtime(gateway_factory: Factory) -> None:
    """The expiry countdown starts at the disconnect and runs while the gateway is down;
    a session that expired meanwhile is dropped at start (also from the store)."""
    gw = gateway_factory()
    short, long_ = unique("exp-short"), unique("exp-long")
    for cid, expiry in ((short, 3), (long_, 3600)):
        c = PahoClient(gw.port, cid, protocol=MQTTv5, clean_session=False,
                       properties=expiry_props(expiry))
        c.subscribe(f"{cid}/t", qos=1)
        c.disconnect()
    disconnected = time.time()
    time.sleep(1)
    gw.stop()
    # a graceful stop keeps the time of the disconnect (it does not restart the countdown)
    updated = read_db(db_path(gw), "SELECT updated_at FROM sessions WHERE client_id = ?",
                      (short,))
    assert updated and updated[0][0] <= disconnected + 0.5, (updated, disconnected)
    time.sleep(3)  # 4 s since the disconnect: the 3 s session has expired
    gw.start()
    assert wait_until(lambda: not read_db(
        db_path(gw), "SELECT 1 FROM sessions WHERE client_id = ?", (short,))), \
        "an expired session was not deleted from the store at start"
    assert read_db(db_path(gw), "SELECT 1 FROM subscriptions WHERE client_id = ?",
                   (short,)) == []
    with PahoClient(gw.port, short, protocol=MQTTv5, clean_session=False,
                    properties=expiry_props(3)) as c:
        assert c.connack is not None and not c.connack.session_present
    with PahoClient(gw.port, long_, protocol=MQTTv5, clean_session=False,
                    properties=expiry_props(3600)) as c:
        assert c.connack is not None and c.connack.session_present


def test_time_connected_does_not_count_against_expiry_after_sigkill(
    gateway_factory: Factory,
) -> None:
    """A session whose client was connected when the gateway was killed is not expired by
    the time it was connected: its countdown starts when the gateway starts again."""
    gw = gateway_factory()
    cid = unique("exp-conn")
    c = PahoClient(gw.port, cid, protocol=MQTTv5, clean_session=False,
                   properties=expiry_props(2))
    try:
        c.subscribe(f"{cid}/t", qos=1)
        wait_subscription_on_disk(gw, cid, f"{cid}/t")
        time.sleep(3)  # connected for longer than the expiry interval
        restart(gw, hard=True)
    finally:
        c.stop()
    with PahoClient(gw.port, cid, protocol=MQTTv5, clean_session=False,
                    properties=expiry_props(2)) as c:
        assert c.connack is not None and c.connack.session_present


# --------------------------------------------------------------------------- PUBACK = on disk


@pytest.mark.parametrize("kill_after", [100, 200])
def test_puback_means_on_disk_burst_then_sigkill(gateway_factory: Factory,
                                                 kill_after: int) -> None:
    """Every message whose PUBACK reached the publisher survives a SIGKILL sent the moment
    the ``kill_after``-th PUBACK arrives (from paho's network thread)."""
    gw = gateway_factory()
    cid, topic = unique("burst"), unique("burst-t")
    sub = PahoClient(gw.port, cid, clean_session=False)
    assert sub.subscribe(topic, qos=1) == [1]
    wait_subscription_on_disk(gw, cid, topic)
    sub.disconnect()

    total = 200
    acked = 0
    killed = threading.Event()
    lock = threading.Lock()
    assert gw.proc is not None
    gw_pid = gw.proc.pid

    def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        nonlocal acked
        with lock:
            acked += 1
            if acked == kill_after and not killed.is_set():
                os.kill(gw_pid, signal.SIGKILL)
                killed.set()

    pub = PahoClient(gw.port, unique("burst-pub"), connect=False)
    pub.client.max_inflight_messages_set(0)  # no client-side window: a real burst
    pub.client.max_queued_messages_set(0)
    pub.client.on_publish = on_publish
    pub.connect()
    try:
        infos = [pub.client.publish(topic, str(i).encode(), qos=1) for i in range(total)]
        assert killed.wait(10), f"only {acked} PUBACKs arrived"
        assert wait_until(lambda: not pub.is_connected, timeout=5)
    finally:
        pub.stop()
    acked_ids = {i for i, info in enumerate(infos) if info.is_published()}
    assert len(acked_ids) >= kill_after
    gw.kill()  # reap the killed process
    gw.start()

    sub = PahoClient(gw.port, cid, clean_session=False)
    try:
        assert sub.connack is not None and sub.connack.session_present
        got: list[int] = []
        wait_until(lambda: (got.extend(int(m.payload) for m in sub.drain())
                            or acked_ids <= set(got)), timeout=15)
        got.extend(int(m.payload) for m in sub.drain(0.3))
        missing = sorted(acked_ids - set(got))
        assert not missing, f"{len(missing)} acknowledged messages lost: {missing[:20]}"
        assert len(got) == len(set(got)), "a queued message was delivered twice"
        assert got == sorted(got), "queued messages out of order"
    finally:
        sub.disconnect()


# --------------------------------------------------------------------------- retained


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_retained_messages_survive_restart_and_cleared_stay_cleared(
    gateway_factory: Factory, hard: bool
) -> None:
    gw = gateway_factory()
    base = unique("ret")
    with PahoClient(gw.port) as pub:
        pub.publish(f"{base}/keep", b"v1", qos=1, retain=True)
        pub.publish(f"{base}/keep", b"v2", qos=1, retain=True)  # the newest one counts
        pub.publish(f"{base}/q2", b"two", qos=2, retain=True)
        pub.publish(f"{base}/gone", b"old", qos=1, retain=True)
        pub.publish(f"{base}/gone", b"", qos=1, retain=True)  # cleared
        if not hard:  # a graceful stop writes QoS 0 state too
            pub.publish(f"{base}/zero", b"z", qos=0, retain=True)
    expected = {(f"{base}/keep", b"v2", 1), (f"{base}/q2", b"two", 2)}
    if not hard:
        expected.add((f"{base}/zero", b"z", 0))
        # QoS 0 gets no ack: make sure it was processed before the stop
        with PahoClient(gw.port) as probe:
            probe.subscribe(f"{base}/zero", qos=0)
            assert probe.get().payload == b"z"
    restart(gw, hard)
    for _ in range(2):  # and once more: nothing reappears after the next restart
        with PahoClient(gw.port) as sub:
            sub.subscribe(f"{base}/#", qos=2)
            got = sub.get_n(len(expected))
            assert all(m.retain for m in got)
            assert {(m.topic, m.payload, m.qos) for m in got} == expected
            sub.assert_no_message(0.3)
        restart(gw, hard)


# --------------------------------------------------------------------------- inbound QoS 2


def test_inbound_qos2_state_survives_sigkill(gateway_factory: Factory) -> None:
    gw = gateway_factory()
    sub_cid, pub_cid, topic = unique("in2-sub"), unique("in2-pub"), unique("in2-t")
    sub = PahoClient(gw.port, sub_cid, clean_session=False)
    assert sub.subscribe(topic, qos=2) == [2]
    wait_subscription_on_disk(gw, sub_cid, topic)
    sub.disconnect()

    pid = 4711
    with RawClient(gw.port) as raw:
        assert raw.connect(pub_cid, clean=False) == (False, 0)
        raw.publish(topic, b"exactly-once", qos=2, packet_id=pid)
        assert pid_of(raw.expect(PUBREC).body) == pid  # PUBREC: stored
        restart(gw, hard=True)

    with RawClient(gw.port) as raw:
        assert raw.connect(pub_cid, clean=False) == (True, 0)
        # as if the PUBREC had been lost: the DUP PUBLISH is acknowledged, not routed again
        raw.send(build_publish(topic, b"exactly-once", qos=2, packet_id=pid, dup=True))
        assert pid_of(raw.expect(PUBREC).body) == pid
        raw.pubrel(pid)
        comp = raw.expect(PUBCOMP)
        assert pid_of(comp.body) == pid
        raw.assert_no_packet(0.2)
        raw.disconnect()

    sub = PahoClient(gw.port, sub_cid, clean_session=False)
    try:
        assert sub.connack is not None and sub.connack.session_present
        m = sub.get()
        assert (m.topic, m.payload, m.qos) == (topic, b"exactly-once", 2)
        sub.assert_no_message(0.5)
    finally:
        sub.disconnect()
    gw.stop()
    assert read_db(db_path(gw), "SELECT * FROM inbound_qos2") == []


def test_pubcomp_only_after_the_packet_id_is_released_on_disk(gateway_factory: Factory) -> None:
    """After PUBCOMP the client may reuse the packet id at once; had the id survived a crash
    in the store, the new message would be taken for a resend and silently dropped.
    A long group-commit window makes the crash land inside it deterministically."""
    gw = gateway_factory(config={"persistence": {"commit_delay_ms": 800}})
    sub_cid, pub_cid, topic = unique("pc-sub"), unique("pc-pub"), unique("pc-t")
    sub = PahoClient(gw.port, sub_cid, clean_session=False)
    sub.subscribe(topic, qos=2)
    wait_subscription_on_disk(gw, sub_cid, topic)
    sub.disconnect()

    pid = 77
    with RawClient(gw.port) as raw:
        assert raw.connect(pub_cid, clean=False) == (False, 0)
        raw.publish(topic, b"first", qos=2, packet_id=pid)
        assert pid_of(raw.expect(PUBREC).body) == pid
        raw.pubrel(pid)
        assert pid_of(raw.expect(PUBCOMP).body) == pid
        restart(gw, hard=True)  # the instant PUBCOMP arrived
    with RawClient(gw.port) as raw:
        assert raw.connect(pub_cid, clean=False) == (True, 0)
        raw.publish(topic, b"second", qos=2, packet_id=pid)  # same id, new message
        assert pid_of(raw.expect(PUBREC).body) == pid
        raw.pubrel(pid)
        assert pid_of(raw.expect(PUBCOMP).body) == pid
        raw.disconnect()

    sub = PahoClient(gw.port, sub_cid, clean_session=False)
    try:
        assert [m.payload for m in sub.get_n(2)] == [b"first", b"second"]
        sub.assert_no_message(0.3)
    finally:
        sub.disconnect()


# --------------------------------------------------------------------------- clean sessions


def test_clean_sessions_leave_nothing_in_the_database(gateway_factory: Factory) -> None:
    gw = gateway_factory()
    topic = unique("clean-t")
    ids: list[str] = []

    def exercise(c: PahoClient) -> None:
        ids.append(c.client_id)
        c.subscribe(f"{topic}/#", qos=2)
        c.publish(f"{topic}/1", b"a", qos=1)
        c.publish(f"{topic}/2", b"b", qos=2)
        c.get_n(2)

    with PahoClient(gw.port, unique("c311"), clean_session=True) as c:
        exercise(c)
    with PahoClient(gw.port, unique("c5"), protocol=MQTTv5, clean_session=True) as c:
        exercise(c)
    # a 3.1.1 persistent session later replaced by a clean one
    cid = unique("was-persistent")
    with PahoClient(gw.port, cid, clean_session=False) as c:
        c.subscribe(f"{topic}/#", qos=1)
        wait_subscription_on_disk(gw, cid, f"{topic}/#")
    with PahoClient(gw.port, cid, clean_session=True) as c:
        exercise(c)
    # a 5.0 session whose client sets the expiry to 0 when disconnecting
    cid5 = unique("expiry-to-zero")
    c5 = PahoClient(gw.port, cid5, protocol=MQTTv5, clean_session=True,
                    properties=expiry_props(3600))
    try:
        exercise(c5)
        wait_subscription_on_disk(gw, cid5, f"{topic}/#")
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        c5.client.disconnect(properties=props)
        assert c5.wait_disconnected(5)
    finally:
        c5.stop()
    # an unacknowledged QoS 2 message of a clean-session raw publisher
    with RawClient(gw.port) as raw:
        ids.append("raw-clean")
        assert raw.connect("raw-clean", clean=True) == (False, 0)
        raw.publish(f"{topic}/3", b"c", qos=2, packet_id=9)
        raw.expect(PUBREC)
    gw.stop()

    path = db_path(gw)
    assert path.exists()
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    for table in TABLES:
        assert read_db(path, f"SELECT * FROM {table}") == [], f"rows left in {table}"


class InProcessGateway:
    """The real Gateway object on its own event loop in a thread, so a test can reach its
    store (here: to make the disk "full" with SQLite's max_page_count)."""

    def __init__(self, data_dir: Path, port: int) -> None:
        from rapidmq_edge.config import parse_config
        from rapidmq_edge.gateway import Gateway

        cfg = parse_config({"gateway": {"data_dir": str(data_dir)},
                            "mqtt": {"listen": [f"tcp://127.0.0.1:{port}"], "sys_interval": 0}},
                           data_dir)
        self.port = port
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self.gateway = Gateway(cfg)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), self._error

    def _run(self) -> None:
        async def main() -> None:
            await self.gateway.start()
            self._ready.set()
            await self._stop.wait()
            await self.gateway.stop()

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # pragma: no cover - reported by the constructor
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    def set_max_pages(self, pages: int | None) -> None:
        store = self.gateway.store
        with store._lock:
            if pages is None:
                pages = 1_073_741_823
            store._db.execute(f"PRAGMA max_page_count = {pages}")

    def page_count(self) -> int:
        store = self.gateway.store
        with store._lock:
            return int(store._db.execute("PRAGMA page_count").fetchone()[0])

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)


def test_commit_failure_withholds_or_refuses_the_ack_and_retries(tmp_path: Path) -> None:
    """Disk full (SQLITE_FULL): 5.0 PUBACK says 0x97, 3.1.1 gets no PUBACK while commits
    fail; the changes are retried and written once there is room again, and then the 3.1.1
    PUBACK goes out."""
    from .conftest import free_port

    gw = InProcessGateway(tmp_path / "data", free_port())
    try:
        sub_cid, topic = unique("full-sub"), unique("full-t")
        with RawClient(gw.port) as raw:
            assert raw.connect(sub_cid, clean=False) == (False, 0)
            assert raw.subscribe([(topic, 1)]) == [1]
            raw.disconnect()
        assert wait_until(lambda: gw.gateway.store.pending == 0 and gw.gateway.store.commits)
        gw.set_max_pages(gw.page_count())  # the disk is full now
        big = b"x" * 20000
        with RawClient(gw.port, version=5) as v5, RawClient(gw.port) as v3:
            assert v5.connect(unique("full-v5"))[1] == 0
            assert v3.connect(unique("full-v3"))[1] == 0
            v5.publish(topic, big + b"5", qos=1, packet_id=1)
            ack = v5.expect(PUBACK)
            assert pid_of(ack.body) == 1 and ack.body[2] == 0x97, ack.body
            v3.publish(topic, big + b"3", qos=1, packet_id=1)
            v3.assert_no_packet(1.2)  # withheld, also across retries
            assert gw.gateway.store.failures >= 2
            # a message the store has no part in (no retained row, no stored delivery) is
            # acknowledged as usual meanwhile: it does not wait for the failing commit
            with RawClient(gw.port, version=5) as v5b, RawClient(gw.port) as v3b:
                assert v5b.connect(unique("free-v5"))[1] == 0
                assert v3b.connect(unique("free-v3"))[1] == 0
                free = unique("full-free")
                v5b.publish(free, b"not stored", qos=1, packet_id=7)
                ack = v5b.expect(PUBACK, timeout=2)
                assert pid_of(ack.body) == 7 and ack.body[2] == 0x10, ack.body  # no subscribers
                v3b.publish(free, b"not stored", qos=1, packet_id=7)
                assert pid_of(v3b.expect(PUBACK, timeout=2).body) == 7
                with RawClient(gw.port) as online:  # a clean session: nothing stored either
                    assert online.connect(unique("free-sub"))[1] == 0
                    assert online.subscribe([(free, 1)]) == [1]
                    v5b.publish(free, b"to an online client", qos=1, packet_id=8)
                    ack = v5b.expect(PUBACK, timeout=2)
                    assert pid_of(ack.body) == 8 and ack.body[2:3] in (b"", b"\x00"), ack.body
                    assert online.expect_publish(timeout=2).payload == b"to an online client"
            assert gw.gateway.store.pending  # the failing changes are still waiting
            gw.set_max_pages(None)  # room again: the retry succeeds
            assert wait_until(lambda: gw.gateway.store.pending == 0, timeout=5)
            # 3.1.1: the withheld ack goes out once the retry has written the message
            assert pid_of(v3.expect(PUBACK, timeout=5).body) == 1
            v5.publish(topic, b"after", qos=1, packet_id=2)
            ack = v5.expect(PUBACK)
            assert pid_of(ack.body) == 2 and ack.body[2:3] in (b"", b"\x00"), ack.body
            v3.publish(topic, b"after3", qos=1, packet_id=2)
            assert pid_of(v3.expect(PUBACK).body) == 2
        with RawClient(gw.port) as raw:
            assert raw.connect(sub_cid, clean=False) == (True, 0)
            got = []
            for _ in range(4):
                p = raw.expect_publish()
                raw.puback(p.packet_id)
                got.append(p.payload)
            # the refused/unacknowledged ones were retried, not discarded (see the docs)
            assert got == [big + b"5", big + b"3", b"after", b"after3"]
            raw.disconnect()
    finally:
        gw.stop()


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("hard", [False, True], ids=["after-sigterm", "after-sigkill"])
def test_corrupt_database_is_moved_aside_and_gateway_serves(
    gateway_factory: Factory, hard: bool
) -> None:
    gw = gateway_factory()
    cid = unique("corrupt")
    with PahoClient(gw.port, cid, clean_session=False) as c:
        c.subscribe("x/#", qos=1)
        wait_subscription_on_disk(gw, cid, "x/#")
    (gw.kill if hard else gw.stop)()
    data = gw.data_dir
    garbage = os.urandom(3 * 4096)
    (data / "broker.db").write_bytes(garbage)
    had_wal = (data / "broker.db-wal").exists()
    assert had_wal == hard  # SIGKILL leaves the WAL behind: it must go aside too
    if had_wal:
        # (an intact WAL can hold every page of a young database, which is then fine)
        (data / "broker.db-wal").write_bytes(os.urandom(2 * 4096))

    gw.start()
    aside = sorted(p for p in data.iterdir() if p.name.startswith("broker.db.corrupt-")
                   and not p.name.endswith(("-wal", "-shm")))
    assert len(aside) == 1, sorted(p.name for p in data.iterdir())
    assert aside[0].read_bytes() == garbage, "the damaged file must be kept unchanged"
    if had_wal:
        assert Path(f"{aside[0]}-wal").exists()
    log = gw.log()
    assert any("ERROR" in line and aside[0].name in line for line in log.splitlines()), log

    # it serves, with an empty store, and the new store works across restarts
    with PahoClient(gw.port, cid, clean_session=False) as c:
        assert c.connack is not None and not c.connack.session_present
        c.subscribe("y/#", qos=1)
        wait_subscription_on_disk(gw, cid, "y/#")
    gw.restart(hard=True)
    with PahoClient(gw.port, cid, clean_session=False) as c:
        assert c.connack is not None and c.connack.session_present
    assert aside[0].read_bytes() == garbage


def test_damaged_pages_found_while_loading_are_moved_aside(tmp_path: Path) -> None:
    """Page 1 intact (the file opens) but table pages overwritten: found by the check."""
    path = tmp_path / "broker.db"

    async def fill() -> None:
        store = SessionStore(path, "normal", 0)
        store.save_session("c", 4, 100, 1.0)
        store.save_subscription("c", "a/#", subscription_row(SubOptions(1), None))
        for i in range(1, 200):
            d = Delivery(Message("a/b", os.urandom(500), 1, False), 1, False, (), None, 0,
                         False, i)
            store.save_delivery("c", i, delivery_row(d))
        fut = store.commit_future()
        assert fut is not None
        await fut
        await store.close()

    asyncio.run(fill())
    raw = bytearray(path.read_bytes())
    assert len(raw) > 8 * 4096
    raw[2 * 4096:] = b"\xa5" * (len(raw) - 2 * 4096)
    path.write_bytes(bytes(raw))

    store = SessionStore(path, "fsync", 0)
    try:
        assert load(store) == ({}, [])
        assert store.quarantined is not None
        assert store.quarantined.read_bytes() == bytes(raw)
        assert store.quarantined.name.startswith("broker.db.corrupt-")
    finally:
        asyncio.run(store.close())


def test_unopenable_database_is_not_moved_aside(tmp_path: Path) -> None:
    """Only damage moves the file: an I/O problem (here: a directory) is an error."""
    path = tmp_path / "broker.db"
    path.mkdir()
    with pytest.raises(sqlite3.Error):
        SessionStore(path)
    assert path.is_dir() and [p.name for p in tmp_path.iterdir()] == ["broker.db"]


def test_gateway_with_unopenable_store_exits_with_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "broker.db").mkdir(parents=True)  # not a file: cannot be opened, is not damage
    cfg = {"gateway": {"data_dir": str(data)},
           "mqtt": {"listen": ["tcp://127.0.0.1:0"], "sys_interval": 0}}
    path = tmp_path / "gw.toml"
    path.write_text(tomli_w.dumps(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "rapidmq_edge", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 1, res.stderr
    assert "cannot open the session store" in res.stderr and "broker.db" in res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert (data / "broker.db").is_dir()


# --------------------------------------------------------------------------- data dir lock


def test_second_gateway_on_same_data_dir_exits_with_clear_error(
    gateway_factory: Factory, tmp_path: Path
) -> None:
    gw = gateway_factory()
    cfg = dict(gw.config)
    cfg["mqtt"] = dict(cfg["mqtt"], listen=["tcp://127.0.0.1:0"])
    path = tmp_path / "second.toml"
    path.write_text(tomli_w.dumps(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "rapidmq_edge", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 1, res.stderr
    assert "in use by another rapidmq-edge process" in res.stderr, res.stderr
    assert str(gw.data_dir) in res.stderr
    assert "Traceback" not in res.stderr
    # the first one is unaffected and its store untouched
    with PahoClient(gw.port) as c:
        assert c.connack is not None and c.connack.reason_code == 0
    assert gw.proc is not None and gw.proc.poll() is None
