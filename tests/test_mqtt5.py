"""MQTT 5.0 against the real gateway: CONNACK, sessions, Will, takeover, keep-alive, AUTH, $SYS.

More MQTT 5.0 tests: ``test_mqtt5_pubsub.py`` (subscriptions, properties, aliases, shared
subscriptions) and ``test_mqtt5_flow.py`` (flow control and packet size limits).
References are to the OASIS MQTT Version 5.0 specification.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rapidmq_edge.security.users import add_user

from .gateway_proc import GatewayProcess
from .mqtt5_helpers import (
    AUTH,
    CONNACK,
    DISCONNECT,
    Clients,
    RawClient,
    connect_packet,
    disconnect_packet,
    frame,
    props,
    publish_packet,
    uid,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One default gateway shared by the tests of this module (unique ids/topics per test)."""
    g = GatewayProcess(tmp_path_factory.mktemp("gw-mqtt5")).start()
    yield g
    g.stop()


@pytest.fixture
def clients(gw: GatewayProcess) -> Iterator[Clients]:
    c = Clients(gw.port)
    yield c
    c.close_all()


# --------------------------------------------------------------------------- CONNACK


def test_unknown_protocol_level_is_refused_as_unsupported(gw: GatewayProcess) -> None:
    """3.1.2.2: an unsupported Protocol Version gets 'unsupported protocol version' + close."""
    for level in (6, 2):
        with RawClient(gw.port) as c:
            c.send(connect_packet(uid("lvl"), level=level, properties=b""))
            ack = c.expect(CONNACK)
            # The client's version is unknown: 3.1.1 layout with code 0x01, or 5.0 with 0x84.
            assert (ack.raw == b"\x20\x02\x00\x01") or (ack.raw[:4] == b"\x20\x03\x00\x84"), (
                f"level {level}: {ack.raw!r}"
            )
            assert c.closed_by_server(2.0)
    # supported levels are not refused
    for level in (4, 5):
        with RawClient(gw.port) as c:
            c.v5 = level == 5
            c.send(connect_packet(uid("lvl"), level=level))
            assert c.expect(CONNACK).reason == 0


def test_authentication_method_is_refused_with_0x8c(gw: GatewayProcess) -> None:
    """3.1.2.11.9 / 4.12: an unsupported Authentication Method → CONNACK 0x8C, close."""
    with RawClient(gw.port) as c:
        ack = c.connect(uid("am"), properties=props(authentication_method="SCRAM-SHA-1"),
                        check=False)
        assert ack.reason == 0x8C
        assert not ack.session_present
        assert c.closed_by_server(2.0)


@pytest.fixture
def auth_gw(gateway_factory: Callable[..., GatewayProcess], tmp_path: Path) -> GatewayProcess:
    users = tmp_path / "users.toml"
    add_user(users, "alice", "wonderland")
    return gateway_factory(
        config={"auth": {"allow_anonymous": False, "users_file": str(users)}}
    )


@pytest.mark.parametrize(
    ("username", "password", "reason"),
    [
        (None, None, 0x87),  # anonymous, not allowed: Not authorized
        ("alice", b"wrong", 0x86),  # Bad User Name or Password
        ("mallory", b"wonderland", 0x86),  # unknown user
        ("alice", None, 0x86),  # user name without password
        ("alice", b"wonderland", 0x00),  # control: the right password
    ],
)
def test_connack_authentication_reason_codes(
    auth_gw: GatewayProcess, username: str | None, password: bytes | None, reason: int
) -> None:
    """3.2.2.2: CONNACK 0x86 for bad credentials, 0x87 for a refused anonymous client."""
    with RawClient(auth_gw.port) as c:
        ack = c.connect(uid("auth"), username=username, password=password, check=False)
        assert ack.reason == reason, ack
        if reason:
            assert not ack.session_present
            assert c.closed_by_server(2.0), "server must close after a refusing CONNACK"
        else:
            c.send(disconnect_packet())


