"""Shadow and hot swap in a real gateway under live traffic: paho publishes QoS 1 at a steady
rate through the gateway to a real Mosquitto upstream while a deliberately worse priority
model is stopped by the shadow gate, a "same" model passes it and is promoted, and
``rapidmq-edge model rollback`` (a real CLI subprocess) rolls the running gateway back:
every message acknowledged with success and forwarded (0 refused, 0 lost)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
import tomli_w

from rapidmq_edge.config import parse_config
from rapidmq_edge.gateway.assembly import Gateway
from rapidmq_edge.ota.manifest import Gate, Manifest, build_manifest
from rapidmq_edge.ota.signing import model_interface, model_vectors
from rapidmq_edge.ota.validate import CandidateRejected

from .conftest import MosquittoBroker, free_port
from .ota_model_helpers import constant_model, copy_shipped

V2 = mqtt.CallbackAPIVersion.VERSION2
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class LiveGateway:
    """The real gateway in this process (its own event loop thread), so the test can drive
    its OTA model host the way the agent does, on the gateway's loop."""

    def __init__(self, doc: dict[str, Any], base: Path) -> None:
        self.gateway = Gateway(parse_config(doc, base))
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(20), self._error

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            await self.gateway.start()
            self._ready.set()
            await self._stop.wait()
            await self.gateway.stop()

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # pragma: no cover - reported by the constructor
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the gateway's loop; its result or exception."""
        async def run() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


