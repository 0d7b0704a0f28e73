"""CoAP ingress conformance beyond the basics of test_coap.py: the publish fast path
(deduplication, NON, load shedding), ETags, topic configuration (draft-ietf-core-coap-pubsub)
and malformed datagrams. Raw UDP and libcoap's coap-client against a gateway process."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest

from .conftest import free_port
from .gateway_proc import GatewayProcess
from .test_coap import (
    COAP_CLIENT,
    LOOPBACK,
    V2,
    CoapGateway,
    RawClient,
    Sub,
    decode,
    encode,
    mqtt_pub,
    uri_path,
)

pytestmark = pytest.mark.interop

CF_JSON = (12, b"\x32")
MAX_AGE, ETAG, IF_MATCH, OBSERVE, SIZE1 = 14, 4, 1, 6, 60


def _forwarding(commit_delay_ms: float = 2.0) -> dict[str, Any]:
    """A forward rule to an upstream that is down: every publication is queued durably."""
    return {
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{free_port()}"]}],
        "forward": [{"filter": "fw/#", "upstream": "cloud", "qos": 1}],
        "queue": {"commit_delay_ms": commit_delay_ms, "durability": "fsync"},
    }


def test_retransmitted_publication_is_published_once_with_the_same_answer(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    g = CoapGateway(gateway_factory, extra=_forwarding())
    sub = Sub(g.gw.port, "fw/#")
    raw = RawClient(g.coap_port)
    try:
        datagram = encode(3, 0x1234, b"\x0a\x0b", uri_path("ps/data/fw/dup") + [CF_JSON],
                          b'{"n":1}')
        raw.send(datagram)
        first = raw.recv()
        assert first is not None and first["code"] == "2.01" and first["mid"] == 0x1234
        for _ in range(3):  # RFC 7252 §4.5: retransmissions get the same response
            raw.send(datagram)
            again = raw.recv()
            assert again == first
        # a new message id is a new publication (2.04: the topic has data now)
        r = raw.request(3, "ps/data/fw/dup", [CF_JSON], b'{"n":2}', token=b"\x0c")
        assert r is not None and r["code"] == "2.04"
        got = sub.wait(3, timeout=2)
        assert [p for _, p, _, _ in got] == [b'{"n":1}', b'{"n":2}']
        assert got[0][2].ContentType == "application/json"
    finally:
        raw.close()
        sub.close()


def test_non_publication_is_qos0_with_a_non_response(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    g = CoapGateway(gateway_factory)
    got: list[tuple[str, bytes, int]] = []
    ready = threading.Event()
    c = mqtt.Client(V2, client_id="non-sub", protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: got.append((m.topic, m.payload, m.qos))
    c.on_subscribe = lambda *a: ready.set()
    c.connect(LOOPBACK, g.gw.port)
    c.loop_start()
    raw = RawClient(g.coap_port)
    try:
        c.subscribe("non/#", qos=1)
        assert ready.wait(5)
        raw.send(encode(2, 0x77, b"\x05", uri_path("ps/data/non/a"), b"event", mtype=1))
        resp = raw.recv()
        assert resp is not None and resp["type"] == 1 and resp["code"] == "2.04"
        assert resp["token"] == b"\x05"
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got == [("non/a", b"event", 0)], "NON publishes at QoS 0"
        # a refused NON gets a NON error response with a diagnostic payload
        raw.send(encode(3, 0x78, b"\x06", uri_path("ps/data/non/#"), b"x", mtype=1))
        bad = raw.recv()
        assert bad is not None and bad["type"] == 1 and bad["code"] == "4.00"
        assert bad["payload"] == b"invalid topic"
    finally:
        raw.close()
        c.disconnect()
        c.loop_stop()


def test_load_is_shed_with_429_and_max_age(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    # one publication may await its commit at a time, and commits wait 300 ms
    g = CoapGateway(gateway_factory, max_pending=1, retry_after=7,
                    extra=_forwarding(commit_delay_ms=300.0))
    sub = Sub(g.gw.port, "fw/#")
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(10)]
    try:
        for i, s in enumerate(socks):
            s.settimeout(3)
            s.sendto(encode(2, 100 + i, bytes([i]), uri_path(f"ps/data/fw/s{i}"), b"v"),
                     (LOOPBACK, g.coap_port))
        answers = {}
        for i, s in enumerate(socks):
            answers[i] = decode(s.recv(2048))
        ok = [i for i, a in answers.items() if a["code"] == "2.04"]
        shed = [a for a in answers.values() if a["code"] == "4.29"]
        assert ok and shed and len(ok) + len(shed) == 10, answers
        for a in shed:  # RFC 8516: Max-Age says when to retry
            assert a["options"][MAX_AGE] == [bytes([7])] and a["payload"], a
        got = sub.wait(len(ok), timeout=3)
        time.sleep(0.5)
        assert sorted(t for t, _, _, _ in sub.got) == sorted(f"fw/s{i}" for i in ok), \
            "exactly the acknowledged publications were published"
        assert len(got) == len(ok)
    finally:
        for s in socks:
            s.close()
        sub.close()


def test_etags_on_topic_data(gateway_factory: Callable[..., GatewayProcess]) -> None:
    g = CoapGateway(gateway_factory)
    raw = RawClient(g.coap_port)
    try:
        assert raw.request(3, "ps/data/e/t", [CF_JSON], b'{"v":1}')["code"] == "2.01"
        r1 = raw.request(1, "ps/data/e/t")
        assert r1["code"] == "2.05" and len(r1["options"][ETAG][0]) == 8
        tag1 = r1["options"][ETAG][0]
        assert raw.request(1, "ps/data/e/t")["options"][ETAG] == [tag1], "stable"
        valid = raw.request(1, "ps/data/e/t", [(ETAG, tag1)])
        assert valid["code"] == "2.03" and valid["options"][ETAG] == [tag1] \
            and not valid["payload"], "RFC 7252 §5.10.6.2: the cached copy is current"
        # an observer sees the tag of every new value
        obs = RawClient(g.coap_port)
        first = obs.request(1, "ps/data/e/t", [(OBSERVE, b"")], token=b"\x0b")
        assert first["options"][ETAG] == [tag1]
        assert raw.request(3, "ps/data/e/t", [CF_JSON], b'{"v":2}')["code"] == "2.04"
        note = obs.recv(3)
        obs.close()
        tag2 = note["options"][ETAG][0]
        assert note["payload"] == b'{"v":2}' and tag2 != tag1
        got = raw.request(1, "ps/data/e/t", [(ETAG, tag1)])
        assert got["code"] == "2.05" and got["options"][ETAG] == [tag2]
        # conditional update against the ETag (If-Match, §5.10.8.1)
        stale = raw.request(3, "ps/data/e/t", [CF_JSON, (IF_MATCH, tag1)], b'{"v":3}')
        assert stale["code"] == "4.12"
        fresh = raw.request(3, "ps/data/e/t", [CF_JSON, (IF_MATCH, tag2)], b'{"v":3}')
        assert fresh["code"] == "2.04"
        assert raw.request(1, "ps/data/e/t")["payload"] == b'{"v":3}'
        # libcoap sees the option too
        import subprocess

        out = subprocess.run([COAP_CLIENT, "-B", "5", "-v", "6", "-m", "get",
                              g.url("ps/data/e/t")], capture_output=True, timeout=15)
        assert "ETag:" in (out.stdout + out.stderr).decode(errors="replace")
    finally:
        raw.close()


def test_topic_configuration_resources(gateway_factory: Callable[..., GatewayProcess]) -> None:
    g = CoapGateway(gateway_factory)
    raw = RawClient(g.coap_port)
    cbor = (12, b"\x3c")
    try:
        spec = {0: "home/temp", 2: "core.ps.data", 3: 50, 4: "temperature"}
        r = raw.request(2, "ps", [cbor], cbor2.dumps(spec))
        assert r["code"] == "2.01", r
        assert r["options"][8] == [b"ps", b"conf", b"home", b"temp"], "Location-Path"
        assert cbor2.loads(r["payload"]) == {
            0: "home/temp", 1: "/ps/data/home/temp", 2: "core.ps.data", 3: 50,
            4: "temperature"}
        again = raw.request(2, "ps", [cbor], cbor2.dumps(spec))
        assert again["code"] == "4.00" and b"in use" in again["payload"]
        for bad in ({0: "x/y", 6: 10}, {0: "x/y", 2: "core.ps.conf"}, {0: "x/y", 3: "json"},
                    {0: "x/+"}, {1: "/ps/data/x"}, {0: "x/y", 99: 1}, [1, 2]):
            assert raw.request(2, "ps", [cbor], cbor2.dumps(bad))["code"] == "4.00", bad
        # names as keys are accepted too; "initialize": readable before any publication
        r = raw.request(2, "ps", [cbor], cbor2.dumps({"topic-name": "home/door",
                                                     "initialize": True}))
        assert r["code"] == "2.01"
        assert raw.request(1, "ps/data/home/door")["code"] == "2.05"
        assert raw.request(1, "ps/data/home/temp")["code"] == "4.04", "half created"
        mqtt_pub(g.gw.port, "home/other", [b"1"], retain=True)

        def links(resp: dict[str, Any]) -> list[str]:
            assert resp["code"] == "2.05", resp
            return sorted(x.split(">")[0][1:] for x in resp["payload"].decode().split(",") if x)

        # FETCH on the collection: topics whose representation matches every parameter
        assert links(raw.request(5, "ps", [cbor], cbor2.dumps({4: "temperature"}))) == [
            "/ps/conf/home/temp"]
        assert links(raw.request(5, "ps", [cbor], cbor2.dumps(
            {"resource-type": "core.ps.data"}))) == [
            "/ps/conf/home/door", "/ps/conf/home/other", "/ps/conf/home/temp"]
        assert links(raw.request(5, "ps", [cbor], cbor2.dumps({3: 60}))) == []
        assert raw.request(5, "ps", [cbor], b"\xff")["code"] == "4.00"
        # GET ?rt=core.ps.data lists the topic-data resources
        assert links(raw.request(1, "ps", [(15, b"rt=core.ps.data")])) == [
            "/ps/data/home/door", "/ps/data/home/other", "/ps/data/home/temp"]
        # FETCH on a topic resource: the parameters named in conf-filter
        part = raw.request(5, "ps/conf/home/temp", [cbor],
                           cbor2.dumps({10: ["topic-data", 4]}))
        assert part["code"] == "2.05"
        assert cbor2.loads(part["payload"]) == {1: "/ps/data/home/temp", 4: "temperature"}
        # DELETE the topic resource: gone from the collection
        assert raw.request(4, "ps/conf/home/temp")["code"] == "2.02"
        assert raw.request(1, "ps/conf/home/temp")["code"] == "4.04"
        assert "/ps/conf/home/temp" not in links(raw.request(1, "ps"))
    finally:
        raw.close()


def _mutations(seed: int, count: int) -> list[bytes]:
    """Truncations and byte flips of well-formed requests, and random datagrams."""
    rng = random.Random(seed)
    valid = [
        encode(3, 1, b"\x01\x02", uri_path("ps/data/fz/a") + [CF_JSON], b'{"a":1}'),
        encode(2, 2, b"", uri_path("ps/data/fz/b") + [(SIZE1, b"\x03")], b"abc"),
        encode(1, 3, b"\x07", uri_path("ps/data/fz/a") + [(OBSERVE, b"")]),
        encode(5, 4, b"\x08", uri_path("ps") + [(12, b"\x3c")], cbor2.dumps({4: "t"})),
    ]
    out = []
    for _ in range(count):
        d = bytearray(rng.choice(valid))
        kind = rng.randrange(3)
        if kind == 0:
            d = d[: rng.randrange(len(d))]
        elif kind == 1:
            for _ in range(rng.randrange(1, 4)):
                d[rng.randrange(len(d))] = rng.randrange(256)
        else:
            d = bytearray(rng.randbytes(rng.randrange(1, 64)))
        out.append(bytes(d))
    return out


def test_fuzzed_datagrams_get_rst_or_errors_and_the_server_keeps_serving(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    g = CoapGateway(gateway_factory)
    raw = RawClient(g.coap_port)
    try:
        # a malformed CON whose header is readable is rejected with a matching RST
        raw.send(b"\x40\x02\xab\xcd\xb2ps\xf0")  # option delta 15: message format error
        rst = raw.recv()
        assert rst is not None and rst["type"] == 3 and rst["mid"] == 0xABCD
        assert rst["code"] == "0.00"
        # a non-UTF-8 Uri-Host: aiocoap cannot decode it; the endpoint still answers RST
        raw.send(encode(1, 0x4321, b"", [(3, b"\xff\xfe")] + uri_path("ps")))
        rst = raw.recv()
        assert rst is not None and rst["type"] == 3 and rst["mid"] == 0x4321
        for data in _mutations(11, 400):
            raw.send(data)
        time.sleep(0.3)
        while raw.recv(0.2) is not None:
            pass
        assert g.gw.proc is not None and g.gw.proc.poll() is None
        r = raw.request(3, "ps/data/after/fuzz", [CF_JSON], b'{"ok":true}')
        assert r is not None and r["code"] in ("2.01", "2.04")
        assert g.coap("get", "ps/data/after/fuzz")[1] == b'{"ok":true}'
    finally:
        raw.close()
