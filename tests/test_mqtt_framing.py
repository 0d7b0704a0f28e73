"""The C fast lane of the MQTT reader (``mqtt/_framing.c``) reads exactly what the Python
codec reads: the same packets (raw bytes included), the same errors, the same leftover.

Both readers run over the malformed-packet corpus (behind a PUBLISH the lane decodes, so it
is active when the bad frame arrives), over hypothesis-generated packet streams with
mutations, and fed whole, byte by byte and in chunks (``fuzz/mqtt_framing.py`` does the
comparison; its corpus is replayed by ``tests/test_fuzz_corpus.py``). ``make test`` builds
the extension: a silently skipped build would make these checks meaningless, hence the
first test.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import mqtt_framing
from rapidmq_edge.mqtt import codec, framing
from rapidmq_edge.mqtt.codec import PacketReader, encode
from rapidmq_edge.mqtt.packets import (
    Connect,
    Disconnect,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    SubOptions,
    Subscribe,
)
from rapidmq_edge.mqtt.properties import encode_properties, encode_varint
from tests.malformed_corpus import CORPUS, connect_bytes, connect_raw

CHUNKS = (0, 1, 2, 5, 64)


def test_the_extension_is_built_and_in_use() -> None:
    assert framing.SCAN is not None, "rapidmq_edge/mqtt/_framing.c was not built (gcc?)"
    assert mqtt_framing.ACCELERATED
    assert PacketReader(version=4)._scan is framing.SCAN
    assert PacketReader(version=4, accelerated=False)._scan is None


def test_the_lane_decodes_publish_and_acks_without_the_python_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run of PUBLISH / PUBACK / PUBCOMP never reaches the Python decoder (the lane is
    really used), and gives what the Python codec gives."""
    packets = [Publish("a/b", b"x" * 300), Publish("a/b", b"", 1, True, False, 9),
               Publish("caf\u00e9", b"y", 2, False, True, 65535), Puback(4), Pubcomp(5)]
    for level in (3, 4, 5):
        data = b"".join(encode(p, level) for p in packets)
        expected = PacketReader(version=level, accelerated=False).feed(data)

        def refuse(*args: object) -> None:
            raise AssertionError("the Python decoder was called")

        with monkeypatch.context() as m:
            m.setattr(codec, "_decode_publish", refuse)
            m.setattr(codec, "decode_packet", refuse)
            got = PacketReader(version=level).feed(data)
        assert got == expected == packets
        assert got[0].raw == encode(packets[0], level)  # type: ignore[union-attr]
        assert [getattr(p, "raw", None) for p in got[1:]] == [None] * 4


