"""Interoperability with three independent MQTT client implementations.

paho-mqtt 2.x (threads), the mosquitto_pub / mosquitto_sub command-line clients
(libmosquitto, subprocesses) and amqtt's asyncio client (``asyncio.run`` in a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from amqtt.client import MQTTClient

from .gateway_proc import GatewayProcess
from .mqtt_helpers import (
    LOOPBACK,
    MOSQUITTO_PUB,
    MOSQUITTO_SUB,
    ClientTracker,
    MosquittoSub,
    PahoClient,
    mosquitto_pub,
    unique,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

if shutil.which(MOSQUITTO_PUB) is None or shutil.which(MOSQUITTO_SUB) is None:
    pytest.skip("mosquitto clients not installed (run `make system-deps`)",
                allow_module_level=True)

AMQTT_CONFIG: dict[str, Any] = {
    "auto_reconnect": False,
    "keep_alive": 30,
    "plugins": {},
}
MSGS = 3


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("gwinterop")).start()
    yield g
    g.stop()


@pytest.fixture
def clients(gw: GatewayProcess) -> Iterator[ClientTracker]:
    tracker = ClientTracker(gw.port)
    yield tracker
    tracker.close_all()


def _uri(port: int) -> str:
    return f"mqtt://{LOOPBACK}:{port}/"


# =========================================================================== amqtt


class AmqttSubscriber:
    """An amqtt client subscribed in a background thread (``asyncio.run`` there) that
    collects ``count`` messages; ``start()`` returns once the SUBACK arrived."""

    def __init__(self, port: int, topic: str, qos: int, count: int,
                 timeout: float = 5.0) -> None:
        self.port, self.topic, self.qos, self.count, self.timeout = (
            port, topic, qos, count, timeout)
        self.granted: list[int] = []
        self.received: list[tuple[str, bytes, int, bool]] = []
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        client = MQTTClient(client_id=unique("amqtt-sub"), config=AMQTT_CONFIG)
        try:
            await asyncio.wait_for(client.connect(_uri(self.port)), self.timeout)
            self.granted = await asyncio.wait_for(
                client.subscribe([(self.topic, self.qos)]), self.timeout)
            self._ready.set()
            deadline = time.monotonic() + self.timeout
            while len(self.received) < self.count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    msg = await client.deliver_message(timeout_duration=left)
                except TimeoutError:
                    break
                if msg is None:
                    break
                self.received.append(
                    (msg.topic, bytes(msg.data), int(msg.qos or 0), bool(msg.retain)))
        except BaseException as exc:  # reported by start()/result()
            self.error = exc
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 3)

    def start(self) -> AmqttSubscriber:
        self._thread.start()
        assert self._ready.wait(self.timeout + 1), "amqtt subscriber did not get ready"
        assert self.error is None, f"amqtt subscriber failed: {self.error!r}"
        return self

    def result(self) -> list[tuple[str, bytes, int, bool]]:
        self._thread.join(self.timeout + 5)
        assert not self._thread.is_alive(), "amqtt subscriber thread did not finish"
        assert self.error is None, f"amqtt subscriber failed: {self.error!r}"
        return self.received

    def stop(self) -> None:
        self._thread.join(self.timeout + 5)


async def _amqtt_publish(port: int, topic: str, payloads: list[bytes], qos: int,
                         retain: bool = False) -> None:
    client = MQTTClient(client_id=unique("amqtt-pub"), config=AMQTT_CONFIG)
    await asyncio.wait_for(client.connect(_uri(port)), 5)
    try:
        for p in payloads:
            await asyncio.wait_for(client.publish(topic, p, qos=qos, retain=retain), 5)
    finally:
        await asyncio.wait_for(client.disconnect(), 5)


def amqtt_publish(port: int, topic: str, payloads: list[bytes], qos: int,
                  retain: bool = False) -> None:
    asyncio.run(_amqtt_publish(port, topic, payloads, qos, retain))


# =========================================================================== matrix

IMPLS = ["paho", "mosquitto", "amqtt"]


def _mosquitto_pub_lines(port: int, topic: str, payloads: list[bytes], qos: int) -> None:
    """One mosquitto_pub connection sending each stdin line as a message (``-l``)."""
    res = subprocess.run(
        [MOSQUITTO_PUB, "-h", LOOPBACK, "-p", str(port), "-t", topic,
         "-q", str(qos), "-V", "mqttv311", "-i", unique("mpub"), "-l"],
        input=b"".join(p + b"\n" for p in payloads), capture_output=True, timeout=10,
    )
    assert res.returncode == 0, f"mosquitto_pub -l failed: {res.stderr!r}"


@pytest.mark.parametrize("sub_impl", IMPLS)
@pytest.mark.parametrize("pub_impl", IMPLS)
def test_pubsub_matrix(gw: GatewayProcess, clients: ClientTracker, pub_impl: str,
                       sub_impl: str) -> None:
    """Same QoS 1 round trip for every publisher x subscriber implementation pair."""
    topic = f"{unique('matrix')}/{pub_impl}/{sub_impl}"
    payloads = [f"{pub_impl}-to-{sub_impl}-{i}".encode() for i in range(MSGS)]
    qos = 1
    paho_sub = msub = asub = None
    if sub_impl == "paho":
        paho_sub = clients.connected()
        assert paho_sub.subscribe(topic, qos) == [qos]
    elif sub_impl == "mosquitto":
        msub = MosquittoSub(gw.port, topic, MSGS, qos=qos, fmt="%q|%t|%p")
    else:
        asub = AmqttSubscriber(gw.port, topic, qos, MSGS)
    try:
        if msub is not None:
            msub.ready()
        if asub is not None:
            asub.start()
            assert asub.granted == [qos]
        if pub_impl == "paho":
            pub = clients.connected()
            for p in payloads:
                pub.publish(topic, p, qos=qos)
        elif pub_impl == "mosquitto":
            _mosquitto_pub_lines(gw.port, topic, payloads, qos)
        else:
            amqtt_publish(gw.port, topic, payloads, qos)

        if paho_sub is not None:
            got = [(m.topic, m.payload, m.qos) for m in paho_sub.get_n(MSGS)]
            paho_sub.assert_no_message(0.2)
        elif msub is not None:
            lines = msub.wait()
            got = []
            for line in lines:
                q, t, p = line.split("|", 2)
                got.append((t, p.encode(), int(q)))
        else:
            assert asub is not None
            got = [(t, p, q) for t, p, q, _r in asub.result()]
        assert got == [(topic, p, qos) for p in payloads], f"{pub_impl} -> {sub_impl}"
    finally:
        if msub is not None:
            msub.stop()
        if asub is not None:
            asub.stop()


# =========================================================================== mosquitto


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_pub_sub(gw: GatewayProcess, version: str, qos: int) -> None:
    """``mosquitto_sub -C N`` receives what ``mosquitto_pub`` sends, in order, at the QoS."""
    topic = unique(f"mosq{qos}")
    with MosquittoSub(gw.port, topic, MSGS, qos=qos, version=version,
                      fmt="%q|%r|%t|%p") as msub:
        msub.ready()
        for i in range(MSGS):
            mosquitto_pub(gw.port, topic, f"msg-{i}", qos=qos, version=version)
        lines = msub.wait()
    assert lines == [f"{qos}|0|{topic}|msg-{i}" for i in range(MSGS)]


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_retained(gw: GatewayProcess, clients: ClientTracker, version: str) -> None:
    """``mosquitto_pub -r`` sets a retained message, ``-r -n`` clears it."""
    topic = unique("mosqret")
    mosquitto_pub(gw.port, topic, "keep-me", qos=1, retain=True, version=version)
    with MosquittoSub(gw.port, topic, 1, qos=1, version=version, fmt="%q|%r|%p") as msub:
        lines = msub.wait()
    assert lines == ["1|1|keep-me"], "new subscriber gets the retained message, RETAIN=1"
    mosquitto_pub(gw.port, topic, None, qos=1, retain=True, version=version)
    late = clients.connected()
    late.subscribe(topic, 1)
    late.assert_no_message(0.5)


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_sub_wildcard_from_paho(gw: GatewayProcess, clients: ClientTracker,
                                          version: str) -> None:
    base = unique("mosqwild")
    with MosquittoSub(gw.port, f"{base}/+/temp", 2, qos=2, version=version,
                      fmt="%q|%t|%p") as msub:
        msub.ready()
        pub = clients.connected()
        pub.publish(f"{base}/a/temp", b"1", qos=2)
        pub.publish(f"{base}/a/humidity", b"x", qos=2)
        pub.publish(f"{base}/b/temp", b"2", qos=1)
        lines = msub.wait()
    # Order across QoS levels is not guaranteed (libmosquitto hands a QoS 2 message to the
    # application only at PUBREL), so compare as a set.
    assert sorted(lines) == sorted([f"2|{base}/a/temp|1", f"1|{base}/b/temp|2"])


# =========================================================================== amqtt


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_amqtt_pubsub(gw: GatewayProcess, qos: int) -> None:
    """amqtt connects, subscribes (granted QoS), publishes and receives at QoS 0/1/2."""
    topic = unique(f"amqtt{qos}")

    async def main() -> tuple[list[int], list[tuple[str, bytes, int]]]:
        sub = MQTTClient(client_id=unique("amqtt-s"), config=AMQTT_CONFIG)
        pub = MQTTClient(client_id=unique("amqtt-p"), config=AMQTT_CONFIG)
        await asyncio.wait_for(sub.connect(_uri(gw.port)), 5)
        try:
            granted = await asyncio.wait_for(sub.subscribe([(topic, qos)]), 5)
            await asyncio.wait_for(pub.connect(_uri(gw.port)), 5)
            try:
                for i in range(MSGS):
                    await asyncio.wait_for(pub.publish(topic, f"a{i}".encode(), qos=qos), 5)
            finally:
                await asyncio.wait_for(pub.disconnect(), 5)
            got = []
            for _ in range(MSGS):
                m = await sub.deliver_message(timeout_duration=5)
                assert m is not None
                got.append((m.topic, bytes(m.data), int(m.qos or 0)))
            return granted, got
        finally:
            await asyncio.wait_for(sub.disconnect(), 5)

    granted, got = asyncio.run(main())
    assert granted == [qos]
    assert got == [(topic, f"a{i}".encode(), qos) for i in range(MSGS)]


def test_amqtt_receives_retained_and_from_paho(gw: GatewayProcess,
                                               clients: ClientTracker) -> None:
    topic = unique("amqttret")
    pub = clients.connected()
    pub.publish(topic, b"retained", qos=1, retain=True)
    asub = AmqttSubscriber(gw.port, topic, 2, 2).start()
    try:
        pub.publish(topic, b"live", qos=2)
        got = asub.result()
    finally:
        asub.stop()
        pub.publish(topic, b"", qos=1, retain=True)
    assert got == [(topic, b"retained", 1, True), (topic, b"live", 2, False)]


def test_paho_v311_to_v5_and_back(gw: GatewayProcess) -> None:
    """A 3.1.1 client and a 5.0 client (both paho) exchange messages through the gateway."""
    from .mqtt_helpers import MQTTv5

    t = unique("mixed")
    with PahoClient(gw.port) as v3, PahoClient(gw.port, protocol=MQTTv5) as v5:
        assert v3.subscribe(f"{t}/to3", 2) == [2]
        assert v5.subscribe(f"{t}/to5", 2) == [2]
        v5.publish(f"{t}/to3", b"from5", qos=2)
        v3.publish(f"{t}/to5", b"from3", qos=1)
        m3, m5 = v3.get(), v5.get()
        assert (m3.payload, m3.qos) == (b"from5", 2)
        assert (m5.payload, m5.qos) == (b"from3", 1)
