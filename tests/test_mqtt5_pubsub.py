"""MQTT 5.0 against the real gateway: subscription options and identifiers, properties,
topic aliases, message expiry, reason codes of PUBACK/SUBACK/UNSUBACK, shared subscriptions.

References are to the OASIS MQTT Version 5.0 specification.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from .gateway_proc import GatewayProcess
from .mqtt5_helpers import (
    DISCONNECT,
    PUBACK,
    PUBLISH,
    UNSUBACK,
    Clients,
    ack_packet,
    disconnect_packet,
    props,
    publish_packet,
    subscribe_packet,
    uid,
    unsubscribe_packet,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with a few ACL rules, shared by this module's tests."""
    g = GatewayProcess(
        tmp_path_factory.mktemp("gw-mqtt5-pubsub"),
        {
            "acl": [
                {"user": "*", "topic": "denied/#", "action": "publish", "access": "deny"},
                {"user": "*", "topic": "secret/#", "action": "subscribe", "access": "deny"},
            ]
        },
    ).start()
    yield g
    g.stop()


@pytest.fixture
def clients(gw: GatewayProcess) -> Iterator[Clients]:
    c = Clients(gw.port)
    yield c
    c.close_all()


def _opts(qos: int = 0, nl: bool = False, rap: bool = False, rh: int = 0) -> int:
    return qos | (4 if nl else 0) | (8 if rap else 0) | (rh << 4)


# --------------------------------------------------------------------------- subscription options


def test_no_local(clients: Clients) -> None:
    """3.8.3.1: No Local: own messages are not forwarded to this subscription."""
    topic = uid("nl")
    me = clients.paho()
    me.subscribe(topic, 1, no_local=True)
    other = clients.paho()
    other.subscribe(topic, 1)
    me.publish(topic, "mine", 1)
    assert other.get().payload == b"mine"
    assert me.drain(0.5) == []
    other.publish(topic, "theirs", 1)  # messages of others still arrive
    assert me.get().payload == b"theirs"
    assert other.get().payload == b"theirs"


def test_retain_as_published_on_live_delivery(clients: Clients) -> None:
    """3.8.3.1 / 3.3.1.3: RAP 1 keeps RETAIN on forwarded messages, RAP 0 clears it."""
    topic = uid("rap")
    keep = clients.paho()
    keep.subscribe(topic, 1, rap=True)
    clear = clients.paho()
    clear.subscribe(topic, 1, rap=False)
    clients.paho().publish(topic, "r", 1, retain=True)
    mk, mc = keep.get(), clear.get()
    assert mk.payload == mc.payload == b"r"
    assert mk.retain is True
    assert mc.retain is False
    clients.paho().publish(topic, "", 1, retain=True)  # clear the retained message


def test_retain_handling(clients: Clients) -> None:
    """3.8.3.1 Retain Handling: 0 always sends retained, 1 only on a new subscription, 2 never."""
    topic = uid("rh")
    pub = clients.paho()
    pub.publish(topic, "kept", 1, retain=True)
    c0 = clients.paho()
    for _ in range(2):  # rh=0: every SUBSCRIBE, also re-subscribing an existing filter
        c0.subscribe(topic, 1, rh=0)
        m = c0.get()
        assert m.payload == b"kept" and m.retain
    c1 = clients.paho()
    c1.subscribe(topic, 1, rh=1)
    assert c1.get().payload == b"kept"
    c1.subscribe(topic, 1, rh=1)  # existing subscription: nothing
    assert c1.drain(0.5) == []
    c2 = clients.paho()
    c2.subscribe(topic, 1, rh=2)
    assert c2.drain(0.5) == []
    pub.publish(topic, "", 1, retain=True)


