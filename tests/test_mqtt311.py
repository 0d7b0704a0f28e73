"""MQTT 3.1.1 behaviour of the real gateway, checked with paho-mqtt and a raw-socket client.

Spec references are to OASIS MQTT Version 3.1.1 (conformance statements ``[MQTT-x.y.z-n]``).
One gateway per module (per xdist worker); every test uses its own client ids and topics.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rapidmq_edge.security.users import add_user

from .gateway_proc import GatewayProcess
from .mqtt_helpers import (
    CONNACK,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    UNSUBACK,
    ClientTracker,
    RawClient,
    RawPublish,
    build_connect,
    build_subscribe,
    unique,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

MAX_PACKET = 8192
DENY_PUB_PREFIX = "acl311/nopub"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Anonymous gateway with two ACL rules and a small maximum packet size."""
    tmp = tmp_path_factory.mktemp("gw311")
    config = {
        "mqtt": {"max_packet_size": MAX_PACKET},
        "acl": [
            {"user": "*", "topic": "test/nosubscribe", "action": "subscribe", "access": "deny"},
            {"user": "*", "topic": f"{DENY_PUB_PREFIX}/#", "action": "publish",
             "access": "deny"},
        ],
    }
    g = GatewayProcess(tmp, config).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def auth_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Gateway that refuses anonymous clients; user ``alice`` / ``s3cret``."""
    tmp = tmp_path_factory.mktemp("gw311auth")
    users = Path(tmp) / "users.toml"
    add_user(users, "alice", "s3cret")
    g = GatewayProcess(
        tmp, {"auth": {"allow_anonymous": False, "users_file": str(users)}}
    ).start()
    yield g
    g.stop()


@pytest.fixture
def clients(gw: GatewayProcess) -> Iterator[ClientTracker]:
    tracker = ClientTracker(gw.port)
    yield tracker
    tracker.close_all()


def pid_of(body: bytes) -> int:
    return int(struct.unpack_from("!H", body)[0])


def ack_delivery(raw: RawClient, p: RawPublish) -> None:
    """Complete the broker-to-client flow for ``p`` (PUBACK, or PUBREC/PUBREL/PUBCOMP)."""
    if p.qos == 1:
        raw.puback(p.packet_id)
    elif p.qos == 2:
        raw.pubrec(p.packet_id)
        rel = raw.expect(PUBREL)
        assert rel.flags == 0x02, "PUBREL fixed header flags must be 0010 [MQTT-3.6.1-1]"
        assert pid_of(rel.body) == p.packet_id
        raw.pubcomp(p.packet_id)


# =========================================================================== CONNECT


def test_connack_accepted(clients: ClientTracker) -> None:
    raw = clients.raw()
    assert raw.connect(unique("c")) == (False, 0)
    raw.pingreq()
    assert raw.expect(PINGRESP).body == b""


def test_connack_unsupported_protocol_level(clients: ClientTracker) -> None:
    """[MQTT-3.1.2-2]: CONNACK return code 0x01, then the connection is closed."""
    raw = clients.raw()
    raw.send(build_connect(unique("c"), protocol_level=6))
    p = raw.expect(CONNACK, timeout=3)
    assert p.body == b"\x00\x01"
    assert raw.wait_closed(3), "server must close after refusing the protocol level"


def test_connack_identifier_rejected_for_empty_id_without_clean_session(
    clients: ClientTracker,
) -> None:
    """[MQTT-3.1.3-8]: zero-byte client id with CleanSession=0 -> 0x02 and close."""
    raw = clients.raw()
    assert raw.connect("", clean=False) == (False, 2)
    assert raw.wait_closed(3)
    # ... while with CleanSession=1 the server assigns an id [MQTT-3.1.3-6]
    raw2 = clients.raw()
    assert raw2.connect("", clean=True) == (False, 0)
    raw2.pingreq()
    raw2.expect(PINGRESP)


def test_connack_bad_credentials_and_not_authorized(auth_gw: GatewayProcess) -> None:
    """Return code 4 (bad user name or password), 5 (not authorized), 0 with a good login.

    A non-zero return code has Session Present 0 [MQTT-3.2.2-4] and closes [MQTT-3.2.2-5].
    """
    cases = [
        ({"username": "alice", "password": "wrong"}, 4),
        ({"username": "mallory", "password": "s3cret"}, 4),
        ({}, 5),
        ({"username": "alice", "password": "s3cret"}, 0),
    ]
    for kwargs, expected in cases:
        with RawClient(auth_gw.port) as raw:
            assert raw.connect(unique("auth"), clean=False, **kwargs) == (False, expected), (
                kwargs
            )
            if expected:
                assert raw.wait_closed(3), f"refused connection {kwargs} must be closed"
            else:
                raw.pingreq()
                raw.expect(PINGRESP)
                raw.disconnect()


def test_paho_login_with_password(auth_gw: GatewayProcess) -> None:
    tracker = ClientTracker(auth_gw.port)
    try:
        ok = tracker.connected(username="alice", password="s3cret")
        t = unique("authpub")
        assert ok.subscribe(t, 1) == [1]
        ok.publish(t, b"hi", qos=1)
        assert ok.get().payload == b"hi"
        bad = tracker.paho(username="alice", password="nope", connect=True,
                           expect_success=False)
        assert bad.connack is not None and bad.connack.reason_code != 0
        anon = tracker.paho(connect=True, expect_success=False)
        assert anon.connack is not None and anon.connack.reason_code != 0
    finally:
        tracker.close_all()


def test_session_present_flag(clients: ClientTracker) -> None:
    """[MQTT-3.2.2-1..3]: 0 for clean sessions, 1 when a stored session is resumed."""
    cid = unique("sp")
    steps = [(False, False), (False, True), (True, False), (False, False), (False, True)]
    for clean, present in steps:
        raw = clients.raw()
        assert raw.connect(cid, clean=clean) == (present, 0), f"clean={clean}"
        raw.disconnect()


@pytest.mark.parametrize("same_id", [True, False])
def test_second_connect_is_a_protocol_violation(clients: ClientTracker, same_id: bool) -> None:
    """[MQTT-3.1.0-2]: a second CONNECT closes the connection (and the Will is sent)."""
    t = unique("will2c")
    sub = clients.connected()
    sub.subscribe(t, 1)
    cid = unique("twice")
    raw = clients.raw()
    assert raw.connect(cid, will=(t, b"violated", 1, False)) == (False, 0)
    raw.send(build_connect(cid if same_id else unique("other")))
    assert raw.wait_closed(3), "second CONNECT must close the network connection"
    m = sub.get(3)
    assert m.payload == b"violated", "Will must be published when the server closes on error"


def test_packet_before_connect_closes(clients: ClientTracker) -> None:
    """[MQTT-3.1.0-1]: the first packet must be CONNECT."""
    raw = clients.raw()
    raw.send(build_subscribe(1, [("a/b", 0)]))
    assert raw.wait_closed(3)
    # the gateway is unaffected
    ok = clients.raw()
    assert ok.connect(unique("after")) == (False, 0)


# =========================================================================== QoS


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_pubsub_roundtrip_and_ordering(clients: ClientTracker, qos: int) -> None:
    """Client->broker and broker->client at each QoS; per-topic order kept [MQTT-4.6.0-5]."""
    t = unique(f"order{qos}")
    sub = clients.connected()
    assert sub.subscribe(t, qos) == [qos]
    pub = clients.connected()
    n = 30
    infos = [pub.publish(t, f"m{i}", qos, wait=False) for i in range(n)]
    for info in infos:
        info.wait_for_publish(5)
        assert info.is_published()
    msgs = sub.get_n(n)
    assert [m.payload.decode() for m in msgs] == [f"m{i}" for i in range(n)]
    assert {m.qos for m in msgs} == {qos}
    assert not any(m.retain for m in msgs)
    sub.assert_no_message(0.2)


def test_client_receives_its_own_publish(clients: ClientTracker) -> None:
    t = unique("self")
    c = clients.connected()
    c.subscribe(t, 2)
    c.publish(t, b"echo", qos=2)
    m = c.get()
    assert (m.payload, m.qos) == (b"echo", 2)


@pytest.mark.parametrize(
    ("pub_qos", "sub_qos", "expected"),
    [(2, 1, 1), (0, 2, 0), (1, 0, 0), (2, 0, 0), (1, 2, 1), (2, 2, 2)],
)
def test_delivered_qos_is_minimum(
    clients: ClientTracker, pub_qos: int, sub_qos: int, expected: int
) -> None:
    """Delivered QoS = min(publish QoS, granted QoS) [MQTT-3.8.4-6], seen on the wire."""
    t = unique("minqos")
    raw = clients.raw()
    raw.connect(unique("rsub"))
    assert raw.subscribe([(t, sub_qos)]) == [sub_qos], "granted QoS [MQTT-3.9.3-1]"
    pub = clients.connected()
    pub.publish(t, b"payload", qos=pub_qos)
    p = raw.expect_publish()
    assert (p.topic, p.payload, p.qos, p.retain, p.dup) == (t, b"payload", expected, False, False)
    assert (p.packet_id != 0) == (expected > 0)
    ack_delivery(raw, p)
    raw.assert_no_packet(0.3)


# =========================================================================== topics


def test_wildcards(clients: ClientTracker) -> None:
    """``+`` one level (also an empty one), ``#`` any number incl. the parent [MQTT-4.7.1-2]."""
    base = unique("sport")
    filters = {
        "hash": f"{base}/#",
        "plus": f"{base}/+/score",
        "exact": f"{base}/tennis/score",
        "mid": f"{base}/tennis/+",
        "plusonly": f"{base}/+",
    }
    subs = {}
    for name, filt in filters.items():
        subs[name] = clients.connected()
        assert subs[name].subscribe(filt, 1) == [1]
    topics = [base, f"{base}/tennis/score", f"{base}/tennis/player/score", f"{base}//score",
              f"{base}/tennis", f"{unique('other')}/tennis/score"]
    pub = clients.connected()
    for topic in topics:
        pub.publish(topic, topic, qos=1)
    expected = {
        "hash": [base, f"{base}/tennis/score", f"{base}/tennis/player/score",
                 f"{base}//score", f"{base}/tennis"],
        "plus": [f"{base}/tennis/score", f"{base}//score"],
        "exact": [f"{base}/tennis/score"],
        "mid": [f"{base}/tennis/score"],
        "plusonly": [f"{base}/tennis"],
    }
    for name, want in expected.items():
        got = [m.topic for m in subs[name].get_n(len(want))]
        assert got == want, f"{filters[name]} received {got}"
        subs[name].assert_no_message(0.2 if name != "hash" else 0.3)


