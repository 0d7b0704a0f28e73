"""Fuzz the CoAP codec (RFC 7252 messages), the publish-subscribe vocabulary (topic
parameters in CBOR) and the deduplicator.

Input: one mode byte (``byte % 3``), then the bytes under test.

* mode 0, a datagram: :func:`~rapidmq_edge.coap.codec.parse` raises only
  ``MessageFormatError``; a parsed message serializes back to exactly the same bytes (the
  encoding is canonical) and parses again to an equal message; ``reset_for`` answers every
  malformed confirmable datagram with an RST of its message id; a request's response
  serializes and parses.
* mode 1, a CBOR payload of topic parameters, as in a create (POST), FETCH of a topic
  resource or FETCH of the collection: ``parse_parameters``, ``topic_configuration``,
  ``conf_part`` and ``has_all`` raise only ``ParameterError``; an accepted configuration has
  a text topic name, a known content format that maps back to the same number, and a
  representation whose parts ``conf_part`` selects.
* mode 2, a script for a :class:`~rapidmq_edge.coap.dedup.Deduplicator` (8 entries):
  never more than 8 entries; a message seen again within its lifetime is answered with the
  cached response (or PENDING), never processed twice.
"""

from __future__ import annotations

import sys

from fuzz._harness import fuzz_main, instrumented

with instrumented(__name__ == "__main__"):
    from rapidmq_edge.coap import codec, dedup, pubsub

__all__ = ["check", "main"]

TARGET = "coap"
_DEDUP_MAX = 8
_DEDUP_LIFETIME = 10.0


def check_datagram(data: bytes) -> None:
    """The codec invariants for one datagram."""
    reset = codec.reset_for(data)
    try:
        msg = codec.parse(data)
    except codec.MessageFormatError:
        if len(data) >= 4 and data[0] >> 6 == 1 and (data[0] >> 4) & 3 == codec.CON:
            assert reset == bytes((0x70, 0, data[2], data[3])), f"RST {reset!r}"
        return
    wire = codec.serialize(msg)
    assert wire == data, f"{msg!r} serializes to {wire.hex()}, not {data.hex()}"
    assert codec.parse(wire) == msg
    for number, value in msg.options:
        assert msg.option(number) is not None
        assert value in msg.option_values(number)
    assert codec.code_str(msg.code).count(".") == 1
    if codec.is_request(msg.code) and msg.mtype in (codec.CON, codec.NON):
        answer = codec.parse(codec.response(msg, codec.CONTENT, ((codec.CONTENT_FORMAT,
                             codec.encode_uint(60)),), b"x", mid=7))
        assert answer.token == msg.token and answer.code == codec.CONTENT
        assert answer.mtype == (codec.ACK if msg.mtype == codec.CON else codec.NON)
        assert answer.mid == (msg.mid if msg.mtype == codec.CON else 7)


def check_parameters(payload: bytes) -> None:
    """The pub/sub parameter invariants for one CBOR payload."""
    try:
        spec = pubsub.parse_parameters(payload)
    except pubsub.ParameterError:
        return
    assert all(isinstance(k, int) and k in pubsub.PARAM_NAMES for k in spec)
    conf = pubsub.conf_representation("a/b", {9: True}, 50)
    # FETCH of the collection (topics by properties) and of a topic resource (conf-filter)
    assert pubsub.has_all(conf, {}) is True
    pubsub.has_all(conf, spec)
    try:
        part = pubsub.conf_part(conf, spec)
    except pubsub.ParameterError:
        pass
    else:
        assert all(k in conf and conf[k] == v for k, v in part.items())
    # POST to the collection: create a topic
    try:
        name, params = pubsub.topic_configuration(dict(spec))
    except pubsub.ParameterError:
        return
    assert isinstance(name, str)
    cf = params.get(pubsub.PARAMS["topic-content-format"])
    if cf is not None:
        ctype = pubsub.content_type_for(cf)
        assert ctype is not None and pubsub.content_format_for(ctype) == cf, (cf, ctype)
    rep = pubsub.conf_representation(name, params, cf)
    assert rep[pubsub.PARAMS["topic-name"]] == name
    assert pubsub.topic_href(pubsub.DATA_PREFIX, name).startswith("/ps/data/")
    assert pubsub.links([name]).startswith(b"</ps/conf/")
    wanted = {pubsub.PARAMS["conf-filter"]: list(pubsub.PARAMS)}
    assert pubsub.conf_part(rep, wanted) == rep
    assert pubsub.has_all(rep, params)


def check_dedup(script: bytes) -> None:
    """Run a deduplicator script: per 2 bytes, an operation, a remote, a message id and
    a clock step; check its bounds and its promise against a plain model."""
    d = dedup.Deduplicator(_DEDUP_MAX, _DEDUP_LIFETIME)
    now = 0.0
    for i in range(0, len(script) - 1, 2):
        op, arg = script[i], script[i + 1]
        remote, mid = (arg >> 4) & 3, arg & 15
        now += (op >> 2) * 0.5
        kind = op & 3
        if kind == 0:
            before = len(d)
            cached = d.check(remote, mid, now)
            if cached is not None:
                assert len(d) == before
        elif kind == 1:
            # a request seen (now or before), then answered: a retransmission gets the answer
            d.check(remote, mid, now)
            response = bytes((remote, mid)) + b"r"
            d.answer(remote, mid, response)
            assert d.check(remote, mid, now) == response
        elif kind == 2:
            d.forget(remote, mid)
            assert d.check(remote, mid, now) is None
        else:
            removed = d.expire(now, force=arg & 3)
            assert removed >= 0
        assert 0 <= len(d) <= _DEDUP_MAX


def check(data: bytes) -> None:
    """Raise (AssertionError or the escaping exception) when an invariant breaks."""
    if not data:
        return
    mode = data[0] % 3
    if mode == 0:
        check_datagram(data[1:])
    elif mode == 1:
        check_parameters(data[1:])
    else:
        check_dedup(data[1:])


def main() -> None:
    """Run under atheris: ``python -m fuzz.coap [libFuzzer flags] [corpus dirs]``."""
    fuzz_main(check, sys.argv)


if __name__ == "__main__":
    main()
