"""Health and service management: ``/livez`` and ``/readyz`` of a real gateway (503 with
the reason while a required upstream is down, 200 once it is up), systemd ``Type=notify``
through a real NOTIFY_SOCKET (READY=1 only once the listeners accept, WATCHDOG=1 keeps
coming), the unit checked by ``systemd-analyze verify`` and the Kubernetes probes."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from rapidmq_edge.config import parse_config

from .conftest import LOOPBACK, MosquittoBroker, _require_binary, free_port, wait_for_port
from .gateway_proc import GatewayProcess

pytestmark = pytest.mark.timeout(60)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _probe(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_readyz_waits_for_a_required_upstream(
        gateway_factory: Callable[..., GatewayProcess],
        mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path) -> None:
    up_port = free_port()  # nothing listens there yet
    http = free_port()
    gw = gateway_factory({
        "http": {"listen": [f"http://{LOOPBACK}:{http}"]},
        "upstream": [{"name": "cloud", "urls": [f"mqtt://{LOOPBACK}:{up_port}"],
                      "keep_alive": 5, "reconnect_max_s": 0.5}],
        "forward": [{"filter": "#", "upstream": "cloud"}],
        "health": {"require_upstream": True},
    })
    assert wait_for_port(LOOPBACK, http)
    base = f"http://{LOOPBACK}:{http}"
    status, body = _probe(f"{base}/readyz")
    assert status == 503 and not body["ok"]
    assert any("no upstream link is up: cloud" in r for r in body["reasons"]), body  # type: ignore[attr-defined]
    assert _probe(f"{base}/livez") == (200, {"ok": True, "reasons": []})
    # the upstream comes up on that port: ready
    conf = tmp_path / "late.conf"
    conf.write_text(f"listener {up_port} {LOOPBACK}\nallow_anonymous true\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    _require_binary("/usr/sbin/mosquitto")
    proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while _probe(f"{base}/readyz")[0] != 200:
            assert time.monotonic() < deadline, _probe(f"{base}/readyz")
            time.sleep(0.1)
        proc.terminate()
        proc.wait(timeout=5)
        deadline = time.monotonic() + 15  # and not ready again once it is gone
        while _probe(f"{base}/readyz")[0] != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    gw.stop()


def test_systemd_notify_ready_after_listeners_and_watchdog_pings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # pings every 0.5 s
    gw = GatewayProcess(tmp_path, {"mqtt": {"sys_interval": 0}})
    try:
        gw.start()
        messages: list[tuple[float, str, bool]] = []  # when, what, port accepting then
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                data = sock.recv(4096).decode()
            except TimeoutError:
                continue
            accepting = False
            if "READY=1" in data:
                with socket.create_connection((LOOPBACK, gw.port), timeout=1):
                    accepting = True
            messages.append((time.monotonic(), data, accepting))
            if sum("WATCHDOG=1" in m for _, m, _ in messages) >= 5:
                break
        texts = [m for _, m, _ in messages]
        ready = [i for i, m in enumerate(texts) if "READY=1" in m]
        assert ready, texts
        assert messages[ready[0]][2], "READY=1 came before the MQTT listener accepted"
        assert "STATUS=0 clients" in texts[ready[0]], texts[ready[0]]
        pings = [t for t, m, _ in messages if "WATCHDOG=1" in m]
        assert len(pings) >= 5, texts
        assert min(pings) >= messages[ready[0]][0] - 0.05  # pings only once serving
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert max(gaps) < 1.0, gaps  # within WATCHDOG_USEC: systemd would not kill it
        gw.stop()
        tail = []
        with_timeout = time.monotonic() + 3
        while time.monotonic() < with_timeout:
            try:
                tail.append(sock.recv(4096).decode())
            except (TimeoutError, OSError):
                break
        assert any("STOPPING=1" in m for m in tail), tail
    finally:
        gw.stop()
        sock.close()


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart/ExecStartPre pointing at this venv's command."""
    exe = shutil.which("rapidmq-edge", path=str(Path(sys.executable).parent))
    assert exe is not None
    text = (DEPLOY / "systemd" / "rapidmq-edge.service").read_text()
    out = tmp_path / "rapidmq-edge.service"
    out.write_text(text.replace("/opt/rapidmq-edge/bin/rapidmq-edge", exe))
    return out


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    _require_binary("systemd-analyze")
    unit = _unit_for_this_machine(tmp_path)
    keys = dict(re.findall(r"^(\w+)=(.*)$", unit.read_text(), re.M))
    assert keys["Type"] == "notify" and keys["NotifyAccess"] == "main"
    assert keys["WatchdogSec"] == "30s" and keys["Restart"] == "on-failure"
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    # the checker reads the keys: a misspelt one is reported (else this test proves nothing)
    bad = tmp_path / "bad" / "rapidmq-edge.service"
    bad.parent.mkdir()
    bad.write_text(unit.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    res = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True,
                         text=True, timeout=30)
    assert "Unknown key" in res.stderr and "WatchdogSecs" in res.stderr, res.stderr


def test_kubernetes_probes_use_the_health_endpoints(tmp_path: Path) -> None:
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    # the port they name is where the shipped config's HTTP listener is
    cm = yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    doc = tomllib.loads(cm["data"]["gateway.toml"])
    config = parse_config(doc, tmp_path)
    assert [ep.port for ep in config.http.listen] == [ports["http"]]
    assert config.metrics.enabled