def test_subscription_identifiers_merged_for_overlapping_subscriptions(clients: Clients) -> None:
    """3.3.4: overlapping subscriptions → one delivery, max QoS, every Subscription Id."""
    base = uid("sid")
    c = clients.paho()
    assert c.subscribe(f"{base}/+/c", 0, sub_id=5) == [0]
    assert c.subscribe(f"{base}/#", 1, sub_id=7) == [1]
    assert c.subscribe(f"{base}/x/y", 2, sub_id=9) == [2]
    pub = clients.paho()
    pub.publish(f"{base}/b/c", "both", 2)
    m = c.get()
    assert m.payload == b"both"
    assert m.qos == 1  # max over the matching subscriptions (0, 1), capped by the message
    assert sorted(m.properties.SubscriptionIdentifier) == [5, 7]
    pub.publish(f"{base}/x/y", "two", 2)
    m = c.get()
    assert m.qos == 2
    assert sorted(m.properties.SubscriptionIdentifier) == [7, 9]
    pub.publish(f"{base}/only", "one", 1)
    m = c.get()
    assert m.properties.SubscriptionIdentifier == [7]
    assert c.drain(0.5) == [], "each message must be delivered once"


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("qos", [0, 1])
def test_request_response_properties_pass_through(clients: Clients, qos: int) -> None:
    """3.3.2.3: Payload Format, Content Type, Response Topic, Correlation Data and User
    Properties (in order, duplicates kept) reach subscribers unchanged."""
    topic = uid("rr")
    sub = clients.paho()
    sub.subscribe(topic, 1)
    users = [("b", "2"), ("a", "1"), ("b", "3"), ("ü", "x y")]
    clients.paho().publish(
        topic, "{}", qos, ResponseTopic=topic + "/reply", CorrelationData=b"\x00\x01corr",
        UserProperty=users, ContentType="application/json", PayloadFormatIndicator=1,
    )
    m = sub.get()
    p = m.properties
    assert p.ResponseTopic == topic + "/reply"
    assert p.CorrelationData == b"\x00\x01corr"
    assert p.UserProperty == users
    assert p.ContentType == "application/json"
    assert p.PayloadFormatIndicator == 1


def test_message_expiry_on_queued_messages(clients: Clients) -> None:
    """3.3.2.3.3: expired messages are not delivered; others carry the remaining interval."""
    cid, topic = uid("mexp"), uid("mexp/t")
    sub = clients.raw(cid, properties=props(session_expiry_interval=60))
    sub.subscribe([(topic, 1)])
    sub.send(disconnect_packet())
    pub = clients.paho()
    pub.publish(topic, "short", 1, MessageExpiryInterval=1)
    pub.publish(topic, "long", 1, MessageExpiryInterval=10)
    time.sleep(2.0)
    sub2 = clients.raw()
    assert sub2.connect(cid, clean_start=False,
                        properties=props(session_expiry_interval=60)).session_present
    got = [p for p in sub2.recv_all(1.0) if p.type == PUBLISH]
    assert [p.payload for p in got] == [b"long"]
    remaining = got[0].properties["message_expiry_interval"]
    assert 1 <= remaining <= 8, remaining
    sub2.send(ack_packet(PUBACK, got[0].packet_id))
    sub2.send(disconnect_packet(properties=props(session_expiry_interval=0)))


# --------------------------------------------------------------------------- topic aliases


def test_topic_alias_client_to_server(clients: Clients) -> None:
    """3.3.2.3.4: alias + topic sets a mapping; alias only (empty topic) uses it."""
    t1, t2 = uid("ta/a"), uid("ta/b")
    sub = clients.paho()
    sub.subscribe(t1, 1)
    sub.subscribe(t2, 1)
    c = clients.raw(uid("ta"))
    c.send(publish_packet(t1, b"1", 1, 1, properties=props(topic_alias=3)))
    c.send(publish_packet("", b"2", 1, 2, properties=props(topic_alias=3)))
    c.send(publish_packet(t2, b"3", 1, 3, properties=props(topic_alias=3)))  # remap
    c.send(publish_packet("", b"4", 0, properties=props(topic_alias=3)))
    acks = [c.expect(PUBACK) for _ in range(3)]
    assert [a.reason for a in acks] == [0, 0, 0]
    got = [sub.get() for _ in range(4)]
    assert [(m.topic, m.payload) for m in got] == [(t1, b"1"), (t1, b"2"), (t2, b"3"),
                                                   (t2, b"4")]
    assert all(m.properties is None or not hasattr(m.properties, "TopicAlias") for m in got)


@pytest.mark.parametrize("alias", [11, 65535])
def test_topic_alias_above_maximum_disconnects_0x94(clients: Clients, alias: int) -> None:
    """3.3.2.3.4 [MQTT-3.3.2-9] / reason 0x94: an alias above the Topic Alias Maximum the
    server sent (10) → DISCONNECT 0x94 (Topic Alias invalid), then close."""
    c = clients.raw(uid("tab"))
    c.send(publish_packet(uid("tab/t"), b"x", 0, properties=props(topic_alias=alias)))
    d = c.expect(DISCONNECT)
    assert d.reason == 0x94, d
    assert c.closed_by_server(2.0)


def test_topic_alias_zero_disconnects(clients: Clients) -> None:
    """[MQTT-3.3.2-8]: a Topic Alias of 0 is not permitted → DISCONNECT and close.

    The spec defines 0x94 as "greater than the Maximum", so alias 0 is a plain protocol
    violation: 0x82 (Protocol Error) or 0x94 (Topic Alias invalid, as mosquitto) are both
    correct.
    """
    c = clients.raw(uid("tab"))
    c.send(publish_packet(uid("tab/t"), b"x", 0, properties=props(topic_alias=0)))
    d = c.expect(DISCONNECT)
    assert d.reason in (0x82, 0x94), d
    assert c.closed_by_server(2.0)


