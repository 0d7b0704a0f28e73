"""Write the seed corpora: ``python -m fuzz.seeds [target ...]`` (from the repository root).

Seeds are named ``seed-<what>``; files named otherwise (``crash-*``: regression inputs
found by fuzzing) are never touched. Re-running rewrites the seeds: those built with
randomness (ML-DSA signatures, HPKE) then change bytes but not shape.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

from fuzz._harness import CORPUS

Seed = tuple[str, bytes]


# --------------------------------------------------------------------------- MQTT


def mqtt_seeds() -> Iterator[Seed]:
    """Valid packets of every type at each protocol level, then malformed ones."""
    from rapidmq_edge.mqtt.codec import encode
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
    from rapidmq_edge.mqtt.properties import encode_properties
    from tests.malformed_corpus import CORPUS as MALFORMED
    from tests.malformed_corpus import connect_bytes

    mode = {0: 0, 3: 1, 4: 2, 5: 3}
    props5 = {
        "content_type": "text/plain", "response_topic": "r/1", "correlation_data": b"\x01",
        "user_property": [("k", "v"), ("k", "w")], "message_expiry_interval": 60,
        "payload_format_indicator": 1,
    }
    for level in (3, 4, 5):
        v5 = level == 5
        name = "MQIsdp" if level == 3 else "MQTT"
        connect = Connect(level, "client-1", True, 30, protocol_name=name)
        full = Connect(
            level, "c2", False, 0,
            Will("will/t", b"bye", 1, True,
                 {"will_delay_interval": 5, "content_type": "x"} if v5 else {}),
            "user", b"pw",
            {"session_expiry_interval": 10, "receive_maximum": 20,
             "user_property": [("a", "b")], "authentication_method": "m",
             "authentication_data": b"d"} if v5 else {},
            name,
        )
        head = encode(connect, level)
        yield f"{level}-connect", bytes((0,)) + head
        yield f"{level}-connect-will-user", bytes((0,)) + encode(full, level)
        others: list[Packet] = [
            Publish("a/b", b"hello"),
            Publish("a/b", b"\x00\xff", 1, True, True, 7, props5 if v5 else {}),
            Publish("x", b"", 2, False, False, 65535),
            Puback(1), Pubrec(2), Pubrel(3), Pubcomp(4),
            Subscribe(5, [("a/+", SubOptions(1)), ("#", SubOptions(2))]),
            Unsubscribe(6, ["a/+", "b"]),
            Pingreq(), Disconnect(),
            Suback(7, [0, 1, 0x80]), Unsuback(8), Connack(True, 0), Pingresp(),
        ]
        if v5:
            others += [
                Publish("", b"aliased", 1, False, False, 9, {"topic_alias": 3}),
                Puback(10, 0x10, {"reason_string": "why", "user_property": [("a", "b")]}),
                Pubrec(11, 0x80), Pubrel(12, 0x92), Pubcomp(13, 0, {"reason_string": "r"}),
                Subscribe(14, [("$share/g/a", SubOptions(1, False, True, 2))],
                          {"subscription_identifier": [7], "user_property": [("u", "v")]}),
                Unsuback(15, [0, 0x11], {"reason_string": "r"}),
                Connack(False, 0x87, {"assigned_client_identifier": "id", "maximum_qos": 1,
                                      "topic_alias_maximum": 10, "server_keep_alive": 5}),
                Disconnect(0x8E, {"reason_string": "taken over", "server_reference": "s"}),
                Auth(0x18, {"authentication_method": "m", "authentication_data": b"x"}),
            ]
        for i, packet in enumerate(others):
            kind = type(packet).__name__.lower()
            yield f"{level}-{i:02d}-{kind}", bytes((mode[level],)) + encode(packet, level)
        stream = head + b"".join(encode(p, level) for p in others[:11])
        yield f"{level}-stream", bytes((0,)) + stream
        yield f"{level}-stream-small-max", bytes((0x80,)) + stream
    # property blocks, one per packet type that has properties
    blocks: dict[int | str, dict[str, Any]] = {
        1: {"session_expiry_interval": 1, "receive_maximum": 2, "maximum_packet_size": 99,
            "request_problem_information": 1, "user_property": [("a", "b")]},
        2: {"assigned_client_identifier": "x", "server_reference": "s", "retain_available": 0,
            "shared_subscription_available": 1, "response_information": "ri"},
        3: props5 | {"topic_alias": 1, "subscription_identifier": [1, 300]},
        8: {"subscription_identifier": [268_435_455], "user_property": [("", "")]},
        15: {"authentication_method": "SCRAM", "authentication_data": b"\x00" * 3},
        "will": {"will_delay_interval": 9, "content_type": "c", "correlation_data": b""},
    }
    from rapidmq_edge.mqtt.properties import ALLOWED

    kinds: list[int | str] = sorted(ALLOWED, key=str)
    for ptype, props in blocks.items():
        yield f"props-{ptype}", bytes((4, kinds.index(ptype))) + encode_properties(props)
    # the whole malformed corpus: a third of it starts the fuzzer with 20 fewer edges covered
    for name, version, data, _ in MALFORMED:
        if version == 0:
            yield f"malformed-{name}", bytes((0,)) + data
        else:
            yield f"malformed-{name}", bytes((0,)) + connect_bytes(version) + data


def mqtt_framing_seeds() -> Iterator[Seed]:
    """Streams for the C lane: PUBLISH / PUBACK / PUBCOMP runs at each protocol level, read
    at once and in chunks, with the frames it declines and the malformed corpus in them."""
    from rapidmq_edge.mqtt.codec import encode
    from rapidmq_edge.mqtt.packets import Pingreq, Puback, Pubcomp, Publish, Pubrec
    from tests.malformed_corpus import CORPUS as MALFORMED
    from tests.malformed_corpus import connect_bytes

    def mode(level: int, chunk: int = 0, small: bool = False) -> bytes:
        return bytes(((0, 3, 4, 5).index(level) | (chunk << 2) | (0x80 if small else 0),))

    for level in (3, 4, 5):
        v5 = level == 5
        pubs = [
            Publish("a/b", b"hello"), Publish("a/b", b"again"), Publish("t\u00e9/\u4e2d", b"x"),
            Publish("s", b"r", 0, True), Publish("q1", b"\x00" * 200, 1, False, False, 1),
            Publish("q2", b"", 2, True, True, 65535), Puback(7), Pubcomp(8), Pubrec(9),
            Pingreq(), Publish("a/b", b"x" * 130),
        ]
        if v5:
            pubs += [Publish("p", b"y", 1, False, False, 3, {"content_type": "c"}),
                     Publish("", b"z", 0, False, False, 0, {"topic_alias": 2}),
                     Puback(10, 0x10), Publish("a/b", b"after")]
        stream = b"".join(encode(p, level) for p in pubs)
        for chunk in (0, 1, 3, 7, 31):
            yield f"{level}-stream-chunk{chunk}", mode(level, chunk) + stream
        yield f"{level}-stream-small-max", mode(level, 0, True) + stream
        connect = connect_bytes(level if level > 3 else 4)
        yield f"{level}-connect-then-stream", mode(0) + connect + stream
        good = encode(Publish("g/h", b"ok"), level)
        bad_frames = {
            "qos3": b"\x36\x06\x00\x01a\x00\x01x",
            "dup-qos0": b"\x38\x04\x00\x01ax",
            "wildcard": b"\x30\x05\x00\x03a/+",
            "nul": b"\x30\x05\x00\x03a\x00b",
            "bad-utf8": b"\x30\x05\x00\x03a\xffb",
            "surrogate": b"\x30\x05\x00\x03\xed\xa0\x80",
            "pid-0": b"\x32\x05\x00\x01a\x00\x00",
            "topic-past-end": b"\x30\x03\x00\x05a",
            "empty-topic": b"\x30\x03\x00\x00x",
            "short": b"\x30\x01\x00",
            "puback-pid-0": b"\x40\x02\x00\x00",
            "puback-flags": b"\x41\x02\x00\x01",
            "length-5-bytes": b"\x30\xff\xff\xff\xff\x01",
            "length-not-minimal": b"\x30\x80\x00",
            "props-missing": b"\x30\x03\x00\x01a",
        }
        for name, frame in bad_frames.items():
            yield f"{level}-bad-{name}", mode(level) + good + frame + good
            yield f"{level}-bad-{name}-bytewise", mode(level, 1) + good + frame
    for name, version, data, _ in MALFORMED:
        if version:
            lead = encode(Publish("lead/in", b"x"), version)
            yield f"malformed-{name}", mode(0) + connect_bytes(version) + lead + data
    # a connection's first read (CONNECT + SUBSCRIBE, the lane's connect path) and the forms
    # of both it leaves to the codec
    from rapidmq_edge.mqtt.packets import Connect, SubOptions, Subscribe, Will
    from tests.malformed_corpus import connect_raw

    for level in (4, 5):
        e = b"\x00" if level == 5 else b""
        sub = encode(Subscribe(1, [("bench/storm/1", SubOptions(0)), ("a/+/#", SubOptions(2)),
                                   ("$share/g/t", SubOptions(1))]), level)
        tail = encode(Publish("a/b", b"x", 1, False, False, 2), level)
        connects = {
            "plain": encode(Connect(level, "cs-1", True, 600), level),
            "user-password": encode(Connect(level, "c", False, 0, None, "u", b"pw"), level),
            "empty-id": encode(Connect(level, "", True, 60), level),
            "will": encode(Connect(level, "w", True, 60, Will("w/t", b"bye", 1)), level),
            "password-only": connect_raw(level, 0x42, b"\x00\x01c\x00\x02pw"),
        }
        subs = {
            "ok": sub,
            "qos3": b"\x82" + bytes((6 + len(e),)) + b"\x00\x01" + e + b"\x00\x01a\x03",
            "reserved": b"\x82" + bytes((6 + len(e),)) + b"\x00\x01" + e + b"\x00\x01a\xc0",
            "no-filter": b"\x82" + bytes((2 + len(e),)) + b"\x00\x01" + e,
            "nl-share": b"\x82" + bytes((13 + len(e),)) + b"\x00\x01" + e
            + b"\x00\x08$share/a\x04",
        }
        for cname, connect in connects.items():
            for sname, frame in subs.items():
                for chunk in (0, 1, 5):
                    yield (f"{level}-connect-{cname}-sub-{sname}-chunk{chunk}",
                           mode(0, chunk) + connect + frame + tail)


# --------------------------------------------------------------------------- CoAP


def coap_seeds() -> Iterator[Seed]:
    """Datagrams of each type and option form, topic parameter maps, dedup scripts."""
    import cbor2

    from rapidmq_edge.coap import codec, pubsub

    def dgram(name: str, msg: codec.Message) -> Seed:
        return f"dgram-{name}", b"\x00" + codec.serialize(msg)

    yield dgram("empty-ack", codec.Message(codec.ACK, codec.EMPTY, 1))
    yield dgram("ping", codec.Message(codec.CON, codec.EMPTY, 2))
    yield dgram("reset", codec.Message(codec.RST, codec.EMPTY, 3))
    yield dgram("post-data", codec.Message(
        codec.CON, codec.POST, 0x1234, b"\x01\x02",
        ((codec.URI_PATH, b"ps"), (codec.URI_PATH, b"data"), (codec.URI_PATH, b"a"),
         (codec.CONTENT_FORMAT, b"")), b"21.5"))
    yield dgram("put-retained", codec.Message(
        codec.NON, codec.PUT, 9, b"tok12345",
        ((codec.URI_PATH, b"ps"), (codec.URI_PATH, b"data"), (codec.URI_PATH, b"x%2Fy"),
         (codec.CONTENT_FORMAT, codec.encode_uint(50))), b'{"t": 1}'))
    yield dgram("get-observe", codec.Message(
        codec.CON, codec.GET, 10, b"o", ((codec.OBSERVE, b""), (codec.URI_PATH, b"ps"),
                                          (codec.ACCEPT, codec.encode_uint(60)))))
    yield dgram("fetch-conf", codec.Message(
        codec.CON, codec.FETCH, 11, b"f", ((codec.URI_PATH, b"ps"), (codec.URI_PATH, b"conf"),
                                           (codec.URI_PATH, b"t")),
        cbor2.dumps({10: ["topic-name", 3]})))
    yield dgram("content-response", codec.Message(
        codec.ACK, codec.CONTENT, 12, b"t", ((codec.ETAG, b"12345678"),
                                             (codec.MAX_AGE, codec.encode_uint(60))), b"v"))
    yield dgram("extended-options", codec.Message(
        codec.CON, codec.DELETE, 13, b"",
        ((codec.URI_PATH, b"p" * 12), (codec.URI_QUERY, b"q" * 13), (codec.SIZE1, b"s" * 300),
         (2000, b"x"), (65000, b""))))
    yield dgram("block-options", codec.Message(
        codec.CON, codec.PUT, 14, b"b", ((codec.BLOCK1, codec.encode_uint(0x0E)),
                                         (codec.SIZE1, codec.encode_uint(4096))), b"z" * 64))
    for name, raw in (
        ("short", b"\x40\x01"), ("version-2", b"\x80\x01\x00\x01"),
        ("tkl-9", b"\x49\x01\x00\x01" + b"t" * 9), ("token-truncated", b"\x44\x01\x00\x01ab"),
        ("delta-15", b"\x40\x01\x00\x01\xf1x"), ("length-15", b"\x40\x01\x00\x01\x1f"),
        ("marker-no-payload", b"\x40\x02\x00\x01\xff"),
        ("empty-with-token", b"\x41\x00\x00\x01t"),
        ("ext-delta-truncated", b"\x40\x01\x00\x01\xe0\x01"),
        ("option-past-end", b"\x40\x01\x00\x01\xb5ab"),
        ("number-over-65535", b"\x40\x01\x00\x01\xe0\xff\xff\xe0\xff\xff"),
    ):
        yield f"dgram-bad-{name}", b"\x00" + raw
    params = {
        "create": {0: "a/b", 2: pubsub.RT_DATA, 3: 50, 4: "temperature", 9: True},
        "create-names": {"topic-name": "x", "topic-content-format": 0},
        "create-bad-cf": {0: "x", 3: 65000},
        "create-unsupported": {0: "x", 6: 10},
        "conf-filter": {10: [0, "topic-data", 3, -1, "nope"]},
        "conf-filter-empty": {10: []},
        "match": {3: 50, 9: True},
        "unknown-key": {"what": 1},
        "not-a-map": [1, 2],
    }
    for name, value in params.items():
        yield f"params-{name}", b"\x01" + cbor2.dumps(value)
    yield "params-empty", b"\x01"
    yield "params-garbage", b"\x01\xff\x00"
    yield "dedup-check-answer", b"\x02" + bytes((0, 0x12, 1, 0x12, 0, 0x12, 2, 0x12))
    yield "dedup-fill", b"\x02" + bytes(b for i in range(12) for b in (0, i))
    yield "dedup-expire", b"\x02" + bytes((0, 1, 1, 1, 0x7C, 1, 3, 3, 0, 1))


# --------------------------------------------------------------------------- crypto


def cose_seeds() -> Iterator[Seed]:
    """Valid structures made with the harness's fixed keys, and a few malformed ones."""
    import cbor2

    from fuzz import cose as harness
    from rapidmq_edge.crypto import batch, batch_message, envelope, keyfile, signed_session

    ident = harness.identity()
    rcpt = harness.recipient()
    builder = batch.BatchBuilder(ident, "gw-1", clock=lambda: 1_700_000_000.0)
    for i in range(3):
        builder.add(f"gw-1:{i}", "a/b", b"payload %d" % i)
    signed = builder.seal()
    assert signed is not None
    builder.add("gw-1:3", "c", b"")
    second = builder.seal()
    assert second is not None
    yield "0-signed-header", b"\x00" + signed.signed
    yield "0-signed-header-chained", b"\x00" + second.signed
    yield "0-bare-payload", b"\x00" + signed.header.encode()
    yield "1-batch-message-leaves", b"\x01" + batch_message.encode_batch_message(
        signed, [5, 6, 7], True)
    yield "1-batch-message-ids", b"\x01" + batch_message.encode_batch_message(
        signed, [1, 4, 5, 9], False)
    yield "1-batch-message-runs", b"\x01" + cbor2.dumps([b"", [0, 3, 10, 2], None])
    yield "1-batch-message-bad-runs", b"\x01" + cbor2.dumps([b"", [0, 3, 10], b"x" * 32])
    sealer = envelope.Sealer(rcpt.public(), "gw-1")
    header = sealer.session_header
    sealed = sealer.seal(b"hello", topic=harness.TOPIC, message_id=harness.MESSAGE_ID)
    later = sealer.seal(b"x" * 40, topic=harness.TOPIC, message_id=harness.MESSAGE_ID)
    yield "2-signed-session", b"\x02" + signed_session.sign_session(header, ident)
    yield "3-session-header", b"\x03" + header
    yield "4-envelope", b"\x04" + sealed.envelope
    yield "4-envelope-seq1", b"\x04" + later.envelope
    yield "4-envelope-piv5", b"\x04" + envelope.encode_envelope(
        b"s" * 8, b"\x01\x02\x03\x04\x05", b"c" * 16)
    yield "5-open", b"\x05" + len(header).to_bytes(2, "big") + header + sealed.envelope
    yield "5-open-seq1", b"\x05" + len(header).to_bytes(2, "big") + header + later.envelope
    yield "6-cose-key-identity", b"\x06" + ident.cose_public_key()
    yield "6-cose-key-recipient", b"\x06" + rcpt.public().cose()
    yield "6-cose-key-private", b"\x06" + cbor2.dumps({1: 7, 2: b"k", 3: -49, -1: b"p",
                                                         -2: b"s"})
    yield "7-seed-file-xwing", b"\x07" + keyfile.encode_seed_file(keyfile.ALG_XWING,
                                                                   harness.RECIPIENT_SEED)
    yield "7-seed-file-mldsa", b"\x07" + keyfile.encode_seed_file(keyfile.ALG_MLDSA65,
                                                                   harness.IDENTITY_SEED)
    yield "7-seed-file-cbor-mldsa", b"\x07" + cbor2.dumps(
        {"v": 1, "alg": keyfile.ALG_MLDSA65, "seed": harness.IDENTITY_SEED}, canonical=True)
    yield "7-seed-file-encrypted", b"\x07" + keyfile.encode_seed_file(
        keyfile.ALG_XWING, harness.RECIPIENT_SEED, b"passphrase")
    for mode in range(8):
        yield f"{mode}-trailing", bytes((mode,)) + b"\x80\x00"


