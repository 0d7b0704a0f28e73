"""One full turn of the feedback loop with real parts (issue 14 part 5).

A real Mosquitto is the cluster; a real gateway process (``[ota] enabled``, ``feedback =
true``, the HTTP API with an admin and a read token) scores live paho traffic with the
shipped priority model and uploads a sampled stream of its scored rows. A sensor stream
with a spike opens an incident; the operator confirms it over the HTTP API (the read token
may not; unknown incidents and bad bodies are refused). Then the operator, with the CLI only:
``model collect`` (rows and the verdict arrive) -> ``model train`` -> ``ota sign`` ->
``ota publish``; the gateway shadows the retrained model on its traffic, promotes it, and
its retained state document says ``active`` with the new sequence.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
import pytest
import yaml

from rapidmq_edge.security.tokens import add_token

from .conftest import LOOPBACK, MosquittoBroker, free_port
from .gateway_proc import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
V2 = mqtt.CallbackAPIVersion.VERSION2
CLASS = "pi4"
SPIKY = "site/sensors/boiler/t"


def _cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapidmq_edge", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _request(port: int, path: str, body: Any, token: str | None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


class Traffic:
    """Devices publishing to the gateway at ~``rate`` msg/s: readings, alarms, bulk logs."""

    def __init__(self, port: int, rate: float = 300.0) -> None:
        self.stop = threading.Event()
        self.client = mqtt.Client(V2, client_id="devices", protocol=mqtt.MQTTv311)
        self.client.connect(LOOPBACK, port)
        self.client.loop_start()
        self.rate = rate
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = random.Random(7)
        k = 0
        c = self.client
        while not self.stop.is_set():
            c.publish(f"site/sensors/{k % 9}/t", json.dumps({"value": round(20 + rng.random()
                                                                         * 5, 2)}), qos=0)
            if k % 5 == 0:
                c.publish(f"site/alarm/door/{k % 3}", json.dumps({"alarm": True, "zone": k % 4}),
                          qos=1)
            if k % 7 == 0:
                c.publish(f"site/log/{k % 2}", "x" * (200 + k % 300), qos=0)
            k += 1
            time.sleep(1.0 / self.rate)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.client.loop_stop()
        self.client.disconnect()


def _incident(port: int, timeout: float = 20.0) -> dict[str, Any]:
    """Publish a steady stream with device timestamps, then a spike; the opening alert."""
    got: list[dict[str, Any]] = []
    ready = threading.Event()
    sub = mqtt.Client(V2, client_id="operator-alerts", protocol=mqtt.MQTTv311)
    sub.on_subscribe = lambda *a: ready.set()
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    sub.connect(LOOPBACK, port)
    sub.loop_start()
    try:
        sub.subscribe("$edge/alerts/#", qos=1)
        assert ready.wait(5)
        pub = mqtt.Client(V2, client_id="boiler", protocol=mqtt.MQTTv311)
        pub.connect(LOOPBACK, port)
        pub.loop_start()
        rng = random.Random(3)
        t0 = time.time() - 3 * 86400
        for i in range(400):
            pub.publish(SPIKY, json.dumps({"value": round(50 + rng.gauss(0, 0.5), 3),
                                           "ts": round(t0 + 60 * i, 3)}), qos=1).wait_for_publish(5)
        pub.publish(SPIKY, json.dumps({"value": 95.0, "ts": round(t0 + 60 * 400, 3)}),
                    qos=1).wait_for_publish(5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not any(a.get("state") == "open" for a in got):
            time.sleep(0.05)
        pub.loop_stop()
        pub.disconnect()
    finally:
        sub.loop_stop()
        sub.disconnect()
    opened = [a for a in got if a.get("state") == "open" and a.get("stream") == SPIKY]
    assert opened, got
    return opened[0]


def _wait_state(url: str, pred: Any, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        out = _cli("ota", "status", "--url", url, "--json", "--wait", "1.0")
        assert out.returncode == 0, out.stderr
        rows = [r for r in json.loads(out.stdout) if r["component"] == "priority"]
        if pred(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


@pytest.mark.timeout(120)
def test_collect_train_sign_publish_shadow_promote(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    url = f"mqtt://{LOOPBACK}:{mosquitto.port}"
    keys = tmp_path / "operator"
    res = _cli("ota", "keys", "init", "--out", str(keys))
    assert res.returncode == 0, res.stderr
    tokens_file = tmp_path / "tokens.toml"
    admin = add_token(tokens_file, "ops", "ops")
    viewer = add_token(tokens_file, "viewer", "viewer", role="read")
    http_port = free_port()
    (tmp_path / "gw").mkdir()
    gw = GatewayProcess(tmp_path / "gw", {
        "gateway": {"id": "gw-loop"},
        "upstream": [{"name": "cloud", "urls": [url], "keep_alive": 5}],
        "forward": [{"filter": "site/#", "upstream": "cloud", "qos": 1}],
        "intelligence": {"enabled": True, "threat": "off"},
        "http": {"listen": [f"http://{LOOPBACK}:{http_port}"],
                 "tokens_file": str(tokens_file)},
        "ota": {"enabled": True, "trust": [str(keys / "operator-mldsa65.pub")],
                "gateway_class": CLASS, "feedback": True, "feedback_rows_per_minute": 1200,
                "feedback_buffer": 400, "feedback_interval": 0.5},
    })
    collected = tmp_path / "feedback"
    collector: subprocess.Popen[str] | None = None
    traffic: Traffic | None = None
    gw.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((LOOPBACK, http_port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, gw.log()
                time.sleep(0.05)
        t_start = time.monotonic()
        # the operator's collector, before the rows come
        collector = subprocess.Popen(
            [sys.executable, "-m", "rapidmq_edge", "model", "collect", "--url", url,
             "--out", str(collected), "--rows", "200", "--verdicts", "1", "--duration", "40"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        time.sleep(1.0)
        traffic = Traffic(gw.port)
        # an incident, and the operator's verdicts on it over the HTTP API
        alert = _incident(gw.port)
        iid = alert["incident"]
        path = f"/api/v1/incidents/{iid}"
        body = {"verdict": "confirmed", "note": "boiler overheated, replaced valve"}
        assert _request(http_port, path, body, None)[0] == 401
        status, doc = _request(http_port, path, body, viewer)
        assert status == 403 and "admin" in doc["error"], doc
        status, doc = _request(http_port, "/api/v1/incidents/ffff-99999", body, admin)
        assert status == 404 and "ffff-99999" in doc["error"], doc
        status, doc = _request(http_port, path, {"verdict": "maybe"}, admin)
        assert status == 400 and "confirmed" in doc["error"], doc
        status, doc = _request(http_port, path, body, admin)
        assert status == 201, doc
        assert doc["incident"] == iid and doc["stream"] == SPIKY and doc["by"] == "ops"
        assert doc["verdict"] == "confirmed" and doc["uploading"] is True
        # the answer is what docs/http-api.yaml promises
        spec = yaml.safe_load((ROOT / "docs" / "http-api.yaml").read_text())
        jsonschema.validate(doc, spec["components"]["schemas"]["Verdict"])
        # collect: the rows and the verdict arrive
        out, err = collector.communicate(timeout=45)
        assert collector.returncode == 0, (out, err)
        stats = json.loads(out.strip().splitlines()[-1])
        assert stats["rows"] >= 200 and not stats["refused"], stats
        verdicts = [json.loads(ln) for ln in
                    (collected / "gw-loop" / "incidents.jsonl").read_text().splitlines()]
        assert any(v["incident"] == iid and v["verdict"] == "confirmed"
                   for b in verdicts for v in b["verdicts"]), verdicts
        # train, sign, publish
        model = tmp_path / "trained" / "priority.onnx"
        res = _cli("model", "train", "--from", str(collected), "--component", "priority",
                   "--out", str(model), "--model-version", "1.1.0")
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["data"]["rows"] >= 200 and report["data"]["verdicts"] == 1, report
        assert report["quality"]["agreement_holdout"] >= 0.9, report
        res = _cli("ota", "sign", "--key", str(keys / "operator-mldsa65.key"),
                   "--component", "priority", "--sequence", "1", "--model", str(model),
                   "--class", CLASS, "--min-version", "0.1", "--out", str(tmp_path / "signed"),
                   "--gate", "min_messages=200", "--gate", "min_seconds=1",
                   "--gate", "min_agreement=0.9")
        assert res.returncode == 0, res.stderr
        res = _cli("ota", "publish", "--url", url, "--manifest",
                   str(tmp_path / "signed" / "priority-1.manifest"), "--payload",
                   str(tmp_path / "signed" / "priority-1.payload"))
        assert res.returncode == 0, res.stderr
        rows = _wait_state(url, lambda r: r and r[0]["state"] in ("active", "rejected"), 30)
        assert rows and rows[0]["state"] == "active", (rows, gw.log()[-3000:])
        assert rows[0]["active_sequence"] == 1 and rows[0]["active_version"].startswith(
            "1.1.0+"), rows
        took = time.monotonic() - t_start
        deadline = time.monotonic() + 10  # status.json is rewritten every few seconds
        while True:
            st = json.loads((gw.data_dir / "status.json").read_text())
            version = st["intelligence"]["models"]["priority"]["version"]
            if version.startswith("1.1.0+") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert version.startswith("1.1.0+"), version
        fb = st["feedback"]
        assert fb["rows_sent"] >= 200 and fb["verdicts_sent"] == 1, fb
        assert fb["sampler"]["sampled"] <= 1200, fb  # the turn took less than a minute
        print(json.dumps({"feedback_turn_seconds": round(took, 1),
                          "rows_sent": fb["rows_sent"], "bytes_sent": fb["bytes_sent"],
                          "agreement_holdout": report["quality"]["agreement_holdout"],
                          "shadow_agreement": rows[0].get("agreement")}))
    finally:
        if collector is not None and collector.poll() is None:
            collector.kill()
            collector.wait(5)
        if traffic is not None:
            traffic.close()
        gw.stop()
