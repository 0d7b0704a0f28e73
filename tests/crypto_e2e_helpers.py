"""Helpers for the end-to-end protection tests: keys, gateway config, devices, capture, replay."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from rapidmq_edge.cloud.ingest import IngestOptions, run_ingest
from rapidmq_edge.cloud.subscriber import Subscriber
from rapidmq_edge.cloud.verify import Report
from rapidmq_edge.crypto.keystore import KeyStore
from rapidmq_edge.mqtt.codec import encode_publish
from rapidmq_edge.mqtt.properties import encode_properties

LOOPBACK = "127.0.0.1"
GW = "test-gw"
PREFIX = f"edge/{GW}/"


@dataclass
class Keys:
    """Gateway keys dir (identity + imported recipient), cloud keys dir, trusted identity."""

    gateway: Path
    cloud: Path
    trust: Path


def make_keys(tmp: Path) -> Keys:
    """Identity on the gateway, recipient in the cloud, public halves exchanged."""
    gw, cloud = KeyStore(tmp / "gw-keys"), KeyStore(tmp / "cloud-keys")
    gw.create_identity()
    cloud.create_recipient()
    gw.import_recipient_public(cloud.public_cose("recipient"))
    trust = tmp / "identity.cose"
    trust.write_bytes(gw.public_cose("identity"))
    return Keys(gw.directory, cloud.directory, trust)


def gateway_config(
    upstream_port: int, keys: Keys, *, batch_size: int = 16, batch_max_age: float = 0.3,
    encrypt: bool = True, sign: bool = True, manifest: str = "leaves",
) -> dict[str, Any]:
    """Forward ``sensors/#`` protected and ``plain/#`` unprotected to one MQTT 5 upstream."""
    return {
        "upstream": [{"name": "cloud", "urls": [f"mqtt://{LOOPBACK}:{upstream_port}"],
                      "heartbeat_interval": 0.0}],
        "forward": [
            {"filter": "sensors/#", "upstream": "cloud", "encrypt": encrypt, "sign": sign},
            {"filter": "plain/#", "upstream": "cloud"},
        ],
        "queue": {"durability": "normal", "commit_delay_ms": 2.0},
        "security": {"keys_dir": str(keys.gateway), "batch_size": batch_size,
                     "batch_max_age": batch_max_age, "manifest": manifest},
    }


def publish_qos1(port: int, items: Iterable[tuple[str, bytes]], timeout: float = 10.0) -> int:
    """Publish with QoS 1 from one device; returns how many were acknowledged."""
    acked = threading.Semaphore(0)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{time.monotonic_ns()}")
    c.on_publish = lambda *a: acked.release()
    c.connect(LOOPBACK, port)
    c.loop_start()
    try:
        items = list(items)
        for topic, payload in items:
            c.publish(topic, payload, qos=1)
        n = 0
        deadline = time.monotonic() + timeout
        while n < len(items) and acked.acquire(timeout=max(0.0, deadline - time.monotonic())):
            n += 1
        return n
    finally:
        c.disconnect()
        c.loop_stop()


Captured = tuple[str, bytes, str | None]  # topic, payload, rmq-id


async def capture(port: int, until: Any, timeout: float = 10.0,
                  ready: asyncio.Event | None = None) -> list[Captured]:
    """Record everything under ``edge/#`` on the upstream until ``until(list)`` is true;
    ``ready`` is set once the subscription is acknowledged."""
    got: list[Captured] = []
    sub = Subscriber(f"mqtt://{LOOPBACK}:{port}", f"cap-{time.monotonic_ns()}",
                     [("edge/#", 1)], lambda t, p, props: got.append((t, p, props.get("rmq-id"))))
    task = asyncio.get_running_loop().create_task(sub.run())
    if ready is not None:
        await asyncio.wait_for(sub.subscribed.wait(), timeout)
        ready.set()
    deadline = time.monotonic() + timeout
    try:
        while not until(got) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        sub.stop()
        await asyncio.gather(task, return_exceptions=True)
    return got


async def replay(port: int, stream: Iterable[Captured]) -> None:
    """Publish a (possibly tampered) stream on the upstream, QoS 0, keeping rmq-id."""
    r, w = await asyncio.open_connection(LOOPBACK, port)
    from rapidmq_edge.mqtt.codec import encode
    from rapidmq_edge.mqtt.packets import MQTT_5, Connect, Disconnect

    w.write(encode(Connect(MQTT_5, f"tamper-{time.monotonic_ns()}"), MQTT_5))
    for topic, payload, mid in stream:
        props = encode_properties({"user_property": [("rmq-id", mid)]} if mid else {})
        w.write(encode_publish(topic.encode(), payload, 0, False, False, 0, props))
    w.write(encode(Disconnect(), MQTT_5))
    await w.drain()
    # read until the broker closes: closing with its CONNACK unread would send a TCP RST,
    # and the broker would drop publishes it had not read yet
    while await asyncio.wait_for(r.read(65536), 5):
        pass
    w.close()


async def consume(
    port: int, keys: Keys, out: Path, *, ready: asyncio.Event | None = None,
    group: str | None = None, idle: float = 1.0, grace: float = 0.5,
    stop: asyncio.Event | None = None,
    chain_start: int | None = 0, trust: tuple[Path, ...] | None = None,
) -> tuple[dict[str, int], list[Report]]:
    """Run ``cloud ingest`` in-process until idle; returns (counters, reports)."""
    reports: list[Report] = []
    opts = IngestOptions(
        upstream=f"mqtt://{LOOPBACK}:{port}", keys_dir=keys.cloud, out=out,
        trust=trust if trust is not None else (keys.trust,), group=group, grace=grace,
        idle_exit=idle, chain_start=chain_start,
        client_id=f"ingest-{out.stem}-{time.monotonic_ns()}",
    )
    counts = await run_ingest(opts, on_report=reports.append, ready=ready, stop=stop)
    return counts, reports