class Traffic:
    """A device publishing QoS 1 at ``rate`` msg/s over 40 topics until stopped; records
    each PUBACK's reason code and its latency."""

    def __init__(self, port: int, rate: float) -> None:
        self.rate = rate
        self.sent: dict[int, float] = {}
        self.acks: dict[int, tuple[int, float]] = {}
        self.payloads: set[bytes] = set()
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.c = mqtt.Client(V2, client_id="ota-device", protocol=mqtt.MQTTv5)
        self.c.max_inflight_messages_set(1000)
        self.c.on_publish = self._acked
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _acked(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        with self.lock:
            self.acks[mid] = (int(getattr(rc, "value", rc)), time.monotonic())

    def _run(self) -> None:
        kinds = ["site/s{}/temperature/sn{}/reading", "devices/dev{}/alarm/evt",
                 "plant1/line{}/log/node{}/lines", "fleet/t{}/gps"]
        i = 0
        t0 = time.monotonic()
        while not self.stop_flag.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            while i < due:
                topic = kinds[i % 4].format(i % 10, i % 7)
                payload = b'{"seq":%d,"v":%d.%d,"severity":"%s"}' % (
                    i, i % 50, i % 10, [b"info", b"critical"][i % 2])
                t = time.monotonic()  # not under self.lock: paho acks under its own lock
                info = self.c.publish(topic, payload, qos=1)
                with self.lock:
                    self.sent[info.mid] = t
                    self.payloads.add(payload)
                i += 1
            time.sleep(0.005)

    def count(self) -> int:
        with self.lock:
            return len(self.sent)

    def finish(self, timeout: float = 15.0) -> None:
        self.stop_flag.set()
        self.thread.join(5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.acks) >= len(self.sent):
                    break
            time.sleep(0.05)
        self.c.disconnect()
        self.c.loop_stop()


class Upstream:
    """The cloud side: every payload forwarded to the upstream Mosquitto."""

    def __init__(self, port: int) -> None:
        self.got: set[bytes] = set()
        self.lock = threading.Lock()
        ready = threading.Event()
        self.c = mqtt.Client(V2, client_id="cloud", protocol=mqtt.MQTTv5)
        self.c.on_message = self._msg
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe("edge/#", qos=1)
        assert ready.wait(5)

    def _msg(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        if not m.topic.endswith("/_heartbeat"):
            with self.lock:
                self.got.add(m.payload)

    def wait_for(self, want: set[bytes], timeout: float) -> set[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if want <= self.got:
                    break
            time.sleep(0.05)
        with self.lock:
            return want - self.got

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _manifest(model: Path, sequence: int, version: str) -> Manifest:
    """What ``ota sign`` would sign for ``model``: its interface, vectors it really gives, and
    a short shadow gate (a verified manifest is what the agent hands to the host)."""
    inputs, outputs = model_interface(model)
    m, _ = build_manifest(component="priority", sequence=sequence, version=version,
                          payload=model.read_bytes(), gateway_class="default",
                          min_gateway_version="0.1.0", inputs=inputs, outputs=outputs,
                          vectors=model_vectors("priority", model),
                          gate=Gate(min_messages=300, min_seconds=1.0, min_agreement=0.98))
    return m


def _decide(gw: LiveGateway, timeout: float = 20.0) -> tuple[str, str, dict[str, Any]]:
    host = gw.gateway.ota_host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        verdict = gw.call(host.decision, "priority")
        if verdict[0] != "pending":
            return verdict
        time.sleep(0.1)
    raise AssertionError(f"shadow still pending: {verdict}")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapidmq_edge", "model", *args],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


@pytest.mark.timeout(90)
def test_worse_model_stopped_same_model_promoted_and_rolled_back_under_live_traffic(
        tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    port = free_port()
    doc: dict[str, Any] = {
        "gateway": {"id": "gw-ota", "data_dir": str(tmp_path / "data")},
        "mqtt": {"listen": [f"tcp://127.0.0.1:{port}"]},
        "auth": {"allow_anonymous": True},
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{mosquitto.port}"],
                      "keep_alive": 5}],
        "forward": [{"filter": "#", "upstream": "cloud", "qos": 1}],
        "queue": {"commit_delay_ms": 2.0},
        "intelligence": {"enabled": True, "anomaly": "off", "threat": "off"},
    }
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(tomli_w.dumps(doc))
    worse = constant_model(tmp_path / "cand" / "bulk.onnx", 82, 4, 3)
    same = copy_shipped("priority", tmp_path / "cand" / "same.onnx")
    cloud = Upstream(mosquitto.port)
    gw = LiveGateway(doc, tmp_path)
    traffic = None
    try:
        rt = gw.gateway.intelligence
        host = gw.gateway.ota_host
        shipped = rt.priority.version
        assert shipped.startswith("1.0.0+")
        traffic = Traffic(port, rate=500.0)
        # 1. a model that validates (its vectors are its own answers) but is worse
        gw.call(host.begin, "priority", worse, _manifest(worse, 5, "2.0.0-bulk"), b"env-5")
        assert gw.call(lambda: rt.snapshot()["models"]["priority"]["shadow"]["version"]
                       ).startswith("2.0.0-bulk")
        verdict, reason, figures = _decide(gw)
        assert verdict == "fail" and reason.startswith("agreement"), (reason, figures)
        assert figures["messages"] >= 300 and figures["labels_candidate"] == {3: figures[
            "compared"]}
        gw.call(host.abandon, "priority", f"shadow: {reason}")
        assert rt.priority.version == shipped and rt.scorer.shadow is None
        st = host.slots.state("priority")
        assert (st.active, st.state) == (None, "rejected") and "agreement" in st.reason
        # a file that is not the manifest's is refused before it is installed
        with pytest.raises(CandidateRejected) as err:
            gw.call(host.begin, "priority", worse, _manifest(same, 6, "x"), b"")
        assert err.value.reason == "size"
        # 2. the same model passes the gate and is promoted while messages flow
        gw.call(host.begin, "priority", same, _manifest(same, 6, "1.0.1-ota"), b"env-6")
        verdict, reason, figures = _decide(gw)
        assert verdict == "pass", (reason, figures)
        assert figures["agreement"] == 1.0 and figures["exceptions"] == 0
        before = traffic.count()
        gw.call(host.promote, "priority")
        assert rt.priority.version.startswith("1.0.1-ota+")
        deadline = time.monotonic() + 5
        while traffic.count() < before + 500 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rt.scorer.priority.version.startswith("1.0.1-ota+")  # the batches use it
        st = host.slots.state("priority")
        assert (st.active, st.state, st.healthy) == ("a", "active", False)
        # 3. the operator's view and rollback, while the gateway runs
        out = _cli("list", "--config", str(config_path))
        assert out.returncode == 0, out.stderr
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("priority"))
        assert "ota" in line and "1.0.1-ota+" in line and "active (probation)" in line
        out = _cli("rollback", "priority", "--config", str(config_path))
        assert out.returncode == 0, out.stderr
        assert "to the shipped model" in out.stdout and "running gateway" in out.stderr
        deadline = time.monotonic() + 8
        while rt.priority.version != shipped and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rt.priority.version == shipped, "the running gateway did not follow"
        assert gw.call(host.rolled_back, "priority").startswith("operator")
        time.sleep(0.5)  # traffic across the rollback's swap too
    finally:
        if traffic is not None:
            traffic.finish()
        gw.stop()
    assert traffic is not None
    n = len(traffic.sent)
    refused = [rc for rc, _ in traffic.acks.values() if rc >= 0x80]  # 0x10: no subscribers
    assert n >= 2000 and len(traffic.acks) == n and not refused, (n, len(traffic.acks), refused)
    lost = cloud.wait_for(traffic.payloads, timeout=15)
    cloud.close()
    assert not lost, f"{len(lost)} of {n} messages not forwarded"
    lat = sorted(t - traffic.sent[mid] for mid, (_, t) in traffic.acks.items())
    print(f"\n{n} messages, PUBACK p50 {lat[n // 2] * 1000:.2f} ms, "
          f"p99 {lat[int(n * 0.99)] * 1000:.2f} ms, max {lat[-1] * 1000:.2f} ms")
