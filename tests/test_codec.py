"""Property and example tests for the sans-I/O MQTT codec (``rapidmq_edge.mqtt.codec``).

Round trips go through :class:`PacketReader` (framing included): whole, split at every
position, in random chunks, and several packets back to back. The malformed corpus of
``tests/malformed_corpus.py`` must be refused by a bare reader, except the cases that need
connection state.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapidmq_edge.mqtt.codec import PacketReader, decode_packet, encode
from rapidmq_edge.mqtt.errors import (
    MalformedPacket,
    MqttError,
    PacketTooLarge,
    ProtocolError,
    UnsupportedProtocolVersion,
)
from rapidmq_edge.mqtt.packets import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    SubOptions,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
)
from rapidmq_edge.mqtt.properties import ALLOWED, PROPERTY_IDS, decode_varint, encode_varint

from .malformed_corpus import CORPUS, claimed_level, connect_bytes

SERVER_MAX_PACKET = 1_048_576  # the gateway's default [mqtt] max_packet_size
REJECTED = (MalformedPacket, ProtocolError, PacketTooLarge, UnsupportedProtocolVersion)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
texts = st.text(_chars, max_size=12)
binaries = st.binary(max_size=24)
packet_ids = st.integers(1, 65535)
u16 = st.integers(0, 65535)
u32 = st.integers(0, 2**32 - 1)
bits = st.integers(0, 1)
_level = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00/+#"), max_size=6
)
topic_names = st.lists(_level, min_size=1, max_size=4).map("/".join).filter(bool)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(_level, st.just("+")), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    filt = "/".join(levels)
    return filt or "+"


user_props = st.lists(st.tuples(texts, texts), min_size=1, max_size=3)
_VALUE: dict[str, st.SearchStrategy[Any]] = {
    "payload_format_indicator": bits,
    "message_expiry_interval": u32,
    "content_type": texts,
    "response_topic": topic_names,
    "correlation_data": binaries,
    "session_expiry_interval": u32,
    "assigned_client_identifier": texts,
    "server_keep_alive": u16,
    "authentication_method": texts,
    "authentication_data": binaries,
    "request_problem_information": bits,
    "will_delay_interval": u32,
    "request_response_information": bits,
    "response_information": texts,
    "server_reference": texts,
    "reason_string": texts,
    "receive_maximum": st.integers(1, 65535),
    "topic_alias_maximum": u16,
    "topic_alias": st.integers(1, 65535),
    "maximum_qos": bits,
    "retain_available": bits,
    "user_property": user_props,
    "maximum_packet_size": st.integers(1, 2**32 - 1),
    "wildcard_subscription_available": bits,
    "subscription_identifier_available": bits,
    "shared_subscription_available": bits,
    "subscription_identifier": st.integers(1, 268_435_455).map(lambda i: [i]),
}
# Which properties each packet may carry (MQTT 5.0 table 2-4), written out independently
# of rapidmq_edge.mqtt.properties.ALLOWED. PUBLISH leaves out the Subscription Identifier:
# the reader is the server's, and a client must not send it [MQTT-3.3.4-6].
_REASON_ONLY = ("reason_string", "user_property")
ALLOWED_BY_SPEC: dict[str, tuple[str, ...]] = {
    "connect": ("session_expiry_interval", "authentication_method", "authentication_data",
                "request_problem_information", "request_response_information",
                "receive_maximum", "topic_alias_maximum", "user_property",
                "maximum_packet_size"),
    "will": ("payload_format_indicator", "message_expiry_interval", "content_type",
             "response_topic", "correlation_data", "will_delay_interval", "user_property"),
    "connack": ("session_expiry_interval", "assigned_client_identifier", "server_keep_alive",
                "authentication_method", "authentication_data", "response_information",
                "server_reference", "reason_string", "receive_maximum", "topic_alias_maximum",
                "maximum_qos", "retain_available", "user_property", "maximum_packet_size",
                "wildcard_subscription_available", "subscription_identifier_available",
                "shared_subscription_available"),
    "publish": ("payload_format_indicator", "message_expiry_interval", "content_type",
                "response_topic", "correlation_data", "topic_alias", "user_property"),
    "ack": _REASON_ONLY,
    "subscribe": ("subscription_identifier", "user_property"),
    "suback": _REASON_ONLY,
    "unsubscribe": ("user_property",),
    "unsuback": _REASON_ONLY,
    "disconnect": ("session_expiry_interval", "server_reference", "reason_string",
                   "user_property"),
    "auth": ("authentication_method", "authentication_data", "reason_string",
             "user_property"),
}


def test_allowed_properties_match_the_spec_table() -> None:
    kinds: dict[int | str, str] = {
        1: "connect", "will": "will", 2: "connack", 3: "publish", 4: "ack", 5: "ack",
        6: "ack", 7: "ack", 8: "subscribe", 9: "suback", 10: "unsubscribe", 11: "unsuback",
        14: "disconnect", 15: "auth",
    }
    assert set(ALLOWED) == set(kinds)
    for ptype, kind in kinds.items():
        expected = {PROPERTY_IDS[name][0] for name in ALLOWED_BY_SPEC[kind]}
        if kind == "publish":
            expected.add(PROPERTY_IDS["subscription_identifier"][0])
        assert ALLOWED[ptype] == expected, kind


@st.composite
def properties(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(ALLOWED_BY_SPEC[kind]), unique=True, max_size=6))
    props = {name: draw(_VALUE[name]) for name in names}
    if "authentication_data" in props and kind == "connect":
        props.setdefault("authentication_method", draw(texts))
    return props


def _props(draw: st.DrawFn, version: int, kind: str) -> dict[str, Any]:
    return draw(properties(kind)) if version == 5 else {}


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    will = None
    if draw(st.booleans()):
        will = Will(draw(topic_names), draw(binaries), draw(st.integers(0, 2)),
                    draw(st.booleans()), _props(draw, version, "will"))
    username = draw(st.none() | texts)
    password = draw(st.none() | binaries)
    if version != 5 and username is None:
        password = None  # [MQTT-3.1.2-22]
    return Connect(
        version, draw(texts), draw(st.booleans()), draw(u16), will, username, password,
        _props(draw, version, "connect"), "MQIsdp" if version == 3 else "MQTT",
    )


_CONNACK_V5 = [0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C,
               0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F]
_ACK_CODES = {
    Puback: [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99],
    Pubrec: [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99],
    Pubrel: [0x00, 0x92],
    Pubcomp: [0x00, 0x92],
}
_SUBACK_V5 = [0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]
_UNSUBACK_V5 = [0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]
_DISCONNECT_V5 = [0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F,
                  0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D,
                  0x9E, 0x9F, 0xA0, 0xA1, 0xA2]


@st.composite
def connacks(draw: st.DrawFn, version: int) -> Connack:
    reason = draw(st.sampled_from(_CONNACK_V5 if version == 5 else [0, 1, 2, 3, 4, 5]))
    present = draw(st.booleans()) if reason == 0 else False
    return Connack(present, reason, _props(draw, version, "connack"))


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    qos = draw(st.integers(0, 2))
    props = _props(draw, version, "publish")
    topic = draw(topic_names)
    if "topic_alias" in props and draw(st.booleans()):
        topic = ""
    return Publish(
        topic, draw(binaries), qos, draw(st.booleans()), draw(st.booleans()) if qos else False,
        draw(packet_ids) if qos else 0, props,
    )


@st.composite
def acks(draw: st.DrawFn, version: int) -> Packet:
    cls: Any = draw(st.sampled_from([Puback, Pubrec, Pubrel, Pubcomp]))
    if version != 5:
        return cls(draw(packet_ids))
    return cls(draw(packet_ids), draw(st.sampled_from(_ACK_CODES[cls])),
               draw(properties("ack")))


@st.composite
def sub_options(draw: st.DrawFn, version: int) -> SubOptions:
    if version != 5:
        return SubOptions(draw(st.integers(0, 2)))
    return SubOptions(draw(st.integers(0, 2)), draw(st.booleans()), draw(st.booleans()),
                      draw(st.integers(0, 2)))


@st.composite
def subscribes(draw: st.DrawFn, version: int) -> Subscribe:
    topics = draw(st.lists(st.tuples(topic_filters(), sub_options(version)), min_size=1,
                           max_size=4))
    topics = [  # No Local on a shared subscription is a Protocol Error [MQTT-3.8.3-4]
        (f, SubOptions(o.qos, False, o.retain_as_published, o.retain_handling))
        if f.startswith("$share/") else (f, o)
        for f, o in topics
    ]
    return Subscribe(draw(packet_ids), topics, _props(draw, version, "subscribe"))


@st.composite
def subacks(draw: st.DrawFn, version: int) -> Suback:
    codes = st.sampled_from(_SUBACK_V5 if version == 5 else [0, 1, 2, 0x80])
    return Suback(draw(packet_ids), draw(st.lists(codes, min_size=1, max_size=5)),
                  _props(draw, version, "suback"))


@st.composite
def unsubscribes(draw: st.DrawFn, version: int) -> Unsubscribe:
    return Unsubscribe(draw(packet_ids), draw(st.lists(topic_filters(), min_size=1,
                                                       max_size=4)),
                       _props(draw, version, "unsubscribe"))


@st.composite
def unsubacks(draw: st.DrawFn, version: int) -> Unsuback:
    if version != 5:
        return Unsuback(draw(packet_ids))
    codes = draw(st.lists(st.sampled_from(_UNSUBACK_V5), min_size=1, max_size=5))
    return Unsuback(draw(packet_ids), codes, draw(properties("unsuback")))


@st.composite
def disconnects(draw: st.DrawFn, version: int) -> Disconnect:
    if version != 5:
        return Disconnect()
    return Disconnect(draw(st.sampled_from(_DISCONNECT_V5)), draw(properties("disconnect")))


@st.composite
def auths(draw: st.DrawFn) -> Auth:
    return Auth(draw(st.sampled_from([0x00, 0x18, 0x19])), draw(properties("auth")))


def after_connect(version: int) -> st.SearchStrategy[Packet]:
    """Any packet except CONNECT, valid for ``version``."""
    options: list[st.SearchStrategy[Any]] = [
        connacks(version), publishes(version), acks(version), subscribes(version),
        subacks(version), unsubscribes(version), unsubacks(version), disconnects(version),
        st.just(Pingreq()), st.just(Pingresp()),
    ]
    if version == 5:
        options.append(auths())
    return st.one_of(options)


VERSIONS = [4, 5]

# --------------------------------------------------------------------------- helpers


def reader_for(version: int) -> PacketReader:
    return PacketReader(version=version)


def feed_chunks(reader: PacketReader, data: bytes, cuts: list[int]) -> list[Packet]:
    out: list[Packet] = []
    prev = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += reader.feed(data[prev:cut])
        prev = cut
    assert reader.error is None
    assert reader.buffered == 0
    return out


def decode_one(data: bytes, version: int) -> Packet:
    packets = reader_for(version).feed(data)
    assert len(packets) == 1
    return packets[0]


def assert_split_everywhere(data: bytes, version: int, expected: list[Packet]) -> None:
    for i in range(len(data) + 1):
        r = reader_for(version)
        assert r.feed(data[:i]) + r.feed(data[i:]) == expected, f"split at {i}"


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("version", [3, 4, 5])
@FAST
@given(data=st.data())
def test_connect_round_trip(version: int, data: st.DataObject) -> None:
    p = data.draw(connects(version))
    raw = encode(p, version)
    assert decode_one(raw, 0) == p
    assert decode_packet(raw[0], raw[len(raw) - _body_len(raw):], 0) == p
    assert_split_everywhere(raw, 0, [p])


def _body_len(raw: bytes) -> int:
    length, pos = decode_varint(raw, 1, len(raw))
    assert pos + length == len(raw)
    return length


@pytest.mark.parametrize("version", VERSIONS)
@FAST
@given(data=st.data())
def test_packet_round_trip(version: int, data: st.DataObject) -> None:
    p = data.draw(after_connect(version))
    raw = encode(p, version)
    assert decode_one(raw, version) == p
    assert encode(decode_one(raw, version), version) == raw
    assert_split_everywhere(raw, version, [p])


@pytest.mark.parametrize(
    ("name", "strategy"),
    [
        ("publish", publishes), ("ack", acks), ("subscribe", subscribes),
        ("unsubscribe", unsubscribes), ("suback", subacks), ("unsuback", unsubacks),
        ("connack", connacks), ("disconnect", disconnects),
    ],
)
@pytest.mark.parametrize("version", VERSIONS)
@FAST
@given(data=st.data())
def test_each_packet_type_round_trip(
    version: int, name: str, strategy: Any, data: st.DataObject
) -> None:
    p = data.draw(strategy(version))
    assert decode_one(encode(p, version), version) == p


@FAST
@given(p=auths())
def test_auth_round_trip(p: Auth) -> None:
    raw = encode(p, 5)
    assert decode_one(raw, 5) == p
    assert_split_everywhere(raw, 5, [p])


@pytest.mark.parametrize("version", [3, 4, 5])
@FAST
@given(data=st.data())
def test_stream_random_chunks(version: int, data: st.DataObject) -> None:
    """CONNECT then several packets, concatenated and fed in random chunks."""
    connect = data.draw(connects(version))
    rest = data.draw(st.lists(after_connect(4 if version == 3 else version), max_size=6))
    stream = encode(connect, version) + b"".join(encode(p, version) for p in rest)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    reader = reader_for(0)
    assert feed_chunks(reader, stream, cuts) == [connect, *rest]
    assert reader.version == version


@pytest.mark.parametrize("version", VERSIONS)
@FAST
@given(data=st.data())
def test_concatenated_byte_by_byte(version: int, data: st.DataObject) -> None:
    packets = data.draw(st.lists(after_connect(version), min_size=2, max_size=5))
    stream = b"".join(encode(p, version) for p in packets)
    reader = reader_for(version)
    out: list[Packet] = []
    for i in range(len(stream)):
        out += reader.feed(stream[i:i + 1])
    assert out == packets
    assert reader_for(version).feed(stream) == packets


@FAST
@given(value=st.integers(0, 268_435_455))
def test_varint_round_trip(value: int) -> None:
    raw = encode_varint(value)
    assert decode_varint(raw, 0, len(raw)) == (value, len(raw))


# --------------------------------------------------------------------------- examples

VARINT_BOUNDARIES = [
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"),
    (2097151, b"\xff\xff\x7f"),
    (2097152, b"\x80\x80\x80\x01"),
    (268435455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize(("value", "raw"), VARINT_BOUNDARIES)
def test_varint_boundaries(value: int, raw: bytes) -> None:
    assert encode_varint(value) == raw
    assert decode_varint(raw, 0, len(raw)) == (value, len(raw))


def test_varint_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_varint(268_435_456)
    with pytest.raises(MalformedPacket):
        decode_varint(b"\x80\x80\x80\x80\x01", 0, 5)
    with pytest.raises(MalformedPacket):
        decode_varint(b"\x80\x80", 0, 2)  # runs past the end
    with pytest.raises(MalformedPacket):
        decode_varint(b"\x80\x00", 0, 2)  # not minimal [MQTT-1.5.5-1]


@pytest.mark.parametrize("value", [v for v, _ in VARINT_BOUNDARIES if v <= 2_097_152])
@pytest.mark.parametrize("version", VERSIONS)
def test_remaining_length_boundaries_through_reader(version: int, value: int) -> None:
    """A PUBLISH whose Remaining Length is exactly ``value`` (0 is too short for PUBLISH)."""
    if value == 0:
        with pytest.raises(MalformedPacket):
            reader_for(version).feed(b"\x30\x00")
        return
    head = b"\x00\x01t" + (b"\x00" if version == 5 else b"")
    if value < len(head):
        return
    p = Publish("t", b"\xaa" * (value - len(head)))
    raw = encode(p, version)
    assert raw[1:1 + len(encode_varint(value))] == encode_varint(value)
    reader = reader_for(version)
    assert reader.feed(raw[:-1]) == []
    assert reader.feed(raw[-1:]) == [p]


def test_remaining_length_of_five_bytes_rejected() -> None:
    reader = reader_for(4)
    assert reader.feed(b"\x30\xff\xff\xff") == []  # could still be a 4 byte length
    with pytest.raises(MalformedPacket):
        reader.feed(b"\xff")


def test_max_packet_size_enforced_on_the_header() -> None:
    # 1 + 2 + 128 = 131 bytes declared; rejected before any of the body arrives.
    with pytest.raises(PacketTooLarge):
        PacketReader(max_packet_size=130, version=4).feed(b"\x30\x80\x01")
    # The header byte by byte: rejected as soon as the length is complete.
    reader = PacketReader(max_packet_size=130, version=4)
    assert reader.feed(b"\x30") == []
    assert reader.feed(b"\x80") == []
    with pytest.raises(PacketTooLarge):
        reader.feed(b"\x01")
    # Exactly at the limit is fine.
    p = Publish("t", b"x" * 125)
    raw = encode(p, 4)
    assert len(raw) == 131
    assert PacketReader(max_packet_size=131, version=4).feed(raw) == [p]
    with pytest.raises(PacketTooLarge):
        PacketReader(max_packet_size=130, version=4).feed(raw)
    # The largest Remaining Length, against the default maximum: just buffered.
    reader = PacketReader(version=4)
    assert reader.feed(b"\x30\xff\xff\xff\x7f") == []
    with pytest.raises(PacketTooLarge):
        PacketReader(max_packet_size=SERVER_MAX_PACKET, version=4).feed(b"\x30\xff\xff\xff\x7f")


def test_remaining_length_must_be_minimal_in_v5() -> None:
    with pytest.raises(MalformedPacket):
        reader_for(5).feed(b"\xc0\x80\x00")  # PINGREQ, length 0 in two bytes
    assert reader_for(5).feed(b"\xc0\x00") == [Pingreq()]


def test_v311_unsuback_has_no_reason_codes() -> None:
    assert encode(Unsuback(5, [0x11, 0x00]), 4) == b"\xb0\x02\x00\x05"
    assert decode_one(b"\xb0\x02\x00\x05", 4) == Unsuback(5)
    with pytest.raises(MalformedPacket):
        reader_for(4).feed(b"\xb0\x03\x00\x05\x00")
    assert decode_one(b"\xb0\x05\x00\x05\x00\x11\x00", 5) == Unsuback(5, [0x11, 0x00])


def test_spec_examples() -> None:
    # 3.1.1 CONNECT, clean session, keep alive 60, client id "c".
    raw = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01c"
    assert decode_one(raw, 0) == Connect(4, "c", True, 60)
    assert encode(Connect(4, "c", True, 60), 4) == raw
    # MQIsdp 3.1
    raw31 = b"\x10\x0f\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01c"
    assert decode_one(raw31, 0) == Connect(3, "c", True, 60, protocol_name="MQIsdp")
    # 5.0 CONNECT with Session Expiry Interval 10.
    raw5 = b"\x10\x13\x00\x04MQTT\x05\x02\x00\x3c\x05\x11\x00\x00\x00\x0a\x00\x01c"
    assert decode_one(raw5, 0) == Connect(5, "c", True, 60,
                                          properties={"session_expiry_interval": 10})
    # 3.1.1 CONNACK
    assert encode(Connack(True, 0), 4) == b"\x20\x02\x01\x00"
    assert decode_one(b"\x20\x03\x00\x00\x00", 5) == Connack()
    # 5.0 acknowledgements may leave out the Reason Code and the properties.
    assert decode_one(b"\x40\x02\x00\x07", 5) == Puback(7)
    assert decode_one(b"\x40\x03\x00\x07\x10", 5) == Puback(7, 0x10)
    assert decode_one(b"\x62\x04\x00\x07\x92\x00", 5) == Pubrel(7, 0x92)
    assert encode(Puback(7), 5) == b"\x40\x02\x00\x07"
    # 5.0 DISCONNECT with Remaining Length 0 means reason 0x00.
    assert decode_one(b"\xe0\x00", 5) == Disconnect()
    assert decode_one(b"\xe0\x01\x8e", 5) == Disconnect(0x8E)
    assert encode(Disconnect(), 4) == b"\xe0\x00"
    # 5.0 AUTH with Remaining Length 0 means reason 0x00, no properties.
    assert decode_one(b"\xf0\x00", 5) == Auth()
    # PINGREQ / PINGRESP
    assert encode(Pingreq(), 4) == b"\xc0\x00"
    assert encode(Pingresp(), 5) == b"\xd0\x00"
    # PUBLISH QoS 1 with Topic Alias and an empty topic (5.0).
    raw_pub = b"\x32\x0a\x00\x00\x00\x0a\x03\x23\x00\x02hi"
    assert decode_one(raw_pub, 5) == Publish("", b"hi", 1, False, False, 10, {"topic_alias": 2})
    # SUBSCRIBE 5.0 options: QoS 1, No Local, Retain As Published, Retain Handling 2.
    raw_sub = b"\x82\x08\x00\x01\x00\x00\x02a/\x2d"
    assert decode_one(raw_sub, 5) == Subscribe(1, [("a/", SubOptions(1, True, True, 2))])


def test_user_properties_keep_order_and_duplicates() -> None:
    p = Publish("t", properties={"user_property": [("a", "1"), ("a", "2"), ("b", "")]})
    assert decode_one(encode(p, 5), 5) == p


def test_good_packets_before_an_error_are_returned() -> None:
    reader = reader_for(4)
    good = encode(Publish("a", b"1"), 4)
    out = reader.feed(good + good + b"\x00\x00")
    assert out == [Publish("a", b"1"), Publish("a", b"1")]
    assert isinstance(reader.error, MalformedPacket)
    with pytest.raises(MalformedPacket):
        reader.feed(b"")


def test_qos0_publish_keeps_its_raw_bytes() -> None:
    raw = encode(Publish("a/b", b"payload"), 5)
    p = decode_one(raw, 5)
    assert isinstance(p, Publish)
    assert p.raw == raw


def test_response_topic_must_be_a_topic_name() -> None:
    bad = Publish("t", properties={"response_topic": "r/#"})
    with pytest.raises(ProtocolError):
        reader_for(5).feed(encode(bad, 5))


def test_first_packet_must_be_connect() -> None:
    for p in (Pingreq(), Publish("a"), Puback(1), Subscribe(1, [("a", SubOptions())])):
        with pytest.raises(ProtocolError):
            PacketReader().feed(encode(p, 4))


# --------------------------------------------------------------------------- the corpus


def test_corpus_size_and_names() -> None:
    names = [c[0] for c in CORPUS]
    assert len(names) == len(set(names))
    v311 = sum(1 for _, v, d, _ in CORPUS if v == 4 or (v == 0 and claimed_level(d) == 4))
    v5 = sum(1 for _, v, d, _ in CORPUS if v == 5 or (v == 0 and claimed_level(d) == 5))
    assert v311 >= 45
    assert v5 >= 45


def codec_verdict(version: int, data: bytes) -> tuple[list[Packet], Exception | None]:
    """Feed a valid CONNECT of ``version`` (unless 0), then ``data``, to a server reader."""
    reader = PacketReader(max_packet_size=SERVER_MAX_PACKET)
    if version:
        assert len(reader.feed(connect_bytes(version))) == 1
    try:
        packets = reader.feed(data)
    except MqttError as exc:
        return [], exc
    return packets, reader.error


@pytest.mark.parametrize(
    ("name", "version", "data", "needs_server"), CORPUS, ids=[c[0] for c in CORPUS]
)
def test_corpus_rejected_by_codec(name: str, version: int, data: bytes, needs_server: bool) -> None:
    packets, err = codec_verdict(version, data)
    if needs_server:
        assert err is None, f"decoder rejects a case marked needs_server: {err!r}"
        assert packets, "needs_server case decoded to nothing"
    else:
        assert isinstance(err, REJECTED), f"accepted: {packets!r}"


@pytest.mark.parametrize(
    ("name", "version", "data"),
    [(n, v, d) for n, v, d, ns in CORPUS if not ns and len(d) < 200],
    ids=[n for n, v, d, ns in CORPUS if not ns and len(d) < 200],
)
def test_corpus_rejected_when_fed_byte_by_byte(name: str, version: int, data: bytes) -> None:
    reader = PacketReader(max_packet_size=SERVER_MAX_PACKET)
    if version:
        reader.feed(connect_bytes(version))
    with pytest.raises(REJECTED):
        for i in range(len(data)):
            reader.feed(data[i:i + 1])
        if reader.error is not None:
            raise reader.error


def test_reason_codes_are_described_in_words_for_logs() -> None:
    from rapidmq_edge.mqtt import reasons as rc

    assert rc.describe(rc.BAD_USER_NAME_OR_PASSWORD) == "bad user name or password (0x86)"
    assert rc.describe(rc.CONNECTION_RATE_EXCEEDED) == "connection rate exceeded (0x9f)"
    assert rc.describe(0xFF) == "reason 0xff"  # not a reason code
