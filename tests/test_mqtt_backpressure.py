"""Backpressure under a QoS 0 flood, with real clients (issue 17 part 1).

A ``mosquitto_pub -l`` publisher floods the gateway with numbered 1 KiB messages:

* a paho subscriber that drains as fast as it can (slower than the publisher) gets every
  message, in order, and the gateway counts no drop: the publisher is paused early enough;
* a raw subscriber that never reads is bounded: what it holds (socket buffers + the
  gateway's ``HIGH_WATER``) plus what the gateway counted as dropped is exactly what was
  published, and a draining subscriber of the same topic still gets everything (the stalled
  one holds the publisher back for at most ``PRESSURE_TIMEOUT``).
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from rapidmq_edge.broker.flow_control import HIGH_WATER

from .conftest import _require_binary
from .gateway_proc import GatewayProcess
from .mqtt_helpers import (
    LOOPBACK,
    MOSQUITTO_PUB,
    PahoClient,
    build_connect,
    build_publish,
    build_subscribe,
    unique,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

SIZE = 1024  # payload bytes (with mosquitto_pub's line: 1023 characters + the newline)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    _require_binary(MOSQUITTO_PUB)
    g = GatewayProcess(tmp_path_factory.mktemp("gwbp"),
                       {"mqtt": {"max_queued_messages": 100000}}).start()
    yield g
    g.stop()


class CountingSubscriber:
    """A paho subscriber that counts numbered messages and notes any gap or disorder."""

    def __init__(self, port: int, topic: str) -> None:
        self.received = 0
        self.out_of_order = 0
        self._next = 0
        self._subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("bp-sub"),
                        protocol=mqtt.MQTTv311)
        c.on_message = self._on_message
        c.on_subscribe = lambda *_a: self._subscribed.set()
        c.connect(LOOPBACK, port, keepalive=60)
        c.loop_start()
        c.subscribe(topic, qos=0)
        assert self._subscribed.wait(5), "no SUBACK"
        self.client = c

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        seq = int(msg.payload[:8])
        if seq != self._next:
            self.out_of_order += 1
        self._next = seq + 1
        self.received += 1

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _flood_file(tmp: Path, n: int) -> Path:
    path = tmp / f"flood-{n}.txt"
    pad = "x" * (SIZE - 9)
    path.write_text("".join(f"{i:08d}{pad}\n" for i in range(n)))
    return path


def _flood(port: int, topic: str, lines: Path, timeout: float) -> None:
    """Publish every line of ``lines`` at QoS 0 with ``mosquitto_pub -l`` (bounded)."""
    with open(lines, "rb") as src:
        res = subprocess.run(
            [MOSQUITTO_PUB, "-h", LOOPBACK, "-p", str(port), "-t", topic, "-q", "0", "-l",
             "-i", unique("bp-pub")],
            stdin=src, capture_output=True, timeout=timeout, check=False)
    assert res.returncode == 0, res.stderr


def _raw_flood(port: int, topic: str, n: int, timeout: float) -> None:
    """Publish ``n`` numbered messages at QoS 0 from a raw socket, as fast as the gateway
    takes them (one ``sendall`` of the pre-encoded packets: faster than the gateway reads)."""
    pad = b"x" * (SIZE - 8)
    data = b"".join(build_publish(topic, b"%08d" % i + pad) for i in range(n))
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(build_connect(unique("bp-raw-pub")))
        assert s.recv(4)[:1] == b"\x20"  # CONNACK
        s.sendall(data)
        s.sendall(b"\xe0\x00")  # DISCONNECT


def _dropped(port: int) -> int:
    """The gateway's ``$SYS`` drop counter, once it has been published after now."""
    with PahoClient(port) as c:
        c.subscribe("$SYS/broker/publish/messages/dropped")
        c.get(5)  # the retained value, possibly older than the flood
        return int(c.get(5).payload)  # the next one (published every second)


@pytest.mark.parametrize("publisher", ["mosquitto_pub", "raw"])
def test_draining_subscriber_loses_nothing(
    gw: GatewayProcess, tmp_path: Path, publisher: str,
) -> None:
    n = 60_000  # ~60 MiB, several times HIGH_WATER
    topic = unique("bp/drain")
    lines = _flood_file(tmp_path, n) if publisher == "mosquitto_pub" else None
    sub = CountingSubscriber(gw.port, topic)
    try:
        before = _dropped(gw.port)
        if lines is not None:
            _flood(gw.port, topic, lines, 40)
        else:
            _raw_flood(gw.port, topic, n, 40)
        assert wait_until(lambda: sub.received >= n, 20), f"{sub.received} of {n} received"
        time.sleep(0.2)  # nothing more (a duplicate) arrives
        assert sub.received == n
        assert sub.out_of_order == 0
        assert _dropped(gw.port) == before
    finally:
        sub.stop()


def _stalled_subscriber(port: int, topic: str) -> socket.socket:
    """A raw MQTT 3.1.1 subscriber with a tiny receive buffer that will not read."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect((LOOPBACK, port))
    s.sendall(build_connect(unique("bp-stalled"), keepalive=120))
    assert s.recv(4)[:1] == b"\x20"  # CONNACK
    s.sendall(build_subscribe(1, [(topic, 0)]))
    assert s.recv(5)[:1] == b"\x90"  # SUBACK
    return s


def _count_publishes(s: socket.socket, quiet: float = 1.0) -> tuple[int, int]:
    """Read until ``quiet`` seconds pass without data: (PUBLISH packets, bytes)."""
    s.settimeout(quiet)
    buf = bytearray()
    count = total = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(1 << 20)
        except TimeoutError:
            break
        if not chunk:
            break
        buf += chunk
        total += len(chunk)
        pos = 0
        while True:  # whole packets only: fixed header, remaining length (varint)
            if pos + 2 > len(buf):
                break
            mult, length, i = 1, 0, pos + 1
            while i < len(buf):
                b = buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            else:
                break
            if i + length > len(buf):
                break
            if buf[pos] >> 4 == 3:
                count += 1
            pos = i + length
        del buf[:pos]
    return count, total


def test_stalled_subscriber_is_bounded_and_holds_nobody_back(
    gw: GatewayProcess, tmp_path: Path,
) -> None:
    n = 40_000  # ~40 MiB: more than HIGH_WATER and every socket buffer on the way
    topic = unique("bp/stall")
    lines = _flood_file(tmp_path, n)
    stalled = _stalled_subscriber(gw.port, topic)
    healthy = CountingSubscriber(gw.port, topic)
    try:
        before = _dropped(gw.port)
        t0 = time.monotonic()
        _flood(gw.port, topic, lines, 40)
        assert wait_until(lambda: healthy.received >= n, 20), (
            f"the draining subscriber got {healthy.received} of {n}")
        took = time.monotonic() - t0
        assert healthy.out_of_order == 0
        dropped = _dropped(gw.port) - before
        held, held_bytes = _count_publishes(stalled)
        # every message either sits in the stalled client's path or was counted as dropped
        assert held + dropped == n, (held, dropped)
        assert dropped > 0
        # bounded: the gateway's HIGH_WATER plus the kernel's socket buffers on the way
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
        assert held_bytes <= HIGH_WATER + wmem_max + (1 << 20), held_bytes
        assert took < 25, f"the stalled subscriber held the flood back for {took:.1f} s"
    finally:
        healthy.stop()
        stalled.close()