# --------------------------------------------------------------------------- TOML files


def config_seeds() -> Iterator[Seed]:
    """The configuration examples of the docs and deploy/, users and tokens files."""
    import hashlib
    import re

    from fuzz._harness import CORPUS as corpus

    root = corpus.parent.parent
    blocks = re.findall(r"```toml\n(.*?)```", (root / "docs/configuration.md").read_text(),
                        re.S)
    for i, block in enumerate(blocks):
        if "[users." in block:
            yield f"users-doc-{i:02d}", b"\x01" + block.encode()
        elif "[tokens." in block:
            yield f"tokens-doc-{i:02d}", b"\x02" + block.encode()
        else:
            yield f"config-doc-{i:02d}", b"\x00" + block.encode()
    yield "config-example", b"\x00" + (root / "deploy/gateway.example.toml").read_bytes()
    yield "config-empty", b"\x00"
    for name, text in {
        "listeners": '[mqtt]\nlisten = ["tcp://127.0.0.1:1883", "ws://[::1]:8083/mqtt"]\n',
        "http": '[http]\nlisten = ["http://127.0.0.1:8080"]\ntokens_file = "~/tokens.toml"\n',
        "coap": '[coap]\nlisten = ["udp://[::1]:5683"]\n',
        "upstream": '[[upstream]]\nname = "cloud"\nurls = ["mqtts://[::1]:8883"]\n'
                    '[[forward]]\nfilter = "a/#"\nupstream = "cloud"\n',
        "bad-types": '[gateway]\nid = 5\n[persistence]\ncommit_delay_ms = nan\n',
        "unknown-key": '[mqtt]\nmax_packet_sise = 10\n',
    }.items():
        yield f"config-{name}", b"\x00" + text.encode()
    pw = "$scrypt$ln=14,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43
    yield "users-one", b"\x01" + f'[users.alice]\npassword = "{pw}"\n'.encode()
    yield "users-quoted", b"\x01" + f'[users."a b.c"]\npassword = "{pw}"\n'.encode()
    yield "users-bad-hash", b"\x01" + b'[users.bob]\npassword = "$scrypt$ln=99"\n'
    yield "users-empty", b"\x01"
    digest = "sha256:" + hashlib.sha256(b"rmq_x").hexdigest()
    yield "tokens-one", b"\x02" + (
        f'[tokens.dash]\nuser = "alice"\nhash = "{digest}"\ncreated = "2024-05-01T12:00:00Z"\n'
    ).encode()
    yield "tokens-bad-name", b"\x02" + f'[tokens."a b"]\nuser = "a"\nhash = "{digest}"\n'.encode()
    yield "tokens-not-utf8", b"\x02\xff\xfe"


