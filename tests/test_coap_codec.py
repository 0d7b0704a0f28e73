"""The sans-I/O CoAP codec and deduplicator (rapidmq_edge.coap), checked against aiocoap's
independent message encoder/decoder and with hypothesis."""

from __future__ import annotations

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapidmq_edge.coap import codec
from rapidmq_edge.coap.dedup import PENDING, Deduplicator

options = st.lists(
    st.tuples(st.integers(0, 2000), st.binary(max_size=300)), max_size=8,
).map(lambda opts: tuple(sorted(opts, key=lambda o: o[0])))
ascii_options = st.lists(  # aiocoap decodes string options as UTF-8 and raises otherwise
    st.tuples(st.integers(0, 2000), st.text("abc/%-_.~XYZ019", max_size=300).map(str.encode)),
    max_size=8,
).map(lambda opts: tuple(sorted(opts, key=lambda o: o[0])))
messages = st.builds(
    codec.Message,
    mtype=st.integers(0, 3),
    code=st.integers(1, 255),
    mid=st.integers(0, 0xFFFF),
    token=st.binary(max_size=8),
    options=options,
    payload=st.binary(max_size=200),
)


@given(messages)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_serialize_parse_round_trip(msg: codec.Message) -> None:
    assert codec.parse(codec.serialize(msg)) == msg


@given(messages.map(lambda m: codec.Message(m.mtype, m.code, m.mid, m.token, (), m.payload)),
       ascii_options)
@settings(max_examples=200)
def test_aiocoap_decodes_what_we_encode(
    bare: codec.Message, opts: tuple[tuple[int, bytes], ...],
) -> None:
    msg = codec.Message(bare.mtype, bare.code, bare.mid, bare.token, opts, bare.payload)
    theirs = aiocoap.Message.decode(codec.serialize(msg))
    assert int(theirs.mtype) == msg.mtype and int(theirs.code) == msg.code
    assert theirs.mid == msg.mid and theirs.token == msg.token
    assert theirs.payload == msg.payload
    assert [(int(o.number), o.encode()) for o in theirs.opt.option_list()] == list(msg.options)


def test_we_decode_what_aiocoap_encodes() -> None:
    m = aiocoap.Message(code=Code.PUT, uri="coap://h/ps/data/a%2Fb/c", payload=b"x" * 300,
                        content_format=50)
    m.mtype, m.mid, m.token = aiocoap.CON, 0xBEEF, b"\x01\x02\x03"
    m.opt.block1 = aiocoap.optiontypes.BlockOption.BlockwiseTuple(3, True, 6)
    ours = codec.parse(m.encode())
    assert (ours.mtype, ours.code, ours.mid, ours.token) == (codec.CON, codec.PUT, 0xBEEF,
                                                            b"\x01\x02\x03")
    assert ours.option_values(codec.URI_PATH) == [b"ps", b"data", b"a/b", b"c"]
    assert codec.decode_uint(ours.option(codec.CONTENT_FORMAT) or b"") == 50
    assert ours.option(codec.BLOCK1) == bytes([0x3E])  # num 3, more, szx 6
    assert ours.payload == b"x" * 300


@pytest.mark.parametrize("data, why", [
    (b"", "header"), (b"\x40\x01\x00", "header"),
    (b"\x80\x01\x00\x01", "version"),
    (b"\x49\x01\x00\x01" + b"\x00" * 9, "token length"),
    (b"\x42\x01\x00\x01\x00", "token"),
    (b"\x40\x01\x00\x01\xf0", "delta 15"),
    (b"\x40\x01\x00\x01\x0f", "length 15"),
    (b"\x40\x01\x00\x01\xd0", "delta"),
    (b"\x40\x01\x00\x01\xe0\x01", "delta"),
    (b"\x40\x01\x00\x01\x0d", "length"),
    (b"\x40\x01\x00\x01\xb5ps", "past the end"),
    (b"\x40\x01\x00\x01\xff", "zero-length payload"),
    (b"\x40\x00\x00\x01\xff\x01", "Empty"),
    (b"\x41\x00\x00\x01\x07", "Empty"),
])
def test_message_format_errors(data: bytes, why: str) -> None:
    with pytest.raises(codec.MessageFormatError, match=why):
        codec.parse(data)


@given(st.binary(max_size=120))
@settings(max_examples=500)
def test_parse_never_fails_otherwise_and_agrees_with_aiocoap(data: bytes) -> None:
    """Any datagram either parses or raises MessageFormatError; what parses re-encodes to
    a message aiocoap reads the same way."""
    try:
        msg = codec.parse(data)
    except codec.MessageFormatError:
        return
    again = codec.parse(codec.serialize(msg))
    assert again == msg
    try:  # aiocoap raises on some well-formed messages (invalid UTF-8 in a string option)
        theirs = aiocoap.Message.decode(codec.serialize(msg))
    except Exception:  # noqa: BLE001 - the endpoint guards against exactly this
        return
    assert theirs.payload == msg.payload and theirs.mid == msg.mid


def test_reset_and_responses() -> None:
    assert codec.reset_for(b"\x40\x01\x12\x34\xf0") == b"\x70\x00\x12\x34"
    assert codec.reset_for(b"\x50\x01\x12\x34\xf0") is None, "malformed NON: dropped"
    assert codec.reset_for(b"\x40\x01") is None
    req = codec.Message(codec.CON, codec.PUT, 7, b"\xaa")
    ack = codec.parse(codec.response(req, codec.TOO_MANY_REQUESTS,
                                     ((codec.MAX_AGE, codec.encode_uint(2)),), b"busy"))
    assert (ack.mtype, ack.code, ack.mid, ack.token) == (codec.ACK, 157, 7, b"\xaa")
    assert ack.options == ((codec.MAX_AGE, b"\x02"),) and ack.payload == b"busy"
    non = codec.parse(codec.response(codec.Message(codec.NON, codec.POST, 7, b"\x01"),
                                     codec.CHANGED, mid=99))
    assert (non.mtype, non.mid, codec.code_str(non.code)) == (codec.NON, 99, "2.04")
    assert codec.encode_uint(0) == b"" and codec.encode_uint(256) == b"\x01\x00"


def test_deduplicator_caches_responses_and_expires() -> None:
    d = Deduplicator(max_entries=3, lifetime=10.0)
    assert d.check("a", 1, now=0.0) is None
    assert d.check("a", 1, now=1.0) == PENDING, "still being processed"
    d.answer("a", 1, b"resp")
    assert d.check("a", 1, now=2.0) == b"resp"
    assert d.check("b", 1, now=2.0) is None, "other remote, same id: a new message"
    assert d.check("a", 1, now=11.0) is None, "after the lifetime the id is new again"
    for mid in (2, 3, 4):
        d.check("c", mid, now=12.0)
    assert len(d) == 3, "bounded: the oldest are forgotten"
    assert d.expire(now=100.0) == 3 and len(d) == 0
