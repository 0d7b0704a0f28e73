"""UplinkClient against real Mosquitto brokers (and a nats-server cluster) on loopback.

The "cloud consumer" is a paho-mqtt subscriber thread; the queue is :class:`MemorySource`.
Every test runs its client under ``asyncio.run`` with bounded waits.
"""

from __future__ import annotations

import asyncio
import datetime
import heapq
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from rapidmq_edge.mqtt.properties import encode_properties
from rapidmq_edge.uplink import Backoff, Outgoing, UplinkClient

from .conftest import (
    LOOPBACK,
    MOSQUITTO_BIN,
    MosquittoBroker,
    free_port,
    start_mosquitto_on,
    wait_for_port,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

# Mosquitto drops QoS 1 messages for a subscriber beyond 1000 queued by default.
UNLIMITED = "max_queued_messages 0\n"


# =========================================================================== helpers


class MemorySource:
    """In-memory :class:`~rapidmq_edge.uplink.UplinkSource`: ids leased by fetch, oldest first."""

    def __init__(self) -> None:
        self.msgs: dict[int, Outgoing] = {}
        self._ready: list[int] = []
        self.leased: set[int] = set()
        self.acked: set[int] = set()
        self.ack_counts: Counter[int] = Counter()
        self.ack_calls = 0
        self.requeued = 0
        self._event = asyncio.Event()
        self._next = 0

    def put(self, topic: str, payload: bytes | None = None, qos: int = 1,
            properties: dict[str, Any] | None = None) -> int:
        i = self._next
        self._next += 1
        body = payload if payload is not None else b"%08d" % i + b"." * 56
        self.msgs[i] = Outgoing(i, topic, body, qos, encode_properties(properties))
        heapq.heappush(self._ready, i)
        self._event.set()
        return i

    def put_many(self, n: int, topic: str, qos: int = 1) -> None:
        for _ in range(n):
            self.put(topic, qos=qos)

    @property
    def pending(self) -> int:
        return len(self._ready)

    # --- UplinkSource
    def fetch(self, upstream: str, limit: int) -> list[Outgoing]:
        out: list[Outgoing] = []
        while self._ready and len(out) < limit:
            i = heapq.heappop(self._ready)
            self.leased.add(i)
            out.append(self.msgs[i])
        return out

    def ack(self, upstream: str, ids: list[int]) -> None:
        self.ack_calls += 1
        for i in ids:
            assert i in self.leased, f"ack of {i} which is not leased"
            self.leased.discard(i)
            self.acked.add(i)
            self.ack_counts[i] += 1

    def requeue(self, upstream: str, ids: list[int]) -> None:
        for i in ids:
            assert i in self.leased, f"requeue of {i} which is not leased"
            self.leased.discard(i)
            heapq.heappush(self._ready, i)
            self.requeued += 1
        if ids:
            self._event.set()

    async def wait_for_data(self, upstream: str) -> None:
        while not self._ready:
            self._event.clear()
            await self._event.wait()


class Subscriber:
    """A paho-mqtt subscriber thread collecting (id, user properties) per message."""

    def __init__(self, port: int, topic: str, qos: int = 1, v5: bool = True,
                 client_id: str | None = None, timeout: float = 5.0) -> None:
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                  protocol=proto)
        self.ids: list[int] = []
        self.props: list[list[tuple[str, str]]] = []
        self.payloads: list[bytes] = []
        self._subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos)
        self.granted: list[int] = []
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(LOOPBACK, port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(timeout) or any(c >= 0x80 for c in self.granted):
            self.close()
            raise AssertionError(f"subscription failed: {self.granted}")

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any,
                      props: Any = None) -> None:
        self.granted = [int(getattr(c, "value", c)) for c in codes]
        self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.payloads.append(bytes(msg.payload))
        try:
            self.ids.append(int(msg.payload[:8]))
        except ValueError:
            self.ids.append(-1)
        up = getattr(msg.properties, "UserProperty", None) if msg.properties else None
        self.props.append(list(up or []))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscribers() -> Iterator[Callable[..., Subscriber]]:
    made: list[Subscriber] = []

    def make(*args: Any, **kw: Any) -> Subscriber:
        s = Subscriber(*args, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


async def until(pred: Callable[[], Any], timeout: float, what: str = "condition") -> None:
    """Poll ``pred`` every 10 ms; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def url(port: int, scheme: str = "mqtt") -> str:
    return f"{scheme}://{LOOPBACK}:{port}"


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, maximum=0.5, factor=2, jitter=0.5)


async def run_client(client: UplinkClient, body: Callable[[], Any], timeout: float = 60) -> None:
    """Run ``client`` while awaiting ``body()``; always stop it and check the run task."""
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(body(), timeout)
    finally:
        await client.stop(drain_timeout=0.5)
        await asyncio.wait_for(task, 5)


def assert_no_leases(src: MemorySource) -> None:
    assert not src.leased, f"{len(src.leased)} messages still leased after stop"


# =========================================================================== unit


def test_backoff_is_exponential_capped_and_jittered() -> None:
    b = Backoff(initial=0.1, maximum=1.0, factor=2, jitter=0.5, rand=lambda: 0.5)
    assert [round(b.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    low = Backoff(initial=1, maximum=30, jitter=0.5, rand=lambda: 0.0)
    high = Backoff(initial=1, maximum=30, jitter=0.5, rand=lambda: 0.999999)
    assert low.next() == 0.5 and round(high.next(), 3) == 1.5
    assert b.next() == pytest.approx(0.1)


def test_bad_urls_rejected() -> None:
    with pytest.raises(ValueError):
        UplinkClient("u", ["http://x:1"], "c", MemorySource())
    with pytest.raises(ValueError):
        UplinkClient("u", [], "c", MemorySource())


# =========================================================================== mosquitto


@pytest.mark.parametrize("version", [4, 5])
def test_drains_5000_in_order(version: int, mosquitto_factory: Callable[..., MosquittoBroker],
                              subscribers: Callable[..., Subscriber]) -> None:
    broker = mosquitto_factory(UNLIMITED)
    sub = subscribers(broker.port, "up/#", 1, v5=True)
    n = 5000

    async def main() -> None:
        src = MemorySource()
        src.put_many(n, "up/data")
        client = UplinkClient("cloud", [url(broker.port)], f"gw-drain-{version}", src,
                              version=version, window=100, gateway_id="gw7")
        peak = 0

        async def body() -> None:
            nonlocal peak
            while len(src.acked) < n or len(sub.ids) < n:
                peak = max(peak, client.status()["inflight"])
                await asyncio.sleep(0.001)

        await run_client(client, body, 60)
        assert src.acked == set(range(n))
        assert src.ack_calls < n  # batched
        st = client.status()
        assert st["acked"] == n and st["sent"] == n and st["last_puback"] is not None
        assert st["max_inflight"] > 1 and peak > 1  # a window, not stop-and-wait
        assert_no_leases(src)

    asyncio.run(main())
    assert sub.ids == list(range(n))  # in order, no duplicates
    if version == 5:
        assert all(p == [("rmq-id", f"gw7:{i}")] for i, p in enumerate(sub.props))
    else:
        assert all(p == [] for p in sub.props)


def test_respects_receive_maximum(mosquitto_factory: Callable[..., MosquittoBroker],
                                  subscribers: Callable[..., Subscriber]) -> None:
    broker = mosquitto_factory(UNLIMITED + "max_inflight_messages 7\n")
    subscribers(broker.port, "up/#", 1)

    async def main() -> None:
        src = MemorySource()
        src.put_many(500, "up/x")
        client = UplinkClient("cloud", [url(broker.port)], "gw-rm", src, window=100)
        await run_client(client, lambda: until(lambda: len(src.acked) == 500, 30, "acks"))
        assert client.limit == 7
        assert 1 < client.max_inflight <= 7

    asyncio.run(main())


def test_qos0_acked_after_write(mosquitto_factory: Callable[..., MosquittoBroker],
                                subscribers: Callable[..., Subscriber]) -> None:
    broker = mosquitto_factory()
    sub = subscribers(broker.port, "up/#", 0)

    async def main() -> None:
        src = MemorySource()
        src.put_many(200, "up/q0", qos=0)
        client = UplinkClient("cloud", [url(broker.port)], "gw-q0", src)
        await run_client(client, lambda: until(lambda: len(sub.ids) == 200, 20, "delivery"))
        assert src.acked == set(range(200)) and client.max_inflight == 0

    asyncio.run(main())


def test_failover_skips_dead_first_url(mosquitto_factory: Callable[..., MosquittoBroker],
                                       subscribers: Callable[..., Subscriber]) -> None:
    broker = mosquitto_factory()
    sub = subscribers(broker.port, "up/#", 1)
    dead = free_port()

    async def main() -> None:
        src = MemorySource()
        src.put_many(100, "up/f")
        client = UplinkClient("cloud", [url(dead), url(broker.port)], "gw-dead", src,
                              backoff=fast_backoff(), connect_timeout=2)
        await run_client(client, lambda: until(lambda: len(src.acked) == 100, 20, "acks"))
        assert client.current_url == url(broker.port) and client.connected is False
        assert client.reconnects == 0 and client.failovers == 0

    asyncio.run(main())
    assert sorted(sub.ids) == list(range(100))


def test_failover_when_broker_killed_mid_stream(
        mosquitto_factory: Callable[..., MosquittoBroker],
        subscribers: Callable[..., Subscriber], caplog: pytest.LogCaptureFixture) -> None:
    a = mosquitto_factory(UNLIMITED)
    b = mosquitto_factory(UNLIMITED)
    # QoS 0 consumers: Mosquitto writes them out at once (a QoS 1 consumer only gets 20 in
    # flight, the rest would die queued inside the killed broker after it PUBACKed us).
    sub_a = subscribers(a.port, "up/#", 0)
    sub_b = subscribers(b.port, "up/#", 0)
    n = 5000
    # (an earlier test in this process may have set the root logger's level higher)
    caplog.set_level(logging.WARNING, logger="rapidmq_edge.uplink")

    async def main() -> None:
        src = MemorySource()
        client = UplinkClient("cloud", [url(a.port), url(b.port)], "gw-kill", src,
                              backoff=fast_backoff(), connect_timeout=2)

        async def body() -> None:
            # Feed gradually so the kill happens while messages are in flight.
            for i in range(n):
                src.put("up/k")
                if i % 50 == 0:
                    await asyncio.sleep(0.002)
                if i == n // 3:
                    await until(lambda: len(src.acked) > 500, 10, "first acks")
                    a.stop()
            await until(lambda: len(src.acked) == n, 30, "all acks")
            await until(lambda: len(set(sub_a.ids) | set(sub_b.ids)) >= n, 10, "delivery")

        await run_client(client, body, 60)
        assert client.current_url == url(b.port)
        assert client.failovers >= 1 and client.reconnects >= 1
        assert src.acked == set(range(n))
        assert_no_leases(src)
        # the operator is told when it went, not only that a reconnect later failed
        lost = [r.getMessage() for r in caplog.records if "lost the connection" in
                r.getMessage()]
        assert lost and re.fullmatch(
            rf"uplink cloud: lost the connection to {re.escape(url(a.port))} \(.+\); "
            r"\d+ in flight go again", lost[0]), lost

    asyncio.run(main())
    got = Counter(sub_a.ids) + Counter(sub_b.ids)
    assert set(got) == set(range(n))
    assert -1 not in got  # duplicates, if any, are re-sends of the same queue id


def test_upstream_down_at_start(tmp_path: Path, subscribers: Callable[..., Subscriber],
                                caplog: pytest.LogCaptureFixture) -> None:
    if shutil.which(MOSQUITTO_BIN) is None:
        pytest.skip("mosquitto not installed")
    port = free_port()
    brokers: list[MosquittoBroker] = []
    caplog.set_level(logging.INFO, logger="rapidmq_edge.uplink")

    async def main() -> None:
        src = MemorySource()
        src.put_many(300, "up/late")
        client = UplinkClient("cloud", [url(port)], "gw-late", src, connect_timeout=1,
                              backoff=Backoff(initial=0.05, maximum=0.4))

        async def body() -> None:
            await asyncio.sleep(1.5)
            assert not client.connected and client.last_error
            assert src.pending == 300
            brokers.append(start_mosquitto_on(tmp_path, port, UNLIMITED))
            await until(lambda: len(src.acked) == 300, 15, "drain after broker start")

        await run_client(client, body, 30)

    try:
        asyncio.run(main())
    finally:
        for b in brokers:
            b.stop()
    # the failed attempts: one line when they began, their count when the broker answered
    lines = [r.getMessage() for r in caplog.records if url(port) in r.getMessage()]
    assert len([m for m in lines if "failed" in m]) == 1, lines
    again = [m for m in lines if "reachable again" in m]
    assert len(again) == 1 and re.search(r"after (\d+) occurrence", again[0]), lines
    assert int(re.findall(r"after (\d+) occurrence", again[0])[0]) >= 3, again


def test_half_open_detected_by_keep_alive(mosquitto_factory: Callable[..., MosquittoBroker],
                                          subscribers: Callable[..., Subscriber]) -> None:
    a = mosquitto_factory(UNLIMITED)
    b = mosquitto_factory(UNLIMITED)
    sub_b = subscribers(b.port, "up/#", 1)
    keep_alive = 2

    async def main() -> None:
        src = MemorySource()
        src.put_many(10, "up/h")
        client = UplinkClient("cloud", [url(a.port), url(b.port)], "gw-half", src,
                              keep_alive=keep_alive, connect_timeout=1, backoff=fast_backoff())

        async def body() -> None:
            await until(lambda: len(src.acked) == 10, 10, "first batch")
            assert client.current_url == url(a.port)
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                src.put_many(10, "up/h")  # sent into the frozen broker, never acked there
                await until(lambda: client.current_url == url(b.port) and client.connected,
                            keep_alive * 1.5 + 3, "failover after half-open")
                assert time.monotonic() - t0 <= keep_alive * 1.5 + 2
                await until(lambda: len(src.acked) == 20, 10, "drain on b")
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)

        await run_client(client, body, 30)
        assert "no packet from server" in (client.last_error or "") or client.failovers == 1

    asyncio.run(main())
    assert set(range(10, 20)) <= set(sub_b.ids)


def test_downstream_subscriptions(mosquitto_factory: Callable[..., MosquittoBroker]) -> None:
    broker = mosquitto_factory()
    got: list[tuple[str, bytes, int]] = []

    def on_message(topic: str, payload: bytes, qos: int, props: dict[str, Any]) -> None:
        got.append((topic, payload, qos))

    async def main() -> None:
        src = MemorySource()
        client = UplinkClient("cloud", [url(broker.port)], "gw-down", src, version=5,
                              subscriptions=[("down/+/cmd", 2), ("cfg/#", 1)],
                              on_message=on_message)

        async def body() -> None:
            await until(lambda: client.connected and client.suback_codes, 5, "SUBACK")
            assert client.suback_codes == [2, 1]
            pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            pub.connect(LOOPBACK, broker.port)
            pub.loop_start()
            try:
                for q in (0, 1, 2):
                    pub.publish("down/dev1/cmd", b"c%d" % q, qos=q).wait_for_publish(5)
                pub.publish("cfg/a/b", b"cfg", qos=1).wait_for_publish(5)
                pub.publish("other", b"no", qos=1).wait_for_publish(5)
                await until(lambda: len(got) >= 4, 5, "downstream messages")
                await asyncio.sleep(0.3)  # no duplicates arrive late (QoS 2)
            finally:
                pub.disconnect()
                pub.loop_stop()

        await run_client(client, body, 20)

    asyncio.run(main())
    assert sorted(got) == sorted([
        ("down/dev1/cmd", b"c0", 0), ("down/dev1/cmd", b"c1", 1),
        ("down/dev1/cmd", b"c2", 2), ("cfg/a/b", b"cfg", 1),
    ])


def test_v5_negative_puback_requeues_with_delay(
        mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite ok/#\n")
    broker = mosquitto_factory(f"acl_file {acl}\n")

    async def main() -> None:
        src = MemorySource()
        src.put_many(5, "ok/x")
        denied = [src.put("denied/x") for _ in range(3)]
        client = UplinkClient("cloud", [url(broker.port)], "gw-nack", src, nack_delay=0.3)

        async def body() -> None:
            await until(lambda: client.nacked >= 3, 10, "negative PUBACKs")
            assert src.acked == set(range(5))
            assert set(denied) <= src.leased  # held back, not deleted
            await until(lambda: src.requeued >= 3, 2, "delayed requeue")
            await until(lambda: client.nacked >= 6, 5, "second attempt")

        await run_client(client, body, 20)
        assert not (set(denied) & src.acked)
        assert_no_leases(src)

    asyncio.run(main())


# =========================================================================== TLS


def _make_ca_and_server_cert(d: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "uplink test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = d / "ca.pem", d / "server.pem", d / "server.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def test_tls_with_custom_ca(tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker],
                            subscribers: Callable[..., Subscriber]) -> None:
    ca, cert, key = _make_ca_and_server_cert(tmp_path)
    tls_port = free_port()
    broker = mosquitto_factory(f"listener {tls_port} {LOOPBACK}\n"
                               f"certfile {cert}\nkeyfile {key}\ncafile {ca}\n")
    assert wait_for_port(LOOPBACK, tls_port, 5)
    sub = subscribers(broker.port, "up/#", 1)

    async def main() -> None:
        src = MemorySource()
        src.put_many(200, "up/tls")
        ctx = ssl.create_default_context(cafile=str(ca))
        client = UplinkClient("cloud", [url(tls_port, "mqtts")], "gw-tls", src, tls=ctx)
        await run_client(client, lambda: until(lambda: len(src.acked) == 200, 15, "acks"))
        # Without our CA the default context must refuse the server.
        src2 = MemorySource()
        src2.put("up/tls")
        bad = UplinkClient("cloud", [url(tls_port, "mqtts")], "gw-tls2", src2,
                           backoff=fast_backoff())
        await run_client(bad, lambda: until(lambda: bad.last_error is not None, 5, "error"))
        assert "CERTIFICATE_VERIFY_FAILED" in (bad.last_error or "") and not src2.acked

    asyncio.run(main())
    assert sorted(sub.ids) == list(range(200))


# =========================================================================== nats cluster

NATS_BIN = "/usr/sbin/nats-server"


def _start_nats_cluster(tmp: Path, n: int = 3) -> tuple[list[subprocess.Popen[bytes]],
                                                         list[int]]:
    # all 3n ports held at once while picking, so none is handed out twice
    holders = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3 * n)]
    for h in holders:
        h.bind((LOOPBACK, 0))
    picked = [int(h.getsockname()[1]) for h in holders]
    for h in holders:
        h.close()
    client_ports, cluster_ports, mqtt_ports = picked[:n], picked[n:2 * n], picked[2 * n:]
    routes = ", ".join(f"nats-route://{LOOPBACK}:{p}" for p in cluster_ports)
    procs: list[subprocess.Popen[bytes]] = []
    for i in range(n):
        conf = tmp / f"nats{i}.conf"
        conf.write_text(
            f"server_name: n{i}\nlisten: {LOOPBACK}:{client_ports[i]}\n"
            f"jetstream {{ store_dir: '{tmp / f'js{i}'}' }}\n"
            f"cluster {{ name: up, listen: {LOOPBACK}:{cluster_ports[i]}, routes: [{routes}] }}\n"
            f"mqtt {{ listen: {LOOPBACK}:{mqtt_ports[i]} }}\n"
        )
        log = open(tmp / f"nats{i}.log", "wb")  # noqa: SIM115 - owned by the process
        procs.append(subprocess.Popen([NATS_BIN, "-c", str(conf)], stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    return procs, mqtt_ports


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.mark.slow
@pytest.mark.timeout(250)
def test_nats_cluster_failover(tmp_path: Path, subscribers: Callable[..., Subscriber]) -> None:
    if shutil.which(NATS_BIN) is None:
        pytest.skip("nats-server not installed")
    n = 1500
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # nats opens its MQTT listener only once JetStream is up, which in a cluster waits
        # for a meta leader: allow for a slow CI machine, and start over on fresh ports once
        # if another test took one of ours in the meantime
        for attempt in range(2):
            run_dir = tmp_path / f"attempt{attempt}"
            run_dir.mkdir()
            procs, ports = _start_nats_cluster(run_dir)
            if all(wait_for_port(LOOPBACK, p, 45) for p in ports):
                break
            logs = "\n".join(f"--- nats{k}: exit {pr.poll()}\n"
                              + (run_dir / f"nats{k}.log").read_text(errors="replace")[-1500:]
                              for k, pr in enumerate(procs))
            _stop_all(procs)
            if attempt == 1:
                raise AssertionError(f"nats MQTT listeners did not come up\n{logs}")
        # JetStream needs a meta leader and the MQTT streams before QoS 1 subscriptions work.
        deadline = time.monotonic() + 30
        while True:
            try:
                Subscriber(ports[1], "probe/#", 1, v5=False, timeout=5).close()
                break
            except (AssertionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        sub = subscribers(ports[1], "up/#", 1, v5=False, client_id="cloud-sub", timeout=10)

        async def main() -> None:
            src = MemorySource()
            client = UplinkClient("cloud", [url(ports[0]), url(ports[1]), url(ports[2])],
                                  "gw-nats", src, version=4, connect_timeout=3,
                                  backoff=fast_backoff())

            async def body() -> None:
                for i in range(n):
                    src.put("up/n")
                    if i % 50 == 0:
                        await asyncio.sleep(0.005)
                    if i == n // 3:
                        await until(lambda: len(src.acked) > 200, 30, "first acks")
                        assert client.current_url == url(ports[0])
                        procs[0].kill()
                await until(lambda: len(src.acked) == n, 60, "all acks")
                await until(lambda: set(range(n)) <= set(sub.ids), 30, "delivery via node 2")

            await run_client(client, body, 120)
            assert client.current_url != url(ports[0]) and client.failovers >= 1
            assert_no_leases(src)

        asyncio.run(main())
    finally:
        _stop_all(procs)