def test_the_lane_decodes_connect_and_subscribe_without_the_python_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection's first read (CONNECT + SUBSCRIBE, as a client sends them before its
    CONNACK) never reaches the Python decoder: the same packets, the same level."""
    for level in (4, 5):
        connects = [Connect(level, "c\u00e9-1", True, 600),
                    Connect(level, "", False, 0, None, "u", b"p\x00w"),
                    Connect(level, "x" * 300, True, 65535, None, "\u4e2d")]
        subscribe = Subscribe(1, [("bench/storm/1", SubOptions(0)), ("a/+/#", SubOptions(2)),
                                  ("$share/g/t", SubOptions(1)), ("", SubOptions(0))])
        if level == 5:
            subscribe.topics.append(("n/l", SubOptions(1, True, True, 2)))
        for connect in connects:
            data = (encode(connect, level) + encode(subscribe, level)
                    + encode(Publish("a/b", b"x", 1, False, False, 2), level))
            python = PacketReader(accelerated=False)
            expected = python.feed(data)

            def refuse(*args: object) -> None:
                raise AssertionError("the Python decoder was called")

            with monkeypatch.context() as m:
                m.setattr(codec, "_decode_publish", refuse)
                m.setattr(codec, "decode_packet", refuse)
                reader = PacketReader()
                got = reader.feed(data)
            assert got == expected == [connect, subscribe, expected[2]]
            assert reader.version == python.version == level
            for chunk in CHUNKS:
                mqtt_framing.check_stream(data, 0, chunk=chunk)


@pytest.mark.parametrize("level", [4, 5])
def test_connect_and_subscribe_the_lane_declines_are_the_codecs(level: int) -> None:
    """Each CONNECT / SUBSCRIBE form the lane leaves to the Python codec (a Will, MQTT 3.1,
    properties, a password without a user name, reserved bits, No Local on a shared
    subscription, ...) or that breaks a rule reads the same, whole and in chunks."""
    v5 = level == 5
    e = b"\x00" if v5 else b""

    def s(text: bytes) -> bytes:
        return len(text).to_bytes(2, "big") + text

    def frame(first: int, body: bytes) -> bytes:
        return bytes((first,)) + encode_varint(len(body)) + body

    connects = [
        connect_bytes(level), connect_bytes(3), connect_bytes(level, "", 0),
        connect_raw(level, 0x06, s(b"w") + (e + s(b"will/t") + s(b"bye"))),  # a Will
        connect_raw(level, 0x40, s(b"c") + s(b"pw")),  # a password without a user name
        connect_raw(level, 0x82, s(b"c") + s(b"u\x00")),  # U+0000 in the user name
        connect_raw(level, 0xC2, s(b"c") + s(b"u") + b"\x00\x05pw"),  # password past the end
        connect_raw(level, 0x03, s(b"c")),  # reserved flag
        connect_raw(level, 0x12, s(b"c")),  # Will QoS without the Will flag
        connect_raw(level, 0x02, s(b"\xc3")),  # ill-formed UTF-8 client id
        connect_raw(level, 0x02, s(b"c") + b"x"),  # a byte after the payload
        connect_raw(level, 0x02, s(b"c"), first=0x11),  # fixed header flags
    ]
    if v5:
        props = encode_properties({"session_expiry_interval": 30})
        connects.append(b"\x10" + encode_varint(13 + len(props)) + b"\x00\x04MQTT\x05\x02"
                        b"\x00\x3c" + props + s(b"c"))
    subscribes = [
        frame(0x82, b"\x00\x07" + e + s(b"a/b") + b"\x01" + s(b"c/#") + b"\x02"),
        frame(0x82, b"\x00\x07" + e + s(b"a/b") + b"\x03"),  # QoS 3
        frame(0x82, b"\x00\x07" + e + s(b"a/b") + b"\x40"),  # reserved bits
        frame(0x82, b"\x00\x07" + e + s(b"a/b") + b"\x30"),  # (5.0) retain handling 3
        frame(0x82, b"\x00\x07" + e + s(b"$share/g/a") + b"\x04"),  # No Local + $share
        frame(0x82, b"\x00\x07" + e + s(b"$shar/g/a") + b"\x04"),
        frame(0x82, b"\x00\x07" + e + s(b"a/b")),  # options byte missing
        frame(0x82, b"\x00\x07" + e),  # no filter
        frame(0x82, b"\x00\x00" + e + s(b"a") + b"\x00"),  # packet id 0
        frame(0x82, b"\x00\x07" + e + s(b"a\x00") + b"\x00"),  # U+0000
        frame(0x82, b"\x00\x07" + e + s(b"\xed\xa0\x80") + b"\x00"),  # a surrogate
        frame(0x82, b"\x00\x07" + e + b"\x00\x09ab\x00"),  # filter past the end
        frame(0x80, b"\x00\x07" + e + s(b"a") + b"\x00"),  # fixed header flags
        frame(0x82, b"\x00"),  # half a packet id
    ]
    if v5:
        subscribes += [frame(0x82, b"\x00\x07" + encode_properties(
            {"subscription_identifier": [3]}) + s(b"a") + b"\x00"),
            frame(0x82, b"\x00\x07\x05" + s(b"a") + b"\x00")]  # properties past the end
    tail = encode(Publish("t", b"x"), level)
    compared = 0
    for connect in connects:
        for sub in subscribes:
            for chunk in (0, 1, 7):
                mqtt_framing.check_stream(connect + sub + tail, 0, chunk=chunk)
                mqtt_framing.check_stream(connect + sub + tail, 0, 40, chunk=chunk)
                compared += 2
    assert compared > 600


def test_same_topic_same_string_object() -> None:
    reader = PacketReader(version=4)
    got = reader.feed(encode(Publish("s/1", b"a"), 4) + encode(Publish("s/1", b"b"), 4))
    again = reader.feed(encode(Publish("s/1", b"c"), 4))
    assert got[0].topic is got[1].topic is again[0].topic  # type: ignore[union-attr]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_malformed_corpus_same_packets_and_errors(chunk: int) -> None:
    compared = 0
    for _name, version, data, _ in CORPUS:
        if version == 0:
            streams = [(0, data)]
        else:
            lead = encode(Publish("lead/in", b"x"), version)
            streams = [(0, connect_bytes(version) + lead + data), (version, lead + data),
                       (version, data + lead)]
        for level, stream in streams:
            mqtt_framing.check_stream(stream, level, chunk=chunk)
            mqtt_framing.check_stream(stream, level, 64, chunk=chunk)
            compared += 1
    assert compared > 300


def test_a_difference_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison fails when the two readers differ (here: a Python decoder that
    drops the retain flag; the C lane keeps it)."""
    data = encode(Publish("a", b"x", 1, True, False, 1), 4)
    mqtt_framing.check_stream(data, 4)
    real = codec._decode_publish

    def lossy(*args: object) -> Publish:
        p = real(*args)  # type: ignore[arg-type]
        p.retain = False
        return p

    monkeypatch.setattr(codec, "_decode_publish", lossy)
    with pytest.raises(AssertionError, match="packets"):
        mqtt_framing.check_stream(data, 4)