def test_unknown_topic_alias_disconnects(clients: Clients) -> None:
    """3.3.2.3.4: an empty topic with an alias that has no mapping → DISCONNECT ≥ 0x80."""
    c = clients.raw(uid("tau"))
    c.send(publish_packet("", b"x", 0, properties=props(topic_alias=4)))
    d = c.expect(DISCONNECT)
    assert d.reason in (0x82, 0x94), d
    assert c.closed_by_server(2.0)


def test_topic_alias_mapping_is_per_connection(clients: Clients) -> None:
    """[MQTT-3.3.2-7]: alias mappings are not carried to a new network connection."""
    cid, topic = uid("tac"), uid("tac/t")
    c = clients.raw(cid, properties=props(session_expiry_interval=30))
    c.send(publish_packet(topic, b"x", 1, 1, properties=props(topic_alias=2)))
    c.expect(PUBACK)
    c.send(disconnect_packet(properties=props(session_expiry_interval=0)))
    c2 = clients.raw(cid)
    c2.send(publish_packet("", b"y", 0, properties=props(topic_alias=2)))
    d = c2.expect(DISCONNECT)
    assert d.reason >= 0x80, d


def test_topic_alias_server_to_client(clients: Clients) -> None:
    """3.3.2.3.4: with Topic Alias Maximum in CONNECT the server may use aliases; it
    never exceeds the maximum."""
    base = uid("tas")
    c = clients.raw(uid("tas"), properties=props(topic_alias_maximum=1))
    c.subscribe([(f"{base}/#", 0)])
    pub = clients.paho()
    for t in ("a", "a", "b", "a", "b"):
        pub.publish(f"{base}/{t}", t, 0)
    got = [c.expect(PUBLISH) for _ in range(5)]
    aliases: dict[int, str] = {}
    topics = []
    for p in got:
        alias = p.properties.get("topic_alias")
        if alias is not None:
            assert 1 <= alias <= 1
            if p.topic:
                aliases[alias] = p.topic
            else:
                assert alias in aliases, "empty topic with an alias never set"
        else:
            assert p.topic
        topics.append(p.topic or aliases[alias])  # type: ignore[index]
    assert topics == [f"{base}/{t}" for t in ("a", "a", "b", "a", "b")]
    assert got[1].topic == "" and got[1].properties.get("topic_alias") == 1, (
        "the second delivery of the same topic uses the alias"
    )
    assert [p.payload for p in got] == [b"a", b"a", b"b", b"a", b"b"]


def test_no_topic_alias_without_client_maximum(clients: Clients) -> None:
    """3.3.2.3.4 [MQTT-3.3.2-11]: no Topic Alias Maximum in CONNECT → no aliases sent."""
    topic = uid("tan")
    c = clients.raw(uid("tan"))
    c.subscribe([(topic, 1)])
    pub = clients.paho()
    for _ in range(3):
        pub.publish(topic, "x", 1)
    for _ in range(3):
        p = c.expect(PUBLISH)
        assert p.topic == topic and "topic_alias" not in p.properties
        c.send(ack_packet(PUBACK, p.packet_id))


# --------------------------------------------------------------------------- reason codes


def test_puback_no_matching_subscribers_and_not_authorized(clients: Clients) -> None:
    """3.4.2.1: PUBACK 0x10 when nobody subscribes; 0x87 when the ACL denies the publish."""
    pub = clients.paho()
    assert pub.publish(uid("nobody"), "x", 1) == 0x10
    denied = "denied/" + uid("d")
    watcher = clients.paho()
    watcher.subscribe(denied, 1)
    assert pub.publish(denied, "x", 1) == 0x87
    assert watcher.drain(0.5) == []
    ok = uid("ok")
    watcher.subscribe(ok, 1)
    assert pub.publish(ok, "x", 1) == 0


def test_puback_when_persistent_subscriber_acks_at_once(clients: Clients) -> None:
    """3.3.4: every QoS 1 PUBLISH gets its PUBACK, also when the message went to an online
    persistent subscriber that acknowledged it before the store committed (the queued
    delivery's save and delete then cancel out before the commit)."""
    topic = uid("pa")
    sub = clients.raw(uid("pa-sub"), properties=props(session_expiry_interval=60))
    sub.subscribe([(topic, 1)])
    pub = clients.raw(uid("pa-pub"))
    for pid in range(1, 11):
        pub.send(publish_packet(topic, b"x", 1, pid))
        p = sub.expect(PUBLISH)
        sub.send(ack_packet(PUBACK, p.packet_id))  # at once, within the commit delay
        ack = pub.recv(2.0)
        assert ack is not None and ack.type == PUBACK, (
            f"publish {pid}: no PUBACK within 2 s (session store commit waiter never "
            "resolved when its pending changes cancelled out)"
        )
        assert ack.packet_id == pid and ack.reason == 0
    sub.send(disconnect_packet(properties=props(session_expiry_interval=0)))


