"""OTA end to end with real parts: an operator (the CLI: keys, sign, rollout, status) and a
fleet of gateway processes on one Mosquitto, each with live MQTT traffic.

* A staged rollout (1 gateway, 50 %, 100 %) of a signed model: every gateway downloads the
  chunks over its own link, validates, runs the candidate in shadow on its traffic, promotes
  it and reports it active; the operator's fleet table shows it. An older manifest published
  afterwards is refused by every gateway (anti-rollback) and changes nothing.
* A worse model (one label for everything) is stopped by the first gateway's shadow gate and
  the rollout halts there: the other gateways never receive it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from .conftest import MosquittoBroker
from .gateway_proc import GatewayProcess
from .ota_model_helpers import constant_model, copy_shipped

ROOT = Path(__file__).resolve().parent.parent
V2 = mqtt.CallbackAPIVersion.VERSION2
CLASS = "pi4"
GATE = ["--gate", "min_messages=100", "--gate", "min_seconds=1"]


def _cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapidmq_edge", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


class Traffic:
    """One paho publisher per gateway: ``sensors/<i>/t`` readings at ~``rate`` msg/s."""

    def __init__(self, ports: list[int], rate: float = 150.0) -> None:
        self.stop = threading.Event()
        self.clients = []
        for i, port in enumerate(ports):
            c = mqtt.Client(V2, client_id=f"dev-{i}", protocol=mqtt.MQTTv311)
            c.connect("127.0.0.1", port)
            c.loop_start()
            self.clients.append(c)
        self.thread = threading.Thread(target=self._run, args=(rate,), daemon=True)
        self.thread.start()

    def _run(self, rate: float) -> None:
        k = 0
        while not self.stop.is_set():
            for i, c in enumerate(self.clients):
                c.publish(f"sensors/{k % 7}/t", json.dumps({"value": 20 + k % 5, "dev": i}),
                          qos=0)
            k += 1
            time.sleep(1.0 / rate)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for c in self.clients:
            c.loop_stop()
            c.disconnect()


@pytest.fixture
def operator(tmp_path: Path) -> Path:
    """An operator key made with the CLI."""
    keys = tmp_path / "operator"
    out = _cli("ota", "keys", "init", "--out", str(keys))
    assert out.returncode == 0, out.stderr
    return keys


def _sign(operator: Path, model: Path, sequence: int, out: Path,
          version: str) -> tuple[Path, Path]:
    res = _cli("ota", "sign", "--key", str(operator / "operator-mldsa65.key"),
               "--component", "priority", "--sequence", str(sequence), "--model", str(model),
               "--model-version", version, "--class", CLASS, "--min-version", "0.1",
               "--out", str(out), *GATE)
    assert res.returncode == 0, res.stderr
    return out / f"priority-{sequence}.manifest", out / f"priority-{sequence}.payload"


@pytest.fixture
def fleet(gateway_factory: Callable[..., GatewayProcess], mosquitto: MosquittoBroker,
          operator: Path) -> Iterator[tuple[list[GatewayProcess], Traffic]]:
    gws = [gateway_factory({
        "gateway": {"id": f"gw-{i}"},
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{mosquitto.port}"],
                      "keep_alive": 5}],
        "forward": [{"filter": "sensors/#", "upstream": "cloud", "qos": 1}],
        "intelligence": {"enabled": True, "anomaly": "off", "threat": "off"},
        "ota": {"enabled": True, "trust": [str(operator / "operator-mldsa65.pub")],
                "gateway_class": CLASS},
    }) for i in range(5)]
    traffic = Traffic([g.port for g in gws])
    try:
        yield gws, traffic
    finally:
        traffic.close()


def _status(url: str) -> list[dict[str, Any]]:
    out = _cli("ota", "status", "--url", url, "--json", "--wait", "1.5")
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def _wait_fleet(url: str, pred: Callable[[list[dict[str, Any]]], bool],
                timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows = _status(url)
    while not pred(rows) and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = _status(url)
    return rows


@pytest.mark.timeout(150)
def test_staged_rollout_reaches_every_gateway_and_old_manifests_are_refused(
        fleet: tuple[list[GatewayProcess], Traffic], mosquitto: MosquittoBroker,
        operator: Path, tmp_path: Path) -> None:
    gws, _ = fleet
    url = f"mqtt://127.0.0.1:{mosquitto.port}"
    same = copy_shipped("priority", tmp_path / "models" / "priority.onnx")
    old = _sign(operator, same, 1, tmp_path / "signed", "1.0.1")
    new = _sign(operator, same, 2, tmp_path / "signed", "1.0.2")
    # every gateway announced itself (class and version) before the rollout looks
    rows = _wait_fleet(url, lambda r: sum(x["online"] and x["state"] == "idle" for x in r) == 5,
                       30)
    assert sorted(r["gateway"] for r in rows if r["component"] == "priority") == \
        [f"gw-{i}" for i in range(5)], rows
    t0 = time.monotonic()
    res = _cli("ota", "rollout", "--url", url, "--manifest", str(new[0]), "--payload",
               str(new[1]), "--stages", "1,50%,100%", "--stage-timeout", "60", timeout=120)
    took = time.monotonic() - t0
    assert res.returncode == 0, (res.stdout, res.stderr)
    lines = res.stdout.splitlines()
    assert any(ln.startswith("stage 1/3: 1 of 5") for ln in lines), lines
    assert any("stage 3/3: 5 of 5 gateways + the class topic" in ln for ln in lines), lines
    assert lines[-1].startswith("done"), lines
    rows = _wait_fleet(url, lambda r: all(x["state"] == "active" for x in r
                                          if x["component"] == "priority"), 10)
    prio = [r for r in rows if r["component"] == "priority"]
    assert len(prio) == 5 and all(r["sequence"] == 2 and r["active_sequence"] == 2
                                  and r["active_version"].startswith("1.0.2+")
                                  and r["agreement"] == 1.0
                                  for r in prio), prio
    for gw in gws:
        st = json.loads((gw.data_dir / "status.json").read_text())
        assert st["ota"]["components"]["priority"]["state"] == "active"
        assert st["intelligence"]["models"]["priority"]["version"].startswith("1.0.2+")
    # an older manifest, replayed on the class topic: refused everywhere, nothing changes
    res = _cli("ota", "publish", "--url", url, "--manifest", str(old[0]), "--payload",
               str(old[1]))
    assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 15
    refused: list[int] = []
    while time.monotonic() < deadline:
        refused = [json.loads((g.data_dir / "status.json").read_text())["ota"]["refused"]
                   .get("rollback", 0) for g in gws]
        if all(refused):
            break
        time.sleep(0.3)
    assert all(refused), refused
    assert all(r["active_sequence"] == 2 and r["state"] == "active"
               for r in _status(url) if r["component"] == "priority")
    print(json.dumps({"rollout_seconds_5_gateways": round(took, 1)}))


@pytest.mark.timeout(150)
def test_a_worse_model_halts_the_rollout_at_the_first_gateway(
        fleet: tuple[list[GatewayProcess], Traffic], mosquitto: MosquittoBroker,
        operator: Path, tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{mosquitto.port}"
    worse = constant_model(tmp_path / "models" / "bulk.onnx", 82, 4, 3)
    signed = _sign(operator, worse, 3, tmp_path / "signed", "2.0.0-bulk")
    _wait_fleet(url, lambda r: sum(x["online"] and x["state"] == "idle" for x in r) == 5, 30)
    res = _cli("ota", "rollout", "--url", url, "--manifest", str(signed[0]), "--payload",
               str(signed[1]), "--stage-timeout", "60", timeout=120)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "halted: stage 1: 1 of 1 gateways failed" in res.stdout, res.stdout
    rows = [r for r in _status(url) if r["component"] == "priority"]
    first = [r for r in rows if r["gateway"] == "gw-0"]
    assert first and first[0]["state"] == "rejected" and "agreement" in first[0]["reason"], rows
    assert first[0]["active_sequence"] is None  # still the shipped model
    others = [r for r in rows if r["gateway"] != "gw-0"]
    assert len(others) == 4 and all(r["state"] == "idle" and r["sequence"] is None
                                    for r in others), others
    # the state file says where it stopped; running it again does not start stage 2
    state = json.loads(signed[0].with_suffix(".rollout.json").read_text())
    assert state["halted"] and state["targeted"] == ["gw-0"]