def test_connack_properties_defaults(gw: GatewayProcess) -> None:
    """3.2.2.3: assigned client id, maximum packet size, topic alias max, receive max."""
    with RawClient(gw.port) as c:
        ack = c.connect("", properties=props(session_expiry_interval=10))
        p = ack.properties
        assigned = p.get("assigned_client_identifier")
        assert isinstance(assigned, str) and assigned, p
        assert p.get("maximum_packet_size") == 1048576
        assert p.get("topic_alias_maximum") == 10
        assert p.get("receive_maximum") == 100
        assert "server_keep_alive" not in p  # not configured: the client's keep-alive stands
        assert "session_expiry_interval" not in p  # 10 s is within the maximum: granted
        c.send(disconnect_packet())
    # the assigned identifier names a real session (expiry 10 s): it can be resumed
    with RawClient(gw.port) as c:
        ack = c.connect(assigned, clean_start=False)
        assert ack.session_present
        assert "assigned_client_identifier" not in ack.properties
        c.send(disconnect_packet(properties=props(session_expiry_interval=0)))


def test_connack_server_keep_alive_and_session_expiry_cap(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    """3.2.2.3.2 / 3.2.2.3.14: the server announces its Session Expiry and Keep Alive."""
    g = gateway_factory(config={"mqtt": {"server_keep_alive": 7, "max_session_expiry": 30}})
    with RawClient(g.port) as c:
        ack = c.connect(uid("ska"), keep_alive=60,
                        properties=props(session_expiry_interval=3600))
        assert ack.properties.get("server_keep_alive") == 7
        assert ack.properties.get("session_expiry_interval") == 30
    with RawClient(g.port) as c:
        ack = c.connect(uid("ska"), keep_alive=0, properties=props(session_expiry_interval=20))
        assert ack.properties.get("server_keep_alive") == 7
        assert ack.properties.get("session_expiry_interval", 20) == 20


# --------------------------------------------------------------------------- sessions


def test_session_resumes_with_subscriptions_and_queued_messages(clients: Clients) -> None:
    """3.1.2.4 / 3.1.2.11.2: expiry > 0 keeps the session; queued QoS 1 are delivered."""
    cid, topic = uid("sess"), uid("sess/t")
    sub = clients.paho(cid, clean_start=True, session_expiry=60)
    assert not sub.session_present
    assert sub.subscribe(topic, 1) == [1]
    sub.disconnect()
    pub = clients.paho()
    for i in range(3):
        # the offline session is a matching subscriber: success, not 0x10
        assert pub.publish(topic, f"queued-{i}", 1) == 0
    sub2 = clients.paho(cid, clean_start=False, session_expiry=60)
    assert sub2.session_present
    got = [sub2.get() for _ in range(3)]
    assert [m.payload for m in got] == [b"queued-0", b"queued-1", b"queued-2"]
    assert all(m.qos == 1 for m in got)
    pub.publish(topic, "live", 1)  # the subscription was kept: no new SUBSCRIBE was sent
    assert sub2.get().payload == b"live"
    sub2.disconnect(session_expiry=0)


def test_session_expires_after_interval(clients: Clients) -> None:
    """3.1.2.11.2: after Session Expiry Interval the session is gone (session present 0)."""
    cid, topic = uid("exp"), uid("exp/t")
    c = clients.raw(cid, properties=props(session_expiry_interval=1))
    assert c.subscribe([(topic, 1)]) == [1]
    c.send(disconnect_packet())
    time.sleep(2.5)
    pub = clients.paho()
    assert pub.publish(topic, "x", 1) == 0x10  # the subscription went with the session
    c2 = clients.raw()
    ack = c2.connect(cid, clean_start=False, properties=props(session_expiry_interval=60))
    assert not ack.session_present
    assert c2.recv(0.5) is None  # nothing queued for it
    c2.send(disconnect_packet(properties=props(session_expiry_interval=0)))


def test_clean_start_discards_existing_session(clients: Clients) -> None:
    """3.1.2.4: Clean Start 1 discards the existing session (session present 0)."""
    cid, topic = uid("clean"), uid("clean/t")
    c = clients.raw(cid, properties=props(session_expiry_interval=60))
    c.subscribe([(topic, 1)])
    c.send(disconnect_packet())
    c2 = clients.raw()
    ack = c2.connect(cid, clean_start=True, properties=props(session_expiry_interval=60))
    assert not ack.session_present
    pub = clients.paho()
    assert pub.publish(topic, "x", 1) == 0x10  # old subscription discarded
    assert c2.recv(0.5) is None
    c2.send(disconnect_packet(properties=props(session_expiry_interval=0)))


def test_disconnect_sets_session_expiry_to_zero(clients: Clients) -> None:
    """3.14.2.2.2: DISCONNECT may set Session Expiry Interval 0: the session ends now."""
    cid = uid("dz")
    c = clients.raw(cid, properties=props(session_expiry_interval=60))
    c.subscribe([(uid("dz/t"), 1)])
    c.send(disconnect_packet(properties=props(session_expiry_interval=0)))
    assert c.closed_by_server(2.0)
    ack = clients.raw().connect(cid, clean_start=False)
    assert not ack.session_present


def test_disconnect_extends_session_expiry(clients: Clients) -> None:
    """3.14.2.2.2: DISCONNECT may raise a non-zero Session Expiry Interval."""
    cid = uid("dx")
    c = clients.raw(cid, properties=props(session_expiry_interval=1))
    c.send(disconnect_packet(properties=props(session_expiry_interval=60)))
    time.sleep(1.6)
    c2 = clients.raw()
    assert c2.connect(cid, clean_start=False).session_present
    c2.send(disconnect_packet(properties=props(session_expiry_interval=0)))


def test_disconnect_expiry_from_zero_is_protocol_error(clients: Clients) -> None:
    """3.14.2.2.2: expiry 0 in CONNECT then non-zero in DISCONNECT → DISCONNECT 0x82.

    It is not a valid DISCONNECT, so the Will is published.
    """
    will_topic = uid("dzp/will")
    watcher = clients.paho()
    watcher.subscribe(will_topic, 0)
    c = clients.raw(uid("dzp"), will=(will_topic, b"gone", 0, False, b"\x00"))
    c.send(disconnect_packet(properties=props(session_expiry_interval=30)))
    d = c.expect(DISCONNECT)
    assert d.reason == 0x82
    assert c.closed_by_server(2.0)
    assert watcher.get(3.0).payload == b"gone"


def test_session_takeover_disconnects_old_connection_with_0x8e(clients: Clients) -> None:
    """3.1.4-3: a second CONNECT with the same client id → old connection DISCONNECT 0x8E."""
    cid = uid("take")
    old = clients.raw(cid)
    new = clients.raw(cid)
    d = old.expect(DISCONNECT, 3.0)
    assert d.reason == 0x8E
    assert old.closed_by_server(2.0)
    new.send(frame(0xC0, b""))  # the new connection works: PINGREQ → PINGRESP
    assert new.expect(13).type == 13


# --------------------------------------------------------------------------- Will


def _will(topic: str, payload: bytes, delay: int | None = None, **extra: object) -> tuple:
    p = {"will_delay_interval": delay} if delay is not None else {}
    p.update(extra)
    return (topic, payload, 1, False, props(**p))


def test_will_delay_publishes_after_delay(clients: Clients) -> None:
    """3.1.3.2.2: the Will is published Will Delay Interval after the connection drops."""
    topic = uid("wd/t")
    watcher = clients.paho()
    watcher.subscribe(topic, 1)
    c = clients.raw(uid("wd"), will=_will(topic, b"late", 1, content_type="text/plain",
                                           user_property=[("k", "v")]),
                    properties=props(session_expiry_interval=30))
    t0 = time.monotonic()
    c.close()  # network failure: no DISCONNECT
    assert watcher.drain(0.6) == [], "Will published before its delay"
    m = watcher.get(3.0)
    assert time.monotonic() - t0 >= 0.9
    assert m.payload == b"late" and m.topic == topic
    assert m.properties.ContentType == "text/plain"
    assert m.properties.UserProperty == [("k", "v")]


def test_will_not_published_when_client_reconnects_within_delay(clients: Clients) -> None:
    """3.1.3.2.2: reconnecting (session resumed) within the Will Delay cancels the Will."""
    cid, topic = uid("wr"), uid("wr/t")
    watcher = clients.paho()
    watcher.subscribe(topic, 1)
    c = clients.raw(cid, will=_will(topic, b"never", 1),
                    properties=props(session_expiry_interval=30))
    c.close()
    time.sleep(0.2)
    c2 = clients.raw()
    assert c2.connect(cid, clean_start=False,
                      properties=props(session_expiry_interval=30)).session_present
    assert watcher.drain(1.8) == []
    c2.send(disconnect_packet(properties=props(session_expiry_interval=0)))


def test_will_published_at_session_end_before_delay(clients: Clients) -> None:
    """3.1.3.2.2: session expiry (1 s) < Will Delay (60 s): the Will goes at session end."""
    topic = uid("we/t")
    watcher = clients.paho()
    watcher.subscribe(topic, 1)
    c = clients.raw(uid("we"), will=_will(topic, b"ended", 60),
                    properties=props(session_expiry_interval=1))
    t0 = time.monotonic()
    c.close()
    m = watcher.get(4.0)
    assert m.payload == b"ended"
    assert 0.8 <= time.monotonic() - t0 < 4.0


def test_disconnect_with_will_message_publishes_will(clients: Clients) -> None:
    """3.14.2.1: DISCONNECT reason 0x04 publishes the Will; 0x00 deletes it."""
    topic = uid("w4/t")
    watcher = clients.paho()
    watcher.subscribe(topic, 1)
    c = clients.raw(uid("w4"), will=_will(topic, b"w-0x04"))
    c.send(disconnect_packet(0x04))
    assert watcher.get(3.0).payload == b"w-0x04"
    c2 = clients.raw(uid("w0"), will=_will(topic, b"w-0x00"))
    c2.send(disconnect_packet(0x00))
    assert c2.closed_by_server(2.0)
    assert watcher.drain(1.0) == []


# --------------------------------------------------------------------------- keep-alive, AUTH


def test_keep_alive_timeout_sends_disconnect_0x8d(clients: Clients) -> None:
    """3.1.2.10: no packet within 1.5 × Keep Alive → DISCONNECT 0x8D and close."""
    c = clients.raw(uid("ka"), keep_alive=1)
    t0 = time.monotonic()
    d = c.expect(DISCONNECT, 5.0)
    elapsed = time.monotonic() - t0
    assert d.reason == 0x8D
    assert 1.0 <= elapsed < 4.0, elapsed
    assert c.closed_by_server(2.0)


@pytest.mark.parametrize(
    "body",
    [b"\x19\x00", b"\x18" + props(authentication_method="SCRAM-SHA-1")],
    ids=["reauthenticate", "continue-with-method"],
)
def test_auth_without_authentication_method_is_an_error(clients: Clients, body: bytes) -> None:
    """4.12 / 3.15: AUTH when CONNECT had no Authentication Method → DISCONNECT ≥ 0x80."""
    c = clients.raw(uid("auth"))
    c.send(frame(0xF0, body))
    p = c.recv(3.0)
    assert p is not None and p.type == DISCONNECT, p
    assert p.reason >= 0x80
    assert p.type != AUTH
    assert c.closed_by_server(2.0)


# --------------------------------------------------------------------------- $SYS


def test_sys_topics_exist_and_root_wildcards_do_not_match_them(clients: Clients) -> None:
    """4.7.2: $SYS/broker/... exists; '#' and '+/...' do not match topics starting with $."""
    sys_sub = clients.paho()
    sys_sub.subscribe("$SYS/broker/#", 0)
    wild = clients.paho()
    wild.subscribe("#", 0)
    wild.subscribe("+/broker/#", 0)
    seen: set[str] = set()
    deadline = time.monotonic() + 4.0
    while "$SYS/broker/version" not in seen and time.monotonic() < deadline:
        seen.add(sys_sub.get(max(0.1, deadline - time.monotonic())).topic)
    assert "$SYS/broker/version" in seen
    assert all(t.startswith("$SYS/broker/") for t in seen)
    marker = uid("sysmark")
    clients.paho().publish(marker, "m", 1)
    got = wild.drain(1.5)  # $SYS is republished every second (sys_interval = 1)
    assert any(m.topic == marker for m in got), "the wildcard subscriber works"
    assert not [m.topic for m in got if m.topic.startswith("$")]


def test_publish_to_sys_is_refused(clients: Clients) -> None:
    """Clients cannot publish into $SYS (PUBACK 0x87); subscribers see nothing."""
    sys_sub = clients.paho()
    topic = "$SYS/broker/" + uid("fake")
    sys_sub.subscribe(topic, 1)
    c = clients.raw(uid("sysp"))
    c.send(publish_packet(topic, b"spoof", 1, 1))
    ack = c.expect(4)
    assert ack.reason == 0x87
    assert sys_sub.drain(0.5) == []