def test_sys_topics(clients: ClientTracker) -> None:
    """``$SYS/#`` sees broker statistics; ``#`` and ``+/...`` never match ``$`` topics
    [MQTT-4.7.2-1]."""
    all_sub = clients.connected()
    all_sub.subscribe("#", 0)
    plus_sub = clients.connected()
    plus_sub.subscribe("+/broker/uptime", 0)
    plus_sub.subscribe("+/broker/#", 0)
    sys_sub = clients.connected()
    assert sys_sub.subscribe("$SYS/#", 0) == [0]
    wanted = ("$SYS/broker/uptime", "$SYS/broker/clients/connected")
    retained: dict[str, bytes] = {}
    live: dict[str, bytes] = {}  # periodic publications, not just the retained copies
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline and not all(w in live for w in wanted):
        try:
            m = sys_sub.get(0.3)
        except AssertionError:
            continue
        (retained if m.retain else live)[m.topic] = m.payload
    assert all(w in retained for w in wanted), f"retained $SYS topics: {sorted(retained)}"
    assert all(w in live for w in wanted), (
        f"no periodic $SYS publication within 4 s (sys_interval is 1 s): {sorted(live)}"
    )
    assert re.fullmatch(rb"\d+ seconds", live["$SYS/broker/uptime"]), live
    assert int(live["$SYS/broker/clients/connected"]) >= 3
    leaked = [m.topic for m in all_sub.drain() if m.topic.startswith("$")]
    assert leaked == [], "'#' must not match $SYS topics"
    assert plus_sub.drain() == [], "'+/broker/...' must not match $SYS topics"


