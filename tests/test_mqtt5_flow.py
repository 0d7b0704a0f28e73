"""MQTT 5.0 against the real gateway: Receive Maximum flow control (both directions) and
Maximum Packet Size (both directions). References are to the OASIS MQTT 5.0 specification.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .gateway_proc import GatewayProcess
from .mqtt5_helpers import (
    DISCONNECT,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    Clients,
    ack_packet,
    props,
    publish_packet,
    uid,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Receive Maximum 3 and Maximum Packet Size 1024 towards the broker."""
    g = GatewayProcess(
        tmp_path_factory.mktemp("gw-mqtt5-flow"),
        {"mqtt": {"receive_maximum": 3, "max_packet_size": 1024}},
    ).start()
    yield g
    g.stop()


@pytest.fixture
def clients(gw: GatewayProcess) -> Iterator[Clients]:
    c = Clients(gw.port)
    yield c
    c.close_all()


def test_client_receive_maximum_limits_unacknowledged_publishes(clients: Clients) -> None:
    """3.3.4 [MQTT-3.3.4-9]: the server sends no more QoS 1 PUBLISHes than the client's
    Receive Maximum (2) until PUBACKs arrive; then the rest, in order."""
    topic = uid("rm")
    c = clients.raw(uid("rm"), properties=props(receive_maximum=2))
    c.subscribe([(topic, 1)])
    pub = clients.paho()
    for i in range(5):
        assert pub.publish(topic, str(i), 1) == 0
    first = c.recv_all(0.7)
    assert [p.type for p in first] == [PUBLISH, PUBLISH], first
    assert [p.payload for p in first] == [b"0", b"1"]
    c.send(ack_packet(PUBACK, first[0].packet_id))
    more = c.recv_all(0.5)
    assert [p.payload for p in more] == [b"2"], "one PUBACK frees exactly one slot"
    for p in (first[1], more[0]):
        c.send(ack_packet(PUBACK, p.packet_id))
    rest = c.recv_all(0.5)
    assert [p.payload for p in rest] == [b"3", b"4"]
    for p in rest:
        c.send(ack_packet(PUBACK, p.packet_id))


def test_server_receive_maximum_exceeded_disconnects_0x93(clients: Clients) -> None:
    """3.2.2.3.3 / 4.9: more unacknowledged QoS 2 PUBLISHes than the server's Receive
    Maximum (3, announced in CONNACK) → DISCONNECT 0x93. PUBREL/PUBCOMP frees a slot."""
    c = clients.raw()
    ack = c.connect(uid("srm"))
    assert ack.properties.get("receive_maximum") == 3
    topic = uid("srm")
    for pid in (1, 2, 3):
        c.send(publish_packet(topic, b"x", 2, pid))
        assert c.expect(PUBREC).packet_id == pid
    c.send(ack_packet(PUBREL, 1))
    assert c.expect(PUBCOMP).packet_id == 1
    c.send(publish_packet(topic, b"x", 2, 4))  # 2, 3, 4 unacknowledged: allowed
    assert c.expect(PUBREC).packet_id == 4
    c.send(publish_packet(topic, b"x", 2, 5))  # the 4th: too many
    d = c.expect(DISCONNECT)
    assert d.reason == 0x93, d
    assert c.closed_by_server(2.0)


def test_client_maximum_packet_size_drops_larger_messages(clients: Clients) -> None:
    """3.1.2.11.4 [MQTT-3.1.2-24/25]: a message larger than the client's Maximum Packet
    Size is not sent to it (others still get it); smaller ones are."""
    topic = uid("mps")
    small = clients.raw(uid("mps"), properties=props(maximum_packet_size=128))
    small.subscribe([(topic, 1)])
    big_ok = clients.paho()
    big_ok.subscribe(topic, 1)
    pub = clients.paho()
    pub.publish(topic, "a", 1)
    pub.publish(topic, b"B" * 300, 1)
    pub.publish(topic, "c", 0)
    pub.publish(topic, b"D" * 300, 0)
    pub.publish(topic, "e", 1)
    got = []
    for p in small.recv_all(1.0):
        assert p.type == PUBLISH
        assert len(p.raw) <= 128
        got.append(p.payload)
        if p.qos:
            small.send(ack_packet(PUBACK, p.packet_id))
    assert got == [b"a", b"c", b"e"]
    assert [m.payload for m in big_ok.drain(1.0)] == [
        b"a", b"B" * 300, b"c", b"D" * 300, b"e",
    ]


def test_packet_above_server_maximum_packet_size(clients: Clients) -> None:
    """3.2.2.3.6 / 4.13: a packet above the server's Maximum Packet Size (1024, announced
    in CONNACK) → DISCONNECT 0x95 (or just close); smaller packets are accepted."""
    c = clients.raw()
    assert c.connect(uid("smps")).properties.get("maximum_packet_size") == 1024
    topic = uid("smps")
    c.send(publish_packet(topic, b"x" * 900, 1, 1))
    assert c.expect(PUBACK).packet_id == 1
    c.send(publish_packet(topic, b"x" * 2000, 1, 2))
    p = c.recv(3.0)
    if p is not None:
        assert p.type == DISCONNECT and p.reason == 0x95, p
    assert c.closed_by_server(2.0)