# --------------------------------------------------------------------------- HTTP API


def http_seeds() -> Iterator[Seed]:
    """Publish bodies, subscribe queries, other routes and raw requests."""
    import json

    from fuzz import http_api as harness

    bodies: dict[str, object] = {
        "minimal": {"topic": "a/b", "payload": "hi"},
        "full": {"topic": "s/t", "payload": "aGk=", "encoding": "base64", "qos": 0,
                 "retain": True, "content_type": "text/plain",
                 "user_properties": {"k": "v", "n": ""}},
        "qos1-utf8": {"topic": "x", "payload": "\u00e9\u2603", "qos": 1, "encoding": "utf-8"},
        "denied": {"topic": "deny/x", "payload": ""},
        "sys": {"topic": "$SYS/x", "payload": ""},
        "wildcard": {"topic": "a/#", "payload": "x"},
        "bad-qos": {"topic": "a", "payload": "x", "qos": 2},
        "bad-encoding": {"topic": "a", "payload": "x", "encoding": "hex"},
        "bad-base64": {"topic": "a", "payload": "!!", "encoding": "base64"},
        "unknown-field": {"topic": "a", "payload": "x", "extra": 1},
        "not-object": ["topic", "payload"],
        "bad-props": {"topic": "a", "payload": "x", "user_properties": {"k": 1}},
    }
    for name, body in bodies.items():
        yield f"publish-{name}", b"\x01\x00" + json.dumps(body).encode()
    yield "publish-escapes", b"\x01\x00" + b'{"topic": "a\\u0000b", "payload": "\\ud83d\\ude00"}'
    yield "publish-not-json", b"\x01\x00{topic"
    yield "publish-no-token", b"\x01\x02" + json.dumps(bodies["minimal"]).encode()
    yield "publish-bad-token", b"\x01\x01" + json.dumps(bodies["minimal"]).encode()
    for name, query in {
        "plain": b"filter=a/b", "encoded": b"filter=a%2F%2B%2F%23", "shared": b"filter=$share/g/a",
        "two": b"filter=a&filter=b", "none": b"", "bad-filter": b"filter=a/%23/b",
        "denied": b"filter=deny/%23", "utf8": b"filter=%C3%A9", "bad-utf8": b"filter=%FF",
    }.items():
        yield f"subscribe-{name}", b"\x02\x00" + query
    for i, (method, path) in enumerate(harness._ROUTES):
        yield f"route-{i:02d}-{method}-{path.strip('/').replace('/', '-')}", bytes((3, 0, i))
    yield "route-health-no-token", bytes((3, 2, 0))
    token = harness.TOKEN.encode()
    raw = {
        "health": b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n",
        "pipelined": b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n" * 2,
        "chunked": b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
                   + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b'1e\r\n{"topic": "a", "payload": "x"}\r\n0\r\n\r\n',
        "http10": b"GET /api/v1/health HTTP/1.0\r\n\r\n",
        "too-large": b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
                     + b"\r\nContent-Length: 99999\r\n\r\n{}",
        "garbage": b"\x16\x03\x01\x00\xa5\x01\x00\x00",
    }
    for name, data in raw.items():
        yield f"raw-{name}", b"\x00" + data


TARGETS: dict[str, Callable[[], Iterator[Seed]]] = {
    "mqtt_codec": mqtt_seeds,
    "mqtt_framing": mqtt_framing_seeds,
    "coap": coap_seeds,
    "cose": cose_seeds,
    "http_api": http_seeds,
    "config_files": config_seeds,
}


def write(target: str) -> int:
    """(Re)write the seeds of ``target``; returns how many."""
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("seed-*"):
        old.unlink()
    n = 0
    for name, data in TARGETS[target]():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        (folder / f"seed-{safe}").write_bytes(data)
        n += 1
    return n


def main() -> None:
    """Write the seeds of the targets named on the command line (default: all)."""
    for target in sys.argv[1:] or list(TARGETS):
        print(f"{target}: {write(target)} seeds")


if __name__ == "__main__":
    main()