def test_publish_to_wildcard_topic_closes(clients: ClientTracker) -> None:
    """[MQTT-3.3.2-2]: a PUBLISH topic name must not contain wildcards."""
    raw = clients.raw()
    raw.connect(unique("wild"))
    raw.publish("a/+/b", b"x", qos=0)
    assert raw.wait_closed(3)


# =========================================================================== retained


def test_retained_set_replace_clear(clients: ClientTracker) -> None:
    t = unique("ret")
    pub = clients.connected()
    pub.publish(t, b"v1", qos=1, retain=True)
    s1 = clients.connected()
    s1.subscribe(t, 1)
    m = s1.get()
    assert (m.payload, m.retain, m.qos) == (b"v1", True, 1), "[MQTT-3.3.1-8]"
    pub.publish(t, b"v2", qos=1, retain=True)
    m = s1.get()
    assert (m.payload, m.retain) == (b"v2", False), (
        "established subscription gets RETAIN=0 [MQTT-3.3.1-9]"
    )
    s2 = clients.connected()
    s2.subscribe(t, 1)
    m = s2.get()
    assert (m.payload, m.retain) == (b"v2", True), "retained message replaced [MQTT-3.3.1-5]"
    s2.assert_no_message(0.2)
    pub.publish(t, b"", qos=1, retain=True)
    m = s1.get()
    assert (m.payload, m.retain) == (b"", False), "empty retained PUBLISH is forwarded"
    s3 = clients.connected()
    s3.subscribe(t, 1)
    s3.assert_no_message(0.5)  # cleared [MQTT-3.3.1-10, -11]