# --------------------------------------------------------------------------- hypothesis

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_topics = st.one_of(
    st.sampled_from(["a/b", "a/b", "s", "caf\u00e9/\u4e2d", "a/+", "#", "a\x00b", ""]), _text)
_pids = st.integers(0, 65535)


@st.composite
def _packet_bytes(draw: st.DrawFn, level: int) -> bytes:
    kind = draw(st.sampled_from(["pub", "pub", "pub", "ack", "comp", "sub", "other", "raw"]))
    if kind == "sub":  # filters of any text, any option byte, sometimes properties
        body = draw(_pids).to_bytes(2, "big")
        if level == 5:
            body += encode_properties(draw(st.sampled_from(
                [{}, {}, {"subscription_identifier": [7]}, {"user_property": [("k", "v")]}])))
        for _ in range(draw(st.integers(0, 3))):
            filt = draw(st.one_of(_topics, st.sampled_from(["$share/g/a", "$share/"]))).encode()
            body += len(filt).to_bytes(2, "big") + filt
            body += bytes((draw(st.one_of(st.integers(0, 2), st.integers(0, 255))),))
        first = 0x82 if draw(st.integers(0, 9)) else 0x80 | draw(st.integers(0, 15))
        return bytes((first,)) + encode_varint(len(body)) + body
    if kind == "pub":
        qos = draw(st.integers(0, 2))
        props = {}
        if level == 5 and draw(st.booleans()):
            props = draw(st.sampled_from([{"topic_alias": 1}, {"content_type": "c"},
                                          {"message_expiry_interval": 5}]))
        topic = draw(_topics).encode()
        pid = draw(_pids) if qos else 0
        payload = draw(st.binary(max_size=300))
        body = len(topic).to_bytes(2, "big") + topic
        if qos:
            body += pid.to_bytes(2, "big")
        if level == 5:
            body += encode_properties(props)
        flags = draw(st.integers(0, 15)) if draw(st.integers(0, 9)) == 0 else (
            qos << 1 | draw(st.integers(0, 1)) | (8 if qos and draw(st.booleans()) else 0))
        return bytes((0x30 | flags,)) + encode_varint(len(body + payload)) + body + payload
    if kind in ("ack", "comp"):
        cls = Puback if kind == "ack" else Pubcomp
        if draw(st.booleans()):
            return encode(cls(draw(st.integers(1, 65535))), level)
        first = (0x40 if kind == "ack" else 0x70) | draw(st.integers(0, 1))
        return bytes((first,)) + draw(st.binary(min_size=1, max_size=5))
    if kind == "other":
        return encode(draw(st.sampled_from([
            Pingreq(), Pubrec(3), Pubrel(4), Disconnect(),
            Subscribe(5, [("a/#", SubOptions(1))])])), level)
    return draw(st.binary(max_size=8))


@st.composite
def _connect(draw: st.DrawFn, level: int) -> bytes:
    """A CONNECT for ``level``: mostly one the lane reads, else any flags, a Will, properties."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(2, "big") + raw

    flags = draw(st.sampled_from([0x02, 0x00, 0x82, 0xC2, 0xC0]) if draw(st.integers(0, 3))
                 else st.integers(0, 255))
    payload = s(draw(_text))
    if flags & 0x04:
        payload += (b"\x00" if level == 5 else b"") + s(draw(_topics)) + s("w")
    if flags & 0x80:
        payload += s(draw(_text))
    if flags & 0x40:
        payload += s(draw(_text))
    props = None
    if level == 5 and not draw(st.integers(0, 4)):
        props = encode_properties({"session_expiry_interval": 9})
    return connect_raw(level, flags, payload + draw(st.sampled_from([b"", b"", b"\x00"])), props,
                       keep_alive=draw(st.integers(0, 65535)))


@st.composite
def _streams(draw: st.DrawFn) -> tuple[int, int, bytes, int]:
    level = draw(st.sampled_from([3, 4, 5]))
    parts = draw(st.lists(_packet_bytes(level), max_size=12))
    data = b"".join(parts)
    if data and draw(st.integers(0, 3)) == 0:  # flip a byte
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes((draw(st.integers(0, 255)),)) + data[at + 1:]
    max_size = draw(st.sampled_from([268_435_460, 64, 200]))
    return level, max_size, data, draw(st.sampled_from(CHUNKS))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_streams(), st.data())
def test_generated_streams_same_packets_and_errors(case: tuple[int, int, bytes, int],
                                                   data_: st.DataObject) -> None:
    level, max_size, data, chunk = case
    mqtt_framing.check_stream(data, level, max_size, chunk)
    mqtt_framing.check_stream(connect_bytes(level if level > 3 else 4) + data, 0, max_size,
                              chunk)
    connect = data_.draw(_connect(5 if level == 5 else 4))
    mqtt_framing.check_stream(connect + data, 0, max_size, chunk)
