"""End to end: devices → gateway → durable queue → real Mosquitto upstream (and back down)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from .conftest import MosquittoBroker, free_port, wait_for_port
from .gateway_proc import GatewayProcess

V2 = mqtt.CallbackAPIVersion.VERSION2


class Collector:
    """A paho subscriber on the upstream that records (topic, payload, user properties)."""

    def __init__(self, port: int, topic: str, client_id: str | None = None) -> None:
        self.got: list[tuple[str, bytes, list[tuple[str, str]]]] = []
        self.heartbeats = topic.endswith("_heartbeat")
        self.times: list[float] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        if client_id is None:  # MQTT 5, to see user properties
            self.c = mqtt.Client(V2, client_id=f"cloud-{time.monotonic_ns()}",
                                 protocol=mqtt.MQTTv5)
        else:  # a persistent 3.1.1 session the upstream keeps while we are away
            self.c = mqtt.Client(V2, client_id=client_id, protocol=mqtt.MQTTv311,
                                 clean_session=False)
        self.c.on_message = self._msg
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe(topic, qos=1)
        assert self.ready.wait(5), "upstream subscription not acknowledged"

    def _msg(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        if m.topic.endswith("/_heartbeat") and not self.heartbeats:
            return  # the gateway's end-to-end heartbeat, not device data
        props = getattr(getattr(m, "properties", None), "UserProperty", None) or []
        with self.lock:
            self.got.append((m.topic, m.payload, list(props)))
            self.times.append(time.monotonic())

    def wait_for(self, n: int, timeout: float) -> list[tuple[str, bytes, list[tuple[str, str]]]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len({p for _, p, _ in self.got}) >= n:
                    break
            time.sleep(0.05)
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _device(port: int, cid: str) -> mqtt.Client:
    c = mqtt.Client(V2, client_id=cid, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(50)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def _config(up_port: int, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{up_port}"], "keep_alive": 5}],
        "forward": [{"filter": "sensors/#", "upstream": "cloud", "qos": 1}],
        "queue": {"commit_delay_ms": 2.0},
    }
    cfg.update(extra)
    return cfg


def _persistent_cloud(
    factory: Callable[..., MosquittoBroker], port: int, tmp: Path
) -> Callable[[], MosquittoBroker]:
    """An upstream on ``port`` that remembers a cloud subscriber across its own restarts.

    Returns a function that (re)starts it. The subscriber's session is created now, so
    what the gateway forwards once the upstream comes back is queued for it.
    """
    conf = (
        f"listener {port} 127.0.0.1\npersistence true\npersistence_location {tmp}/\n"
        "max_queued_messages 0\n"
    )

    def start() -> MosquittoBroker:
        # the factory waits for the port it picked itself, not for this second listener
        broker = factory(conf)
        if not wait_for_port("127.0.0.1", port, 5):
            raise RuntimeError(f"the upstream did not listen on {port}: {broker.log()}")
        return broker

    first = start()
    Collector(port, "edge/#", client_id="cloud").close()
    first.stop()  # the session (and its subscription) is saved on exit
    return start


def _publish_all(dev: mqtt.Client, n: int, topic: str = "sensors/t") -> list[bytes]:
    infos = [dev.publish(topic, f"m{i}".encode(), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(20)
        assert info.is_published()
    return [f"m{i}".encode() for i in range(n)]


def test_forwarded_with_prefix_and_stable_id(
    mosquitto: MosquittoBroker, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    gw = gateway_factory(_config(mosquitto.port))
    cloud = Collector(mosquitto.port, "edge/#")
    dev = _device(gw.port, "dev1")
    try:
        sent = _publish_all(dev, 200)
        got = cloud.wait_for(200, 15)
        assert [p for _, p, _ in got][:200] == sent, "all forwarded, in order"
        assert {t for t, _, _ in got} == {"edge/test-gw/sensors/t"}
        ids = [dict(props).get("rmq-id") for _, _, props in got]
        assert all(i and i.startswith("test-gw:") for i in ids), ids[:3]
        assert len(set(ids)) == len(ids), "every message has its own stable id"
    finally:
        dev.disconnect()
        dev.loop_stop()
        cloud.close()


def test_upstream_down_then_up_nothing_lost(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    port = free_port()
    start_upstream = _persistent_cloud(mosquitto_factory, port, tmp_path)
    gw = gateway_factory(_config(port))
    dev = _device(gw.port, "dev2")
    try:
        sent = _publish_all(dev, 2000)  # every PUBACK means: committed to the queue
    finally:
        dev.disconnect()
        dev.loop_stop()
    start_upstream()
    cloud = Collector(port, "edge/#", client_id="cloud")
    try:
        got = {p for _, p, _ in cloud.wait_for(2000, 30)}
        assert got == set(sent), f"{len(set(sent) - got)} of {len(sent)} lost"
    finally:
        cloud.close()


def test_sigkill_after_puback_loses_nothing(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    port = free_port()
    start_upstream = _persistent_cloud(mosquitto_factory, port, tmp_path)
    gw = gateway_factory(_config(port))
    dev = _device(gw.port, "dev3")
    try:
        sent = _publish_all(dev, 500)
    finally:
        dev.disconnect()
        dev.loop_stop()
    gw.restart(hard=True)  # SIGKILL: only what was committed survives, and that is all acked
    start_upstream()
    cloud = Collector(port, "edge/#", client_id="cloud")
    try:
        got = {p for _, p, _ in cloud.wait_for(500, 30)}
        assert got == set(sent), f"{len(set(sent) - got)} of {len(sent)} lost"
    finally:
        cloud.close()


def test_downstream_commands_reach_local_subscribers(
    mosquitto: MosquittoBroker, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    gw = gateway_factory(_config(
        mosquitto.port,
        downstream=[{"upstream": "cloud", "filter": "edge/{gateway_id}/cmd/#",
                     "strip_prefix": "edge/{gateway_id}/"}],
    ))
    got: list[tuple[str, bytes]] = []
    ev = threading.Event()
    local = mqtt.Client(V2, client_id="actuator", protocol=mqtt.MQTTv311)
    local.on_message = lambda c, u, m: (got.append((m.topic, m.payload)), ev.set())
    local.connect("127.0.0.1", gw.port)
    local.loop_start()
    local.subscribe("cmd/#", qos=1)
    cloud = mqtt.Client(V2, client_id="cloud-cmd", protocol=mqtt.MQTTv311)
    cloud.connect("127.0.0.1", mosquitto.port)
    cloud.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not ev.is_set() and time.monotonic() < deadline:  # until the uplink subscribed
            cloud.publish("edge/test-gw/cmd/valve", b"open", qos=1)
            ev.wait(0.3)
        assert got and got[0] == ("cmd/valve", b"open")
    finally:
        for c in (local, cloud):
            c.disconnect()
            c.loop_stop()


def test_heartbeat_status_and_sys_metrics(
    mosquitto: MosquittoBroker, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    """A heartbeat proves the path end to end; `rapidmq-edge status` and $SYS show it."""
    cfg = _config(mosquitto.port)
    cfg["upstream"][0]["heartbeat_interval"] = 0.5
    gw = gateway_factory(cfg)
    cloud = Collector(mosquitto.port, "edge/test-gw/_heartbeat")
    try:
        assert cloud.wait_for(1, 10), "heartbeat published on the upstream"
        deadline = time.monotonic() + 15
        text = ""
        while time.monotonic() < deadline:
            out = subprocess.run(
                [sys.executable, "-m", "rapidmq_edge", "status", "--data-dir", str(gw.data_dir)],
                capture_output=True, text=True, timeout=20,
            )
            text = out.stdout
            if out.returncode == 0 and "heartbeat" in text and "no heartbeat yet" not in text:
                break
            time.sleep(0.3)
        assert "upstream cloud: connected to mqtt://127.0.0.1" in text, text
        assert "ms)" in text, text  # heartbeat round-trip time shown
        data = json.loads(subprocess.run(
            [sys.executable, "-m", "rapidmq_edge", "status", "--data-dir", str(gw.data_dir),
             "--json"], capture_output=True, text=True, timeout=20, check=True,
        ).stdout)
        up = data["forwarding"]["upstreams"]["cloud"]
        assert up["connected"] is True and up["heartbeat_rtt_ms"] is not None
    finally:
        cloud.close()
    sys_seen: dict[str, bytes] = {}
    probe = mqtt.Client(V2, client_id="sysprobe", protocol=mqtt.MQTTv311)
    probe.on_message = lambda c, u, m: sys_seen.__setitem__(m.topic, m.payload)
    probe.connect("127.0.0.1", gw.port)
    probe.loop_start()
    try:
        probe.subscribe("$SYS/broker/forward/#", qos=0)
        deadline = time.monotonic() + 5
        key = "$SYS/broker/forward/upstreams/cloud/connected"
        while key not in sys_seen and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sys_seen.get(key) == b"True", sorted(sys_seen)[:20]
        assert "$SYS/broker/forward/drops/expired" in sys_seen
    finally:
        probe.disconnect()
        probe.loop_stop()


def test_drain_rate_cap(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    """`rate_limit` caps the drain of a backlog (token bucket)."""
    port = free_port()
    start_upstream = _persistent_cloud(mosquitto_factory, port, tmp_path)
    cfg = _config(port)
    cfg["upstream"][0]["rate_limit"] = 100.0
    gw = gateway_factory(cfg)
    dev = _device(gw.port, "dev-rate")
    try:
        sent = _publish_all(dev, 200)
    finally:
        dev.disconnect()
        dev.loop_stop()
    start_upstream()
    cloud = Collector(port, "edge/#", client_id="cloud")
    try:
        got = {p for _, p, _ in cloud.wait_for(200, 20)}
        assert got == set(sent)
        spread = cloud.times[-1] - cloud.times[0]  # first to last arrival upstream
        # uncapped, 200 messages arrive within ~50 ms; capped they need >= 1.9 s in all
        assert spread >= 1.0, f"200 messages at 100 msg/s arrived within {spread:.2f} s"
    finally:
        cloud.close()