def test_retained_qos_is_downgraded_to_subscription(clients: ClientTracker) -> None:
    t = unique("retq")
    clients.connected().publish(t, b"r", qos=2, retain=True)
    raw = clients.raw()
    raw.connect(unique("rq"))
    raw.subscribe([(t, 1)])
    p = raw.expect_publish()
    assert (p.payload, p.qos, p.retain) == (b"r", 1, True)
    ack_delivery(raw, p)


def test_retained_not_leaked_to_other_filters(clients: ClientTracker) -> None:
    base = unique("leak")
    pub = clients.connected()
    pub.publish(f"{base}/a", b"A", qos=1, retain=True)
    pub.publish(f"{base}/b/c", b"C", qos=1, retain=True)
    miss = clients.connected()
    for f in (f"{base}/x", f"{base}/a/+", f"{base}/b", f"{unique('other')}/#", f"{base}a"):
        miss.subscribe(f, 1)
    plus = clients.connected()
    plus.subscribe(f"{base}/+", 1)
    hash_sub = clients.connected()
    hash_sub.subscribe(f"{base}/#", 1)
    assert [(m.topic, m.retain) for m in plus.get_n(1)] == [(f"{base}/a", True)]
    assert sorted(m.topic for m in hash_sub.get_n(2)) == [f"{base}/a", f"{base}/b/c"]
    miss.assert_no_message(0.4)
    plus.assert_no_message(0.1)
    for topic in (f"{base}/a", f"{base}/b/c"):
        pub.publish(topic, b"", qos=1, retain=True)


