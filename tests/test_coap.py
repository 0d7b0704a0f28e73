"""CoAP publish-subscribe ingress: libcoap's coap-client (and raw UDP) against the gateway."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .conftest import MosquittoBroker, _require_binary, free_port
from .gateway_proc import GatewayProcess

pytestmark = pytest.mark.interop

COAP_CLIENT = "/usr/bin/coap-client-notls"
LOOPBACK = "127.0.0.1"
V2 = mqtt.CallbackAPIVersion.VERSION2

# --------------------------------------------------------------------------- raw CoAP


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def encode(
    code: int, mid: int, token: bytes = b"", options: list[tuple[int, bytes]] | None = None,
    payload: bytes = b"", mtype: int = 0,
) -> bytes:
    """A CoAP message (RFC 7252 §3); ``code`` as class*32+detail, ``mtype`` 0 = CON."""
    out = bytearray([0x40 | (mtype << 4) | len(token), code]) + struct.pack("!H", mid) + token
    last = 0
    for number, value in sorted(options or [], key=lambda o: o[0]):
        delta, length = number - last, len(value)
        last = number

        def nib(n: int) -> tuple[int, bytes]:
            if n < 13:
                return n, b""
            if n < 269:
                return 13, bytes([n - 13])
            return 14, struct.pack("!H", n - 269)

        d, dx = nib(delta)
        ln, lx = nib(length)
        out += bytes([(d << 4) | ln]) + dx + lx + value
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def decode(data: bytes) -> dict[str, Any]:
    """Type, code ("2.05"), message id, token, options {number: [values]}, payload."""
    tkl = data[0] & 0x0F
    msg: dict[str, Any] = {
        "type": (data[0] >> 4) & 3, "code": f"{data[1] >> 5}.{data[1] & 31:02d}",
        "mid": struct.unpack("!H", data[2:4])[0], "token": data[4:4 + tkl], "options": {},
    }
    i, number = 4 + tkl, 0
    while i < len(data) and data[i] != 0xFF:
        d, ln = data[i] >> 4, data[i] & 15
        i += 1
        vals = []
        for n in (d, ln):
            if n == 13:
                vals.append(data[i] + 13)
                i += 1
            elif n == 14:
                vals.append(struct.unpack("!H", data[i:i + 2])[0] + 269)
                i += 2
            else:
                vals.append(n)
        number += vals[0]
        msg["options"].setdefault(number, []).append(data[i:i + vals[1]])
        i += vals[1]
    msg["payload"] = data[i + 1:] if i < len(data) else b""
    return msg


def uri_path(path: str) -> list[tuple[int, bytes]]:
    return [(11, seg.encode()) for seg in path.strip("/").split("/")]


class RawClient:
    """A UDP socket speaking just enough CoAP for probes, RST and malformed datagrams."""

    def __init__(self, port: int) -> None:
        self.addr = (LOOPBACK, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(2.0)
        self.mid = random.randrange(0, 0xFFFF)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.addr)

    def recv(self, timeout: float = 2.0) -> dict[str, Any] | None:
        self.sock.settimeout(timeout)
        try:
            return decode(self.sock.recv(65536))
        except (TimeoutError, OSError):
            return None

    def request(
        self, code: int, path: str, options: list[tuple[int, bytes]] | None = None,
        payload: bytes = b"", token: bytes = b"\x01\x02", timeout: float = 2.0,
    ) -> dict[str, Any] | None:
        self.mid = (self.mid + 1) & 0xFFFF
        self.send(encode(code, self.mid, token, uri_path(path) + (options or []), payload))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.recv(max(0.05, deadline - time.monotonic()))
            if msg is not None and msg["mid"] == self.mid:
                return msg
        return None

    def close(self) -> None:
        self.sock.close()


def wait_coap(port: int, timeout: float = 20.0, gw: GatewayProcess | None = None) -> None:
    """Until the gateway answers GET /.well-known/core on ``port`` (its log in the error)."""
    c = RawClient(port)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = c.request(1, ".well-known/core", timeout=0.3)
            if r is not None and r["code"] == "2.05":
                return
        log = gw.log()[-3000:] if gw is not None else ""
        raise RuntimeError(f"CoAP on port {port} does not answer\n{log}")
    finally:
        c.close()


# --------------------------------------------------------------------------- coap-client


def coap(*args: str, timeout: float = 15.0) -> tuple[str, bytes]:
    """Run coap-client with a bounded wait; return (verbose log with codes, response body)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "body"
        cmd = [COAP_CLIENT, "-B", "5", "-v", "6", *args]
        if "-o" not in args:
            cmd[1:1] = ["-o", str(out)]
        p = subprocess.run(cmd, capture_output=True, timeout=timeout)
        body = out.read_bytes() if out.exists() else b""
    return p.stderr.decode(errors="replace") + p.stdout.decode(errors="replace"), body


