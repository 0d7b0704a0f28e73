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
from tests.malformed_corpus import CORPUS, connect_bytes

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
    kind = draw(st.sampled_from(["pub", "pub", "pub", "ack", "comp", "other", "raw"]))
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
@given(_streams())
def test_generated_streams_same_packets_and_errors(case: tuple[int, int, bytes, int]) -> None:
    level, max_size, data, chunk = case
    mqtt_framing.check_stream(data, level, max_size, chunk)
    mqtt_framing.check_stream(connect_bytes(level if level > 3 else 4) + data, 0, max_size,
                              chunk)