# =========================================================================== Will


def test_will_sent_on_abnormal_disconnect(clients: ClientTracker) -> None:
    t = unique("will")
    sub = clients.connected()
    sub.subscribe(t, 2)
    raw = clients.raw()
    assert raw.connect(unique("w"), will=(t, b"gone", 1, False)) == (False, 0)
    sub.assert_no_message(0.2)
    raw.close()  # no DISCONNECT
    m = sub.get(3)
    assert (m.topic, m.payload, m.qos, m.retain) == (t, b"gone", 1, False)


def test_will_not_sent_on_clean_disconnect(clients: ClientTracker) -> None:
    """[MQTT-3.1.2-10]: DISCONNECT deletes the Will."""
    t = unique("nowill")
    sub = clients.connected()
    sub.subscribe(t, 1)
    raw = clients.raw()
    raw.connect(unique("w"), will=(t, b"should-not", 1, False))
    raw.disconnect()
    sub.assert_no_message(0.8)


def test_will_sent_on_keep_alive_timeout(clients: ClientTracker) -> None:
    """Keep-alive 1 s, client silent: closed after 1.5 s and the Will published
    [MQTT-3.1.2-24]."""
    t = unique("kawill")
    sub = clients.connected()
    sub.subscribe(t, 1)
    raw = clients.raw()
    raw.connect(unique("w"), keepalive=1, will=(t, b"timeout", 0, False))
    t0 = time.monotonic()
    m = sub.get(4)
    elapsed = time.monotonic() - t0
    assert m.payload == b"timeout"
    assert 1.0 <= elapsed <= 3.0, f"Will after {elapsed:.2f} s, expected ~1.5 s"
    assert raw.wait_closed(2)


def test_will_retain_flag_honoured(clients: ClientTracker) -> None:
    t = unique("willret")
    sub = clients.connected()
    sub.subscribe(t, 1)
    raw = clients.raw()
    raw.connect(unique("w"), will=(t, b"last", 1, True))
    raw.close()
    m = sub.get(3)
    assert (m.payload, m.retain) == (b"last", False), "live delivery has RETAIN=0"
    late = clients.connected()
    late.subscribe(t, 1)
    m = late.get(3)
    assert (m.payload, m.retain) == (b"last", True), "Will with retain=1 must be retained"
    clients.connected().publish(t, b"", qos=1, retain=True)


# =========================================================================== keep-alive


def test_keep_alive_enforced(clients: ClientTracker) -> None:
    """[MQTT-3.1.2-24]: no packet within 1.5 x keep-alive -> disconnect."""
    raw = clients.raw()
    raw.connect(unique("ka"), keepalive=1)
    t0 = time.monotonic()
    assert raw.wait_closed(4), "silent client with keep-alive 1 s was not disconnected"
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed <= 3.0, f"disconnected after {elapsed:.2f} s, expected ~1.5 s"


def test_keep_alive_satisfied_by_pings(clients: ClientTracker) -> None:
    raw = clients.raw()
    raw.connect(unique("ka"), keepalive=1)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        raw.pingreq()
        raw.expect(PINGRESP, timeout=1)
        time.sleep(0.4)
    raw.pingreq()
    raw.expect(PINGRESP, timeout=1)


# =========================================================================== takeover


def test_client_id_takeover_closes_first_connection(clients: ClientTracker) -> None:
    """[MQTT-3.1.4-2]: a CONNECT with a connected client id disconnects the existing one."""
    cid = unique("dup")
    first = clients.raw()
    first.connect(cid)
    second = clients.raw()
    assert second.connect(cid) == (False, 0)
    assert first.wait_closed(3), "first connection must be closed"
    second.pingreq()
    second.expect(PINGRESP)