def codes(log: str) -> list[str]:
    """Response codes seen in a coap-client -v 6 log (``c:2.04``)."""
    out = []
    for part in log.split():
        if part.startswith("c:") and part[2:3].isdigit() and part[2:3] != "0":
            out.append(part[2:])
    return out


class CoapGateway:
    """A gateway subprocess with a CoAP listener on a free UDP port."""

    def __init__(self, factory: Callable[..., GatewayProcess], **coap_cfg: Any) -> None:
        _require_binary(COAP_CLIENT)
        self.coap_port = udp_port()
        extra = coap_cfg.pop("extra", {})
        cfg = {"coap": {"listen": [f"udp://{LOOPBACK}:{self.coap_port}"], **coap_cfg}, **extra}
        self.gw = factory(config=cfg)
        wait_coap(self.coap_port, gw=self.gw)

    def url(self, path: str) -> str:
        return f"coap://{LOOPBACK}:{self.coap_port}/{path.lstrip('/')}"

    def coap(self, method: str, path: str, *args: str, timeout: float = 15.0) -> tuple[str, bytes]:
        return coap("-m", method, *args, self.url(path), timeout=timeout)

    def last_code(self, method: str, path: str, *args: str) -> str:
        log, _ = self.coap(method, path, *args)
        got = codes(log)
        assert got, log
        return got[-1]


