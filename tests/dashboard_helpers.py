"""A gateway with the dashboard for tests and bench/dashboard.py: a real gateway subprocess
(HTTP listener, tokens, optionally an upstream and the intelligence runtime), a paho-mqtt
publisher at a steady rate, an SSE reader, and the reference numbers the dashboard must
agree with (``/metrics`` when the gateway serves it, else ``status.json``)."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from rapidmq_edge.security.tokens import add_token

from .gateway_proc import LOOPBACK, GatewayProcess, _free_port

V2 = mqtt.CallbackAPIVersion.VERSION2


class DashboardGateway:
    """A gateway subprocess with ``[http]`` and two tokens: ``read`` and ``admin``."""

    def __init__(self, tmp: Path, upstream_port: int | None = None, intelligence: bool = False,
                 extra: dict[str, Any] | None = None) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tokens_file = tmp / "tokens.toml"
        self.read_token = add_token(self.tokens_file, "viewer", "alice", role="read")
        self.admin_token = add_token(self.tokens_file, "operator", "alice")
        self.http_port = _free_port()
        config: dict[str, Any] = {
            "http": {"listen": [f"http://{LOOPBACK}:{self.http_port}"],
                     "tokens_file": str(self.tokens_file)},
        }
        if upstream_port is not None:
            config["upstream"] = [{"name": "cloud", "urls": [f"mqtt://{LOOPBACK}:{upstream_port}"],
                                   "keep_alive": 5}]
            config["forward"] = [{"filter": "sensors/#", "upstream": "cloud", "qos": 1}]
        if intelligence:
            config["intelligence"] = {"enabled": True}
        config.update(extra or {})
        self.proc = GatewayProcess(tmp, config)
        self.base = f"http://{LOOPBACK}:{self.http_port}"

    def start(self) -> DashboardGateway:
        self.proc.start(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the HTTP listener binds after MQTT
            try:
                self.get("/api/v1/health")
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"http listener did not come up:\n{self.proc.log()}")

    def stop(self) -> None:
        self.proc.stop()

    @property
    def mqtt_port(self) -> int:
        return self.proc.port

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def get(self, path: str, token: str | None = None,
            timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of a GET (never raises on an HTTP error status)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(self.base + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def login(self, token: str) -> tuple[int, dict[str, str]]:
        """POST the login form without following the redirect: (status, headers)."""
        conn = http.client.HTTPConnection(LOOPBACK, self.http_port, timeout=5)
        try:
            body = urllib.parse.urlencode({"token": token})
            conn.request("POST", "/dashboard/login", body,
                         {"Content-Type": "application/x-www-form-urlencoded"})
            r = conn.getresponse()
            r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()

    def snapshot(self) -> dict[str, Any]:
        status, _, body = self.get("/dashboard/snapshot", self.read_token)
        assert status == 200, body
        return dict(json.loads(body))

    def reference_received(self) -> tuple[str, int]:
        """Messages received, as ``/metrics`` says (the sum of
        ``rapidmq_messages_received_total`` over its labels) or, without ``/metrics``, as
        ``status.json`` says: (where from, value)."""
        status, _, body = self.get("/metrics", self.admin_token)
        if status == 200:
            total, seen = 0.0, False
            for line in body.decode().splitlines():
                if line.startswith("rapidmq_messages_received_total"):
                    total += float(line.rsplit(" ", 1)[1])
                    seen = True
            if seen:
                return "/metrics", int(total)
        data = json.loads((self.proc.data_dir / "status.json").read_text())
        return "status.json", int(data["broker"]["messages/received"])


class Publisher:
    """One paho-mqtt client publishing ``rate`` msg/s (QoS 1) on a few sensor topics until
    stopped; ``sent`` counts what it handed to paho."""

    def __init__(self, port: int, rate: float, client_id: str = "sensor-1",
                 topics: int = 4) -> None:
        self.rate = rate
        self.topics = [f"sensors/site1/dev{i}/temp" for i in range(topics)]
        self.client = mqtt.Client(V2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(50)  # the gateway allows 100
        self.client.connect(LOOPBACK, port)
        self.client.loop_start()
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            while self.sent < due and not self._stop.is_set():
                topic = self.topics[self.sent % len(self.topics)]
                value = 21.0 + math.sin(self.sent / 50.0)
                payload = json.dumps({"value": round(value, 3), "ts": time.time()})
                self.client.publish(topic, payload, qos=1)
                self.sent += 1
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.client.loop_stop()
        self.client.disconnect()


def sse_frames(base: str, token: str, count: int,
               timeout: float = 10.0) -> Iterator[dict[str, Any]]:
    """The first ``count`` snapshots of ``/dashboard/events`` (bearer-authenticated)."""
    req = urllib.request.Request(base + "/dashboard/events",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        got = 0
        for raw in r:
            if raw.startswith(b"data: "):
                yield json.loads(raw[6:])
                got += 1
                if got >= count:
                    return