def test_takeover_resumes_persistent_session(clients: ClientTracker) -> None:
    cid = unique("dupp")
    t = unique("dupt")
    first = clients.raw()
    first.connect(cid, clean=False)
    first.subscribe([(t, 1)])
    second = clients.raw()
    assert second.connect(cid, clean=False) == (True, 0)
    assert first.wait_closed(3)
    clients.connected().publish(t, b"to-second", qos=1)
    p = second.expect_publish()
    assert p.payload == b"to-second"
    second.puback(p.packet_id)
    second.disconnect()
    clients.raw().connect(cid, clean=True)  # discard the stored session


def test_takeover_of_clean_session_does_not_resume_it(clients: ClientTracker) -> None:
    """A CleanSession=1 session ends with its connection [MQTT-3.1.2-6], also when it is
    taken over by a CleanSession=0 connection: no session present, no old subscriptions."""
    cid = unique("dupc")
    t = unique("dupct")
    first = clients.raw()
    first.connect(cid, clean=True)
    first.subscribe([(t, 1)])
    second = clients.raw()
    assert second.connect(cid, clean=False) == (False, 0), (
        "session present must be 0: the taken-over session was a clean one"
    )
    assert first.wait_closed(3)
    clients.connected().publish(t, b"x", qos=1)
    second.assert_no_packet(0.4)
    second.disconnect()
    clients.raw().connect(cid, clean=True)


# =========================================================================== sessions


def test_persistent_subscription_survives_reconnect(clients: ClientTracker) -> None:
    cid = unique("pers")
    t = unique("perst")
    c = clients.connected(cid, clean_session=False)
    assert c.connack is not None and not c.connack.session_present
    c.subscribe(t, 1)
    c.disconnect()
    c2 = clients.connected(cid, clean_session=False)
    assert c2.connack is not None and c2.connack.session_present
    clients.connected().publish(t, b"still-subscribed", qos=1)
    assert c2.get().payload == b"still-subscribed"
    c2.disconnect()
    c3 = clients.connected(cid, clean_session=True)  # discards the session
    assert c3.connack is not None and not c3.connack.session_present
    clients.connected().publish(t, b"gone", qos=1)
    c3.assert_no_message(0.4)


def test_offline_messages_qos1_qos2_queued_qos0_not(clients: ClientTracker) -> None:
    """[MQTT-3.1.2-5]: QoS 1/2 messages for a disconnected persistent session are stored;
    QoS 0 ones need not be (the gateway drops them)."""
    cid = unique("offl")
    t = unique("offlt")
    raw = clients.raw()
    raw.connect(cid, clean=False)
    assert raw.subscribe([(t, 2)]) == [2]
    raw.disconnect()
    pub = clients.connected()
    for payload, qos in ((b"zero", 0), (b"one", 1), (b"two", 2), (b"three", 1)):
        pub.publish(t, payload, qos=qos)
    again = clients.raw()
    assert again.connect(cid, clean=False) == (True, 0)
    got = []
    for _ in range(3):
        p = again.expect_publish()
        got.append((p.payload, p.qos))
        ack_delivery(again, p)
    assert got == [(b"one", 1), (b"two", 2), (b"three", 1)]
    again.assert_no_packet(0.4)
    again.disconnect()
    clients.raw().connect(cid, clean=True)