def test_suback_reason_codes(clients: Clients) -> None:
    """3.9.3: one reason code per filter: granted QoS, 0x8F invalid filter, 0x87 ACL deny."""
    c = clients.raw(uid("sa"))
    base = uid("sa")
    codes = c.subscribe([
        (f"{base}/q2", 2),
        (f"{base}/q1", 1),
        (f"{base}/q0", 0),
        (f"{base}/#/bad", 0),
        (f"{base}/a+", 1),
        ("secret/" + base, 1),
        (f"$share/{base}/{base}/s", 1),
        ("$share/g+/x", 0),
    ])
    assert codes == [2, 1, 0, 0x8F, 0x8F, 0x87, 1, 0x8F]


def test_unsuback_reason_codes(clients: Clients) -> None:
    """3.11.3: UNSUBACK 0x00 for a removed subscription, 0x11 when none existed."""
    c = clients.raw(uid("ua"))
    topic = uid("ua")
    c.subscribe([(topic, 1)])
    c.send(unsubscribe_packet(2, [topic, uid("never")]))
    ack = c.expect(UNSUBACK)
    assert ack.packet_id == 2
    assert ack.codes == [0x00, 0x11]
    c.send(unsubscribe_packet(3, [topic]))
    assert c.expect(UNSUBACK).codes == [0x11]
    pub = clients.paho()
    assert pub.publish(topic, "x", 1) == 0x10  # really unsubscribed


# --------------------------------------------------------------------------- shared subscriptions


def test_shared_subscription_round_robin_and_member_leaving(clients: Clients) -> None:
    """4.8.2: each message goes to one member (round robin here); when a member's
    session ends, later messages go to the remaining member."""
    group, topic = uid("g"), uid("sh/t")
    a = clients.paho()
    b = clients.paho()
    assert a.subscribe(f"$share/{group}/{topic}", 1) == [1]
    assert b.subscribe(f"$share/{group}/{topic}", 1) == [1]
    pub = clients.paho()
    for i in range(10):
        assert pub.publish(topic, str(i), 1) == 0
    time.sleep(0.3)
    ga = a.drain(0.5)
    gb = b.drain(0.2)
    assert sorted(int(m.payload) for m in ga + gb) == list(range(10)), "each exactly once"
    assert len(ga) == 5 and len(gb) == 5, (len(ga), len(gb))
    b.disconnect()  # session expiry 0: the session ends
    time.sleep(0.2)
    for i in range(10, 16):
        assert pub.publish(topic, str(i), 1) == 0
    got = [int(a.get().payload) for _ in range(6)]
    assert sorted(got) == list(range(10, 16))


def test_shared_subscription_no_local_is_protocol_error(clients: Clients) -> None:
    """3.8.3.1 [MQTT-3.8.3-4]: No Local on a shared subscription → DISCONNECT 0x82."""
    c = clients.raw(uid("shnl"))
    c.send(subscribe_packet(1, [(f"$share/{uid('g')}/x", _opts(1, nl=True))]))
    d = c.expect(DISCONNECT)
    assert d.reason == 0x82
    assert c.closed_by_server(2.0)


def test_shared_subscription_gets_no_retained_messages(clients: Clients) -> None:
    """4.8.2: retained messages are not sent when a shared subscription is made."""
    topic = uid("shr")
    pub = clients.paho()
    pub.publish(topic, "retained", 1, retain=True)
    shared = clients.paho()
    shared.subscribe(f"$share/{uid('g')}/{topic}", 1)
    normal = clients.paho()
    normal.subscribe(topic, 1)
    assert normal.get().payload == b"retained"  # the retained message exists
    assert shared.drain(0.5) == []
    pub.publish(topic, "", 1, retain=True)


def test_shared_and_normal_subscription_of_one_client(clients: Clients) -> None:
    """4.8.2: a client with a shared and a non-shared matching subscription gets both."""
    topic = uid("shn")
    c = clients.paho()
    c.subscribe(topic, 1, sub_id=1)
    c.subscribe(f"$share/{uid('g')}/{topic}", 1, sub_id=2)
    clients.paho().publish(topic, "x", 1)
    got = [c.get(), c.get()]
    assert sorted(m.properties.SubscriptionIdentifier[0] for m in got) == [1, 2]