class Sub:
    """A paho MQTT 5 subscriber recording (topic, payload, properties, retain)."""

    def __init__(self, port: int, topic: str) -> None:
        self.got: list[tuple[str, bytes, Any, bool]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.c = mqtt.Client(V2, client_id=f"sub-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
        self.c.on_message = self._msg
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.connect(LOOPBACK, port)
        self.c.loop_start()
        self.c.subscribe(topic, qos=1)
        assert ready.wait(5)

    def _msg(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, m.payload, m.properties, bool(m.retain)))

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[str, bytes, Any, bool]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.got) >= n:
                    break
            time.sleep(0.02)
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def mqtt_pub(port: int, topic: str, payloads: list[bytes], content_type: str | None = None,
             gap: float = 0.0, retain: bool = False) -> None:
    c = mqtt.Client(V2, client_id=f"pub-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
    c.connect(LOOPBACK, port)
    c.loop_start()
    try:
        for p in payloads:
            props = None
            if content_type:
                props = Properties(PacketTypes.PUBLISH)
                props.ContentType = content_type
            c.publish(topic, p, qos=1, retain=retain, properties=props).wait_for_publish(5)
            if gap:
                time.sleep(gap)
    finally:
        c.disconnect()
        c.loop_stop()


def observed_topics(g: CoapGateway) -> set[str]:
    """Topics listed by GET /ps (topic resources, retained or subscribed)."""
    _, out = g.coap("get", "ps")
    return {
        link.split(">")[0].removeprefix("</ps/conf/")
        for link in out.decode().split(",") if link.startswith("</ps/conf/")
    }


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


# --------------------------------------------------------------------------- tests


def test_discovery_collection_and_topic_resource(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    import cbor2

    g = CoapGateway(gateway_factory)
    _, wkc = g.coap("get", ".well-known/core")
    assert b"</ps>" in wkc and b"core.ps.coll" in wkc, wkc
    _, filtered = g.coap("get", ".well-known/core?rt=core.ps.coll")
    assert filtered.startswith(b"</ps>"), filtered

    # the first publication to a topic creates its data: 2.01 (draft § Publish), then 2.04
    assert g.last_code("put", "ps/data/sensors/t1", "-e", "21.5", "-t", "0") == "2.01"
    assert g.last_code("put", "ps/data/sensors/t1", "-e", "21.5", "-t", "0") == "2.04"
    _, listing = g.coap("get", "ps")
    assert b'</ps/conf/sensors/t1>;rt="core.ps.conf"' in listing, listing
    log, conf = g.coap("get", "ps/conf/sensors/t1")
    assert codes(log)[-1] == "2.05"
    # the draft's CBOR keys: topic-name 0, topic-data 1, resource-type 2, topic-content-format 3
    assert cbor2.loads(conf) == {
        0: "sensors/t1", 1: "/ps/data/sensors/t1", 2: "core.ps.data", 3: 0,
    }
    assert g.last_code("get", "ps/conf/nothing/here") == "4.04"

    # creating a topic through the collection (topic configuration, draft §3)
    spec = g.gw.tmp / "spec.cbor"
    spec.write_bytes(cbor2.dumps({"topic-name": "rooms/r2"}))
    log, created = g.coap("post", "ps", "-t", "60", "-f", str(spec))
    assert codes(log)[-1] == "2.01", log
    assert "rooms" in log and "r2" in log, "Location-Path names the topic resource"
    assert cbor2.loads(created)[1] == "/ps/data/rooms/r2"
    assert "rooms/r2" in observed_topics(g)
    assert g.last_code("get", "ps/data/rooms/r2") == "4.04", "half created: no data yet"
    assert g.last_code("delete", "ps/conf/rooms/r2") == "2.02"
    assert "rooms/r2" not in observed_topics(g)


def test_put_get_delete_post_and_non(gateway_factory: Callable[..., GatewayProcess]) -> None:
    g = CoapGateway(gateway_factory)
    sub = Sub(g.gw.port, "dev/#")
    try:
        assert g.last_code("get", "ps/data/dev/a") == "4.04"
        assert g.last_code("put", "ps/data/dev/a", "-e", '{"v":1}', "-t", "50") == "2.01"
        log, body = g.coap("get", "ps/data/dev/a")
        assert body == b'{"v":1}'
        assert "Content-Format:application/json" in log, log
        # POST: an event, not the topic's last value
        assert g.last_code("post", "ps/data/dev/a", "-e", "event") == "2.04"
        _, body = g.coap("get", "ps/data/dev/a")
        assert body == b'{"v":1}', "POST does not replace the retained value"
        # NON: QoS 0 (nothing to acknowledge; coap-client -N sends NON)
        coap("-N", "-m", "put", "-e", "non-value", g.url("ps/data/dev/n"))
        assert wait_until(lambda: g.coap("get", "ps/data/dev/n")[1] == b"non-value", 5)
        got = sub.wait(3)
        assert [(t, p) for t, p, _, _ in got] == [
            ("dev/a", b'{"v":1}'), ("dev/a", b"event"), ("dev/n", b"non-value")]
        # DELETE clears the retained value
        assert g.last_code("delete", "ps/data/dev/a") == "2.02"
        assert g.last_code("get", "ps/data/dev/a") == "4.04"
        assert g.last_code("delete", "ps/data/dev/a") == "2.02", "idempotent"
        # a new MQTT subscriber gets no retained message any more, only dev/n
        late = Sub(g.gw.port, "dev/#")
        try:
            assert [(t, p) for t, p, _, _ in late.wait(1, 2)] == [("dev/n", b"non-value")]
        finally:
            late.close()
    finally:
        sub.close()


def test_coap_publish_reaches_mqtt5_with_content_type(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    g = CoapGateway(gateway_factory)
    sub = Sub(g.gw.port, "x/#")
    try:
        for topic, ct, payload in [
            ("x/json", "50", '{"a":1}'), ("x/cbor", "60", "\xa1"), ("x/text", "0", "héllo"),
            ("x/bin", "42", "raw"), ("x/none", None, "plain"),
        ]:
            args = ["-e", payload] + (["-t", ct] if ct else [])
            assert g.last_code("post", f"ps/data/{topic}", *args) == "2.04"
        got = {t: (p, props) for t, p, props, _ in sub.wait(5)}
        ct_of = {t: getattr(props, "ContentType", None) for t, (_, props) in got.items()}
        pfi_of = {t: getattr(p, "PayloadFormatIndicator", None) for t, (_, p) in got.items()}
        assert ct_of == {
            "x/json": "application/json", "x/cbor": "application/cbor",
            "x/text": "text/plain;charset=utf-8", "x/bin": "application/octet-stream",
            "x/none": None,
        }
        assert pfi_of["x/json"] == 1 and pfi_of["x/text"] == 1
        assert pfi_of["x/bin"] is None and pfi_of["x/cbor"] is None
        assert got["x/text"][0] == "héllo".encode()
    finally:
        sub.close()


def test_mqtt_publish_reaches_coap_observer_then_deregistration(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    g = CoapGateway(gateway_factory)
    mqtt_pub(g.gw.port, "obs/t", [b'{"n":0}'], content_type="application/json", retain=True)
    body = g.gw.tmp / "obs.out"
    obs = subprocess.Popen(
        [COAP_CLIENT, "-B", "8", "-v", "6", "-s", "4", "-o", str(body), "-m", "get",
         g.url("ps/data/obs/t")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        # the observation is a broker session (a LocalClient) subscribed to obs/t
        assert wait_until(lambda: _observer_count(g) == 1, 5)
        mqtt_pub(g.gw.port, "obs/t", [b'{"n":1}', b'{"n":2}', b'{"n":3}'],
                 content_type="application/json", gap=0.2)
        out, err = obs.communicate(timeout=20)
    finally:
        if obs.poll() is None:
            obs.kill()
            obs.wait()
    log = err.decode(errors="replace") + out.decode(errors="replace")
    assert body.read_bytes() == b'{"n":0}{"n":1}{"n":2}{"n":3}', log
    assert "Observe:" in log and "Content-Format:application/json" in log
    # coap-client deregisters at the end of -s: the LocalClient is gone
    assert wait_until(lambda: _observer_count(g) == 0, 5), "observation not ended"


def _observer_count(g: CoapGateway) -> int:
    """Connected broker sessions (a CoAP observation is one) per the gateway's status file,
    refreshed every second; -1 before it exists."""
    try:
        status = json.loads((g.gw.data_dir / "status.json").read_text())
        return int(status["broker"]["clients/connected"])
    except (OSError, ValueError, KeyError):
        return -1


def test_observe_ends_on_rst_and_delete(gateway_factory: Callable[..., GatewayProcess]) -> None:
    g = CoapGateway(gateway_factory)
    raw = RawClient(g.coap_port)
    try:
        r = raw.request(1, "ps/data/rst/t", [(6, b"")], token=b"\xaa")  # Observe: 0
        assert r is not None and r["code"] == "2.05" and 6 in r["options"], r
        assert wait_until(lambda: _observer_count(g) == 1, 5)
        mqtt_pub(g.gw.port, "rst/t", [b"one"])
        note = raw.recv(3)
        assert note is not None and note["payload"] == b"one" and note["token"] == b"\xaa"
        raw.send(encode(0, note["mid"], mtype=3))  # RST: not interested any more
        assert wait_until(lambda: _observer_count(g) == 0, 5), "RST did not end the observation"

        # DELETE of the topic data ends observations with 4.04
        g.coap("put", "ps/data/rst/u", "-e", "v1")
        r = raw.request(1, "ps/data/rst/u", [(6, b"")], token=b"\xbb")
        assert r is not None and r["payload"] == b"v1"
        assert g.last_code("delete", "ps/data/rst/u") == "2.02"
        final = raw.recv(3)
        assert final is not None and final["code"] == "4.04" and final["token"] == b"\xbb"
        assert wait_until(lambda: _observer_count(g) == 0, 5)
    finally:
        raw.close()


def test_blockwise_4k_upload_download_and_notification(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    g = CoapGateway(gateway_factory)
    data = os.urandom(4096)
    digest = hashlib.sha256(data).hexdigest()
    src = g.gw.tmp / "big.bin"
    src.write_bytes(data)
    sub = Sub(g.gw.port, "blob/#")
    obs_out = g.gw.tmp / "obs.bin"
    obs = subprocess.Popen(
        [COAP_CLIENT, "-B", "8", "-s", "3", "-m", "get", "-o", str(obs_out),
         g.url("ps/data/blob/live")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        log, _ = g.coap("put", "ps/data/blob/b", "-b", "64", "-t", "42", "-f", str(src))
        assert codes(log)[-1] == "2.01" and "Block1:63/_/64" in log, log[-300:]
        for block in ("64", "1024"):
            out = g.gw.tmp / f"down-{block}.bin"
            log, _ = g.coap("get", "ps/data/blob/b", "-b", block, "-o", str(out))
            assert hashlib.sha256(out.read_bytes()).hexdigest() == digest, log[-500:]
        got = sub.wait(1)
        assert hashlib.sha256(got[0][1]).hexdigest() == digest, "MQTT sees the assembled body"
        # a 4 KB MQTT message to a CoAP observer: first block in the notification, Block2 rest
        time.sleep(0.5)
        mqtt_pub(g.gw.port, "blob/live", [data])
        obs.wait(timeout=15)
        assert hashlib.sha256(obs_out.read_bytes()).hexdigest() == digest
    finally:
        sub.close()
        if obs.poll() is None:
            obs.kill()
            obs.wait()


def test_refusals_acl_topic_size_content_format(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    g = CoapGateway(gateway_factory, max_payload=1024, extra={
        "acl": [
            {"user": "*", "topic": "secret/#", "access": "deny"},
            {"user": "*", "topic": "readonly/#", "action": "publish", "access": "deny"},
        ],
    })
    assert g.last_code("put", "ps/data/secret/x", "-e", "1") == "4.03"
    assert g.last_code("get", "ps/data/secret/x") == "4.03"
    assert g.last_code("get", "ps/data/secret/x", "-s", "1") == "4.03", "no observing either"
    assert g.last_code("put", "ps/data/readonly/x", "-e", "1") == "4.03"
    assert g.last_code("delete", "ps/data/readonly/x") == "4.03"
    assert g.last_code("put", "ps/data/%24SYS/x", "-e", "1") == "4.03"
    assert "secret/x" not in observed_topics(g)
    # invalid MQTT topic names
    assert g.last_code("put", "ps/data/a/%2B/b", "-e", "1") == "4.00"
    assert g.last_code("put", "ps/data/a/%23", "-e", "1") == "4.00"
    assert g.last_code("get", "ps/data/a/%2B", "-s", "1") == "4.00"
    # too large: single datagram and block-wise (refused at the first block past the limit)
    big = g.gw.tmp / "big.bin"
    big.write_bytes(b"x" * 1025)
    log, _ = g.coap("put", "ps/data/a/big", "-f", str(big))
    assert codes(log)[-1] == "4.13" and "Size1:1024" in log.replace(" ", ""), log[-400:]
    log, _ = g.coap("put", "ps/data/a/big", "-b", "256", "-f", str(big))
    assert codes(log)[-1] == "4.13", log[-400:]
    ok = g.gw.tmp / "ok.bin"
    ok.write_bytes(b"y" * 1024)
    assert g.last_code("put", "ps/data/a/ok", "-b", "256", "-f", str(ok)) == "2.01"
    # unknown content format, text that is not UTF-8, empty last value
    assert g.last_code("put", "ps/data/a/cf", "-e", "1", "-t", "9999") == "4.15"
    bad = g.gw.tmp / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    assert g.last_code("put", "ps/data/a/cf", "-t", "0", "-f", str(bad)) == "4.00"
    assert g.last_code("put", "ps/data/a/cf") == "4.00"
    assert g.last_code("patch", "ps/data/a/cf", "-e", "1") == "4.05"
    # conditional PUT (If-None-Match: only while the topic has no data)
    assert g.last_code("put", "ps/data/a/once", "-e", "1", "-O", "5") == "2.01"
    assert g.last_code("put", "ps/data/a/once", "-e", "2", "-O", "5") == "4.12"
    assert g.coap("get", "ps/data/a/once")[1] == b"1"


def test_malformed_datagrams_do_not_break_the_server(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    g = CoapGateway(gateway_factory)
    raw = RawClient(g.coap_port)
    rng = random.Random(7)
    try:
        corpus = [
            b"", b"\x40", b"\x40\x01", b"\x40\x01\x00",  # truncated headers
            b"\x80\x01\x00\x01",  # version 2
            b"\x4f\x01\x00\x02" + b"\x00" * 15,  # token length 15 (reserved)
            b"\x41\x01\x00\x03",  # token length 1 but no token
            b"\x40\x01\x00\x04\xf0",  # option delta 15 without payload marker semantics
            b"\x40\x01\x00\x05\xd0",  # extended delta byte missing
            b"\x40\x01\x00\x06\xe0\x01",  # truncated 2-byte extended delta
            b"\x40\x01\x00\x07\xb5ps",  # option length past the end
            b"\x40\x01\x00\x08\xff",  # payload marker with no payload
            b"\x40\x01\x00\x09\x3f",  # option length 15 (reserved)
            encode(1, 10, b"", [(11, b"ps"), (9, b"x")]),  # unknown critical option 9
            encode(1, 11, b"", [(11, b"ps"), (6, b"\x00\x00\x00\x00\x00")]),  # Observe too long
            encode(2, 12, b"", uri_path("ps/data/a"), b"x", mtype=0)[:-1],
            encode(0x1F, 13, b"", uri_path("ps")),  # code 0.31: unknown method
            encode(0x45, 14, b"\x01", uri_path("ps")),  # a response sent to a server
            encode(3, 15, b"", uri_path("ps/data/" + "a/" * 300 + "b"), b"deep"),
        ]
        corpus += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
                   for _ in range(300)]
        for data in corpus:
            raw.send(data)
        time.sleep(0.3)
        while raw.recv(0.2) is not None:  # answers (RST, 4.xx) are fine; drain them
            pass
        r = raw.request(1, "ps/data/a", [(9, b"x")])  # unknown critical option
        assert r is not None and r["code"] == "4.02", r
        assert g.gw.proc is not None and g.gw.proc.poll() is None
        assert g.last_code("put", "ps/data/still/ok", "-e", "yes") == "2.01"
        assert g.coap("get", "ps/data/still/ok")[1] == b"yes"
    finally:
        raw.close()


def test_acknowledged_coap_publication_survives_sigkill(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    g = CoapGateway(gateway_factory)
    assert g.last_code("put", "ps/data/keep/me", "-e", "durable", "-t", "0") == "2.01"
    g.gw.restart(hard=True)
    wait_coap(g.coap_port)
    log, body = g.coap("get", "ps/data/keep/me")
    assert body == b"durable" and "Content-Format:text/plain" in log


def test_coap_publications_stored_and_forwarded_when_upstream_returns(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    from .test_store_forward import Collector, _config, _persistent_cloud

    port = free_port()
    start_upstream = _persistent_cloud(mosquitto_factory, port, tmp_path)
    g = CoapGateway(gateway_factory, extra=_config(port))
    sent = [json.dumps({"i": i}).encode() for i in range(20)]
    for i, p in enumerate(sent):
        method = "put" if i % 2 else "post"
        assert g.last_code(method, f"ps/data/sensors/c{i % 3}", "-e", p.decode(),
                           "-t", "50") in ("2.01", "2.04")
    g.gw.restart(hard=True)  # acknowledged means committed: even a SIGKILL loses nothing
    wait_coap(g.coap_port)
    start_upstream()
    cloud = Collector(port, "edge/#", client_id="cloud")
    try:
        got = {p for _, p, _ in cloud.wait_for(len(sent), 30)}
        assert got >= set(sent), f"{len(set(sent) - got)} of {len(sent)} lost"
    finally:
        cloud.close()


# --------------------------------------------------------------------------- OSCORE


def _oscore_client(ctx_dir: Path, url: str, method: str, payload: bytes = b"") -> str:
    """One request through aiocoap with OSCORE, in a subprocess; returns the code (or error)."""
    script = f"""
import asyncio, aiocoap
async def main():
    ctx = await aiocoap.Context.create_client_context()
    ctx.client_credentials.load_from_dict(
        {{"{url.rsplit('/ps', 1)[0]}/*": {{"oscore": {{"contextfile": {str(ctx_dir) + '/'!r}}}}}}})
    try:
        r = await asyncio.wait_for(ctx.request(aiocoap.Message(
            code=aiocoap.{method}, uri={url!r}, payload={payload!r})).response, 10)
        print(r.code.dotted, r.payload.decode(errors="replace"))
    except Exception as e:
        print("error", type(e).__name__, e)
    await ctx.shutdown()
asyncio.run(main())
"""
    import sys

    p = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    return (p.stdout.decode() + p.stderr.decode()).strip()


def _provision(oscore_dir: Path, name: str, tmp: Path) -> Path:
    """``oscore add NAME`` by the CLI; the device's side written as its context directory."""
    import sys

    made = subprocess.run(
        [sys.executable, "-m", "rapidmq_edge", "oscore", "add", name, "--oscore-dir",
         str(oscore_dir)], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    dev = tmp / f"device-{name}"
    dev.mkdir()
    (dev / "secret.json").write_text(made.stdout)
    return dev


def test_oscore_devices_provisioned_and_removed_while_the_gateway_runs(
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    """A device provisioned while the gateway runs is served within seconds, no restart (it
    used to need one); one whose context is removed is refused from then on (an erasure
    used to leave it served until a restart)."""
    import shutil

    oscore_dir = tmp_path / "oscore"
    oscore_dir.mkdir()
    g = CoapGateway(gateway_factory, oscore_dir=str(oscore_dir), require_oscore=True)
    dev = _provision(oscore_dir, "late", tmp_path)
    url = g.url("ps/data/late/t")

    def answers(want_ok: bool) -> str:  # bounded: the gateway looks every 2 s
        deadline = time.monotonic() + 10
        while True:
            out = _oscore_client(dev, url, "PUT", b"1")
            if out.startswith("2.") == want_ok or time.monotonic() > deadline:
                return out
            time.sleep(0.5)

    assert answers(True).startswith("2.01")
    assert "serving device late" in g.gw.log()
    shutil.rmtree(oscore_dir / "late")
    out = answers(False)
    assert not out.startswith("2."), out
    assert "device late no longer served" in g.gw.log()


def test_an_oscore_device_erased_through_the_api_is_refused_at_once(
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    import urllib.request

    from rapidmq_edge.security.tokens import add_token

    oscore_dir = tmp_path / "oscore"
    dev = _provision(oscore_dir, "gone", tmp_path)
    tokens = tmp_path / "tokens.toml"
    admin = add_token(tokens, "ops", "ops")
    http_port = free_port()
    g = CoapGateway(gateway_factory, oscore_dir=str(oscore_dir), require_oscore=True, extra={
        "http": {"listen": [f"http://{LOOPBACK}:{http_port}"], "tokens_file": str(tokens)}})
    url = g.url("ps/data/gone/t")
    assert _oscore_client(dev, url, "PUT", b"1").startswith("2.01")
    req = urllib.request.Request(
        f"http://{LOOPBACK}:{http_port}/api/v1/erase",
        json.dumps({"device": "gone", "oscore": True}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {admin}"},
        method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        report = json.loads(resp.read())
    assert resp.status == 200 and any("gone" in r for r in report["removed"]), report
    out = _oscore_client(dev, url, "PUT", b"2")  # at once, not after the next look (2 s)
    assert not out.startswith("2."), out


def test_oscore_contexts_authenticate_devices(
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    import sys

    oscore_dir = tmp_path / "oscore"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rapidmq_edge", "oscore", *args, "--oscore-dir",
             str(oscore_dir)], capture_output=True, text=True, timeout=30)

    added = cli("add", "dev1")  # provisioned by the CLI; the device's side printed once
    assert added.returncode == 0, added.stderr
    good = json.loads(added.stdout)
    again = cli("add", "dev1")
    assert again.returncode == 1 and "already has a context" in again.stderr
    assert cli("list").stdout.split() == ["dev1"]
    stored = json.loads((oscore_dir / "dev1" / "secret.json").read_text())
    assert stored["recipient-id_hex"] == good["sender-id_hex"]
    assert oct((oscore_dir / "dev1" / "secret.json").stat().st_mode & 0o777) == "0o600"
    g = CoapGateway(gateway_factory, oscore_dir=str(oscore_dir), require_oscore=True, extra={
        "auth": {"acl_default": "deny"},
        "acl": [{"user": "dev1", "topic": "devices/dev1/#", "access": "allow"},
                {"user": "*", "topic": "#", "action": "subscribe", "access": "allow"}],
    })
    sub = Sub(g.gw.port, "devices/#")
    try:
        dev = tmp_path / "device-dev1"
        dev.mkdir()
        (dev / "secret.json").write_text(json.dumps(good))
        url = g.url("ps/data/devices/dev1/t")
        assert _oscore_client(dev, url, "PUT", b"42").startswith("2.01")
        assert _oscore_client(dev, url, "GET").startswith("2.05 42")
        assert [(t, p) for t, p, _, _ in sub.wait(1)] == [("devices/dev1/t", b"42")]
        # the ACL applies to the context's name: dev1 may not write elsewhere
        assert _oscore_client(dev, g.url("ps/data/devices/dev2/t"), "PUT", b"1").startswith(
            "4.03")
        # the right ids with a wrong key: rejected (unprotected 4.00, surfaced as an error)
        wrong = tmp_path / "device-wrong"
        wrong.mkdir()
        (wrong / "secret.json").write_text(json.dumps(dict(good, secret_hex="00" * 32)))
        out = _oscore_client(wrong, url, "PUT", b"666")
        assert not out.startswith("2."), out
        # without OSCORE: 4.01 (require_oscore)
        assert g.last_code("put", "ps/data/devices/dev1/t", "-e", "plain") == "4.01"
        assert g.last_code("get", "ps/data/devices/dev1/t") == "4.01"
        time.sleep(0.3)
        assert [p for _, p, _, _ in sub.wait(1)] == [b"42"], "nothing else got through"
    finally:
        sub.close()