@pytest.mark.parametrize("clean_disconnect", [False, True])
@pytest.mark.parametrize("qos", [1, 2])
def test_unacknowledged_delivery_redelivered_with_dup(
    clients: ClientTracker, qos: int, clean_disconnect: bool
) -> None:
    """[MQTT-4.4.0-1]: on reconnect with CleanSession=0 unacknowledged PUBLISH packets are
    re-sent with DUP=1 [MQTT-3.3.1-1] and the original packet identifier (after an abrupt
    close or a DISCONNECT)."""
    cid = unique("dup")
    t = unique("dupt")
    raw = clients.raw()
    raw.connect(cid, clean=False)
    raw.subscribe([(t, qos)])
    clients.connected().publish(t, b"again", qos=qos)
    first = raw.expect_publish()
    assert (first.payload, first.qos, first.dup) == (b"again", qos, False)
    if clean_disconnect:
        raw.disconnect()  # DISCONNECT without acknowledging
    else:
        raw.close()  # no acknowledgement, no DISCONNECT
    raw2 = clients.raw()
    assert raw2.connect(cid, clean=False) == (True, 0)
    p = raw2.expect_publish()
    assert (p.payload, p.qos, p.packet_id, p.dup) == (b"again", qos, first.packet_id, True)
    ack_delivery(raw2, p)
    raw2.disconnect()
    raw3 = clients.raw()
    assert raw3.connect(cid, clean=False) == (True, 0)
    raw3.assert_no_packet(0.4)  # acknowledged: not sent again
    raw3.disconnect()
    clients.raw().connect(cid, clean=True)


def test_pubrel_resent_after_reconnect(clients: ClientTracker) -> None:
    """[MQTT-4.4.0-1]: an unacknowledged PUBREL is re-sent; the PUBLISH is not."""
    cid = unique("rel")
    t = unique("relt")
    raw = clients.raw()
    raw.connect(cid, clean=False)
    raw.subscribe([(t, 2)])
    clients.connected().publish(t, b"q2", qos=2)
    p = raw.expect_publish()
    raw.pubrec(p.packet_id)
    assert pid_of(raw.expect(PUBREL).body) == p.packet_id
    raw.close()  # no PUBCOMP
    raw2 = clients.raw()
    assert raw2.connect(cid, clean=False) == (True, 0)
    rel = raw2.expect(PUBREL)
    assert pid_of(rel.body) == p.packet_id
    raw2.pubcomp(p.packet_id)
    raw2.assert_no_packet(0.4)
    raw2.disconnect()
    clients.raw().connect(cid, clean=True)


def test_qos2_duplicate_publish_delivered_once(clients: ClientTracker) -> None:
    """QoS 2 method B / exactly once [MQTT-4.3.3-2]: a re-sent PUBLISH (same id, DUP=1)
    before PUBREL is acknowledged but not delivered again."""
    t = unique("once")
    sub = clients.connected()
    sub.subscribe(t, 2)
    raw = clients.raw()
    raw.connect(unique("p2"))
    raw.publish(t, b"once", qos=2, packet_id=7)
    assert pid_of(raw.expect(PUBREC).body) == 7
    raw.publish(t, b"once", qos=2, packet_id=7, dup=True)
    assert pid_of(raw.expect(PUBREC).body) == 7
    raw.pubrel(7)
    assert pid_of(raw.expect(PUBCOMP).body) == 7
    assert sub.get().payload == b"once"
    sub.assert_no_message(0.5)
    # after PUBCOMP the packet id is free again: a new message
    raw.publish_qos2(t, b"next")
    assert sub.get().payload == b"next"


def test_qos1_publish_acknowledged(clients: ClientTracker) -> None:
    raw = clients.raw()
    raw.connect(unique("p1"))
    raw.publish(unique("q1"), b"x", qos=1, packet_id=4242)
    assert pid_of(raw.expect(PUBACK).body) == 4242


# =========================================================================== subscribe


def test_unsubscribe_stops_delivery(clients: ClientTracker) -> None:
    t1, t2 = unique("uns1"), unique("uns2")
    sub = clients.connected()
    sub.subscribe([(t1, 1), (t2, 1)])
    pub = clients.connected()
    pub.publish(t1, b"before", qos=1)
    assert sub.get().payload == b"before"
    sub.unsubscribe(t1)
    pub.publish(t1, b"after", qos=1)
    pub.publish(t2, b"other", qos=1)
    m = sub.get()
    assert (m.topic, m.payload) == (t2, b"other")
    sub.assert_no_message(0.3)


