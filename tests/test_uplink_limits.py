"""Uplink limits: the PUBACK fast path, the server's Maximum Packet Size (``too_large``
drops) and the configurable reconnect backoff cap (``reconnect_max_s``).

Real Mosquitto brokers, a real SQLite forward queue, a real gateway process for $SYS.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from rapidmq_edge.config import ConfigError, parse_config
from rapidmq_edge.gateway.forwarding import build_forward_path, build_uplinks
from rapidmq_edge.mqtt.codec import PacketReader
from rapidmq_edge.mqtt.packets import MQTT_5, PUBLISH
from rapidmq_edge.mqtt.properties import decode_properties, encode_properties
from rapidmq_edge.store.forward_queue import ForwardQueue
from rapidmq_edge.uplink.ackscan import leading_pubacks
from rapidmq_edge.uplink.client import UplinkClient, _v5_properties

from .conftest import LOOPBACK, MosquittoBroker
from .gateway_proc import GatewayProcess

pytestmark = pytest.mark.timeout(60)

V2 = mqtt.CallbackAPIVersion.VERSION2


# =========================================================================== PUBACK scan


def test_leading_pubacks_pure_run() -> None:
    data = b"".join(bytes((0x40, 2, pid >> 8, pid & 0xFF)) for pid in (1, 300, 65535))
    assert leading_pubacks(data, False) == ([(1, 0), (300, 0), (65535, 0)], 12)
    assert leading_pubacks(data, True) == ([(1, 0), (300, 0), (65535, 0)], 12)


def test_leading_pubacks_stops_where_the_general_reader_must_take_over() -> None:
    ack = b"\x40\x02\x00\x07"
    # a trailing incomplete PUBACK, a PUBLISH, a packet id 0: not taken
    assert leading_pubacks(ack + b"\x40\x02\x00", False) == ([(7, 0)], 4)
    assert leading_pubacks(ack + b"\x30\x05\x00\x01ax", False) == ([(7, 0)], 4)
    assert leading_pubacks(ack + b"\x40\x02\x00\x00" + ack, False) == ([(7, 0)], 4)
    assert leading_pubacks(b"\x40\x02\x00\x00", False) == ([], 0)
    # MQTT 5: reason codes (with or without an empty property block); 3.1.1 has none
    v5 = b"\x40\x03\x00\x08\x10" + b"\x40\x04\x00\x09\x87\x00" + ack
    assert leading_pubacks(v5, True) == ([(8, 0x10), (9, 0x87), (7, 0)], 15)
    assert leading_pubacks(v5, False) == ([], 0)
    # properties present: left to the general reader
    assert leading_pubacks(b"\x40\x07\x00\x08\x10\x03\x1f\x00\x00", True) == ([], 0)
    assert leading_pubacks(b"\x40\x03\x00\x08", True) == ([], 0)  # incomplete


def test_fast_path_matches_the_general_reader() -> None:
    """Whatever the scanner takes, the general reader decodes to the same ids/codes."""
    data = (b"\x40\x02\x01\x02" * 5 + b"\x40\x03\x00\x08\x10" + b"\x40\x04\x00\x09\x87\x00"
            + b"\x40\x02\x00\x05")
    acks, used = leading_pubacks(data, True)
    packets = PacketReader(version=MQTT_5).feed(data)
    assert used == len(data)
    assert acks == [(p.packet_id, p.reason_code) for p in packets]  # type: ignore[attr-defined]


# =========================================================================== properties


@pytest.mark.parametrize("props", [
    {},
    {"content_type": "text/plain", "user_property": [("a", "1"), ("b", "2")]},
    {"user_property": [("k" * 60, "v" * 100)], "correlation_data": b"x" * 200},  # >127 B
])
def test_v5_properties_append_rmq_id_after_own_user_properties(props: dict[str, Any]) -> None:
    block = _v5_properties(encode_properties(props), b"gw:42")
    decoded, end = decode_properties(block, 0, len(block), PUBLISH)
    assert end == len(block)
    want = dict(props)
    want["user_property"] = [*props.get("user_property", []), ("rmq-id", "gw:42")]
    assert decoded == want


# =========================================================================== too large


async def _until(pred: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class _Cloud:
    """A paho subscriber on the upstream collecting payloads."""

    def __init__(self, port: int, topic: str) -> None:
        self.payloads: list[bytes] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.c = mqtt.Client(V2, client_id=f"cloud-{time.monotonic_ns()}",
                             protocol=mqtt.MQTTv5)
        self.c.on_message = self._msg
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.connect(LOOPBACK, port)
        self.c.loop_start()
        self.c.subscribe(topic, qos=1)
        assert ready.wait(5), "subscription not acknowledged"

    def _msg(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        if not m.topic.endswith("_heartbeat"):
            with self.lock:
                self.payloads.append(bytes(m.payload))

    def got(self) -> list[bytes]:
        with self.lock:
            return list(self.payloads)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_message_above_max_packet_size_is_dropped_and_the_rest_flows(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker]
) -> None:
    broker = mosquitto_factory("max_packet_size 1000\nmax_queued_messages 0\n")
    cloud = _Cloud(broker.port, "up/#")

    async def main() -> None:
        q = ForwardQueue(tmp_path / "q.db", commit_delay=0.001)
        small = [q.put("cloud", 2, "up/t", b"s%d" % i) for i in range(3)]
        big = q.put("cloud", 2, "up/t", b"B" * 2000)
        small += [q.put("cloud", 2, "up/t", b"s%d" % i) for i in range(3, 6)]
        client = UplinkClient("cloud", [f"mqtt://{LOOPBACK}:{broker.port}"], "gw-big",
                              q, version=5, gateway_id="gw")
        task = asyncio.create_task(client.run())
        try:
            await _until(lambda: len(cloud.got()) == 6 and q.stats()["messages"] == 0, 15,
                         "the small messages delivered and the big one dropped")
            await asyncio.sleep(0.3)  # nothing further arrives, nothing is resent
        finally:
            await client.stop(drain_timeout=0.5)
            await asyncio.wait_for(task, 5)
        assert client.reconnects == 0  # the server never had to refuse it
        assert client.too_large == 1 and client.status()["too_large"] == 1
        assert client.sent == 6 and client.acked == 6
        assert q.stats()["drops"]["too_large"] == 1
        assert big not in q.in_flight("cloud") and len(small) == 6
        await q.close()
        q2 = ForwardQueue(tmp_path / "q.db")  # deleted from the file as well
        assert q2.stats()["messages"] == 0
        await q2.close()

    try:
        asyncio.run(main())
    finally:
        cloud.close()
    assert sorted(cloud.got()) == [b"s%d" % i for i in range(6)]


def test_too_large_counted_in_sys(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    """End to end: the drop reason shows in $SYS like the others; later messages flow."""
    broker = mosquitto_factory("max_packet_size 1500\nmax_queued_messages 0\n")
    gw = gateway_factory({
        "upstream": [{"name": "cloud", "urls": [f"mqtt://{LOOPBACK}:{broker.port}"]}],
        "forward": [{"filter": "sensors/#", "upstream": "cloud", "qos": 1}],
        "queue": {"commit_delay_ms": 2.0},
    })
    cloud = _Cloud(broker.port, "edge/#")
    dev = mqtt.Client(V2, client_id="dev-big", protocol=mqtt.MQTTv5)
    seen: dict[str, bytes] = {}
    dev.on_message = lambda c, u, m: seen.__setitem__(m.topic, m.payload)
    dev.connect(LOOPBACK, gw.port)
    dev.loop_start()
    try:
        dev.subscribe("$SYS/broker/forward/drops/#", qos=0)
        for payload in (b"first", b"X" * 3000, b"last"):
            info = dev.publish("sensors/t", payload, qos=1)
            info.wait_for_publish(10)
            assert info.is_published()
        deadline = time.monotonic() + 15
        key = "$SYS/broker/forward/drops/too_large"
        while time.monotonic() < deadline and (
            seen.get(key) != b"1" or len(cloud.got()) < 2
        ):
            time.sleep(0.1)
        assert seen.get(key) == b"1", {k: v for k, v in seen.items() if "drops" in k}
        assert cloud.got() == [b"first", b"last"]
    finally:
        dev.disconnect()
        dev.loop_stop()
        cloud.close()


# =========================================================================== reconnect_max_s


def _forward_config(extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "upstream": [{"name": "cloud", "urls": ["mqtt://127.0.0.1:1"], **extra}],
        "forward": [{"filter": "#", "upstream": "cloud"}],
    }


def test_reconnect_max_s_config_reaches_the_uplink(tmp_path: Path) -> None:
    assert parse_config(_forward_config({}), tmp_path).forwarding.upstreams[0] \
        .reconnect_max_s == 30.0
    cfg = parse_config(_forward_config({"reconnect_max_s": 2.5}), tmp_path)
    assert cfg.forwarding.upstreams[0].reconnect_max_s == 2.5

    async def main() -> None:
        path = build_forward_path("gw", cfg.forwarding, tmp_path)
        try:
            [client] = build_uplinks("gw", cfg.forwarding, path.queue, lambda name: ((), None))
            assert client.backoff.maximum == 2.5
            delays = [client.backoff.next() for _ in range(20)]
            assert max(delays) <= 2.5 and delays[-1] >= 1.25  # capped, and reached
        finally:
            await path.queue.close()

    asyncio.run(main())


@pytest.mark.parametrize("value", [0, 0.05, -1, 100_000, "30", True])
def test_reconnect_max_s_invalid(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_forward_config({"reconnect_max_s": value}), tmp_path)
    msg = str(info.value)
    assert msg.startswith("upstream[0].reconnect_max_s: must be a number from 0.1 to"), msg
    assert info.value.key == "upstream[0].reconnect_max_s"