def test_unsuback_for_unknown_filter(clients: ClientTracker) -> None:
    """[MQTT-3.10.4-5]: UNSUBACK even when nothing was subscribed."""
    raw = clients.raw()
    raw.connect(unique("u"))
    p = raw.unsubscribe([unique("never")], packet_id=99)
    assert p.type == UNSUBACK and p.body == b"\x00\x63"


def test_invalid_filter_gets_failure_code(clients: ClientTracker) -> None:
    t = unique("valid")
    raw = clients.raw()
    raw.connect(unique("inv"))
    codes = raw.subscribe([("a/#/b", 0), (t, 1), ("sport+", 1)])
    assert codes == [0x80, 1, 0x80]
    clients.connected().publish(t, b"ok", qos=1)
    p = raw.expect_publish()
    assert p.payload == b"ok"
    ack_delivery(raw, p)


def test_acl_subscribe_denied(clients: ClientTracker) -> None:
    t = unique("aclok")
    raw = clients.raw()
    raw.connect(unique("acl"))
    assert raw.subscribe([("test/nosubscribe", 1), (t, 1)]) == [0x80, 1]
    clients.connected().publish("test/nosubscribe", b"secret", qos=1)
    raw.assert_no_packet(0.4)


def test_acl_subscribe_deny_also_applies_to_wildcard_deliveries(clients: ClientTracker) -> None:
    """A ``test/#`` subscription does not carry ``test/nosubscribe`` (read check at delivery)."""
    sub = clients.connected()
    assert sub.subscribe("test/#", 1) == [1]
    pub = clients.connected()
    pub.publish("test/nosubscribe", b"secret", qos=1)
    pub.publish("test/visible", b"fine", qos=1)
    m = sub.get()
    assert (m.topic, m.payload) == ("test/visible", b"fine")
    sub.assert_no_message(0.3)


def test_acl_publish_denied(clients: ClientTracker) -> None:
    denied = f"{DENY_PUB_PREFIX}/{unique('x')}"
    allowed = unique("aclallowed")
    sub = clients.connected()
    sub.subscribe([(denied, 1), (allowed, 1)])
    pub = clients.connected()
    pub.publish(denied, b"blocked", qos=1)  # 3.1.1 still acknowledges
    pub.publish(allowed, b"fine", qos=1)
    m = sub.get()
    assert (m.topic, m.payload) == (allowed, b"fine")
    sub.assert_no_message(0.3)


def test_shared_subscription_round_robin(clients: ClientTracker) -> None:
    t = unique("shared")
    members = [clients.connected() for _ in range(2)]
    for m in members:
        assert m.subscribe(f"$share/g/{t}", 1) == [1]
    plain = clients.connected()
    plain.subscribe(t, 1)
    pub = clients.connected()
    n = 10
    for i in range(n):
        pub.publish(t, f"{i}", qos=1)
    assert len(plain.get_n(n)) == n
    assert wait_until(lambda: sum(m.messages.qsize() for m in members) >= n, 5)
    got = [[int(x.payload) for x in m.drain(0.2)] for m in members]
    assert sorted(got[0] + got[1]) == list(range(n)), f"each message exactly once: {got}"
    assert len(got[0]) == len(got[1]) == n // 2, f"round robin expected: {got}"


# =========================================================================== limits


def test_publish_above_max_packet_size_closes(clients: ClientTracker) -> None:
    t = unique("big")
    sub = clients.connected()
    sub.subscribe(t, 0)
    big = clients.raw()
    big.connect(unique("big"))
    big.publish(t, b"x" * (MAX_PACKET + 500), qos=0)
    assert big.wait_closed(3), "PUBLISH above max_packet_size must close the connection"
    sub.assert_no_message(0.3)
    ok = clients.raw()
    ok.connect(unique("small"))
    ok.publish_qos1(t, b"y" * (MAX_PACKET - 1000))
    assert len(sub.get().payload) == MAX_PACKET - 1000
