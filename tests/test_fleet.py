"""The fleet view through a real Mosquitto upstream: two gateway processes keep a retained
status on ``rapidmq/fleet/<id>``; ``rapidmq-edge fleet status`` lists both online; after
``kill -9`` of one, the broker publishes its will and the table shows it offline; a graceful
stop says offline too."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from rapidmq_edge.ops.fleet import AlertWindow, fleet_table

from .conftest import LOOPBACK, MosquittoBroker
from .gateway_proc import GatewayProcess

pytestmark = pytest.mark.timeout(60)


def _fleet(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rapidmq_edge", "fleet", "status", "--url", url, "--wait",
         "0.5", *extra], capture_output=True, text=True, timeout=20)


def _statuses(url: str) -> dict[str, dict[str, Any]]:
    res = _fleet(url, "--json")
    assert res.returncode == 0, res.stderr
    return {s["id"]: s for s in json.loads(res.stdout)}


def _until(url: str, ok: Callable[[dict[str, dict[str, Any]]], bool],
           timeout: float = 15) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = _statuses(url)
        if ok(found):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.2)


def _gateway(factory: Callable[..., GatewayProcess], gid: str, port: int) -> GatewayProcess:
    return factory({
        "gateway": {"id": gid},
        "upstream": [{"name": "cluster", "urls": [f"mqtt://{LOOPBACK}:{port}"],
                      "keep_alive": 5}],
        "forward": [{"filter": "data/#", "upstream": "cluster"}],
        "fleet": {"enabled": True, "interval_s": 1.0},
    })


def test_fleet_status_lists_gateways_and_shows_a_killed_one_offline(
        gateway_factory: Callable[..., GatewayProcess], mosquitto: MosquittoBroker) -> None:
    url = f"mqtt://{LOOPBACK}:{mosquitto.port}"
    a = _gateway(gateway_factory, "gw-a", mosquitto.port)
    b = _gateway(gateway_factory, "gw-b", mosquitto.port)
    found = _until(url, lambda f: {"gw-a", "gw-b"} <= f.keys()
                   and all(f[g]["state"] == "online" for g in ("gw-a", "gw-b")))
    st = found["gw-a"]
    assert st["upstreams"] == {"cluster": True}
    assert st["backlog"] == 0 and st["alerts_1h"] == 0 and st["uptime_s"] >= 0
    assert st["version"] and isinstance(st["models"], dict)
    table = _fleet(url)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["GATEWAY", "STATE", "VERSION"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["gw-a", "online"], ["gw-b", "online"]]

    b.kill()  # no shutdown code runs: only the will can tell
    found = _until(url, lambda f: f.get("gw-b", {}).get("state") == "offline")
    assert found["gw-a"]["state"] == "online"
    rows = {ln.split()[0]: ln.split()[1] for ln in _fleet(url).stdout.splitlines()[1:]}
    assert rows == {"gw-a": "online", "gw-b": "offline"}

    a.stop()  # a graceful stop sends no will: the gateway says it itself
    _until(url, lambda f: f.get("gw-a", {}).get("state") == "offline")


def test_fleet_status_cannot_reach_the_cluster() -> None:
    from .conftest import free_port

    res = _fleet(f"mqtt://{LOOPBACK}:{free_port()}", "--timeout", "1")
    assert res.returncode == 1 and "no subscription" in res.stderr


def test_alert_window_and_table() -> None:
    w = AlertWindow(window=3600)
    assert w.observe(0.0, 5) == 0
    assert w.observe(1800.0, 8) == 3
    # the baseline is the last reading at least an hour old (sampled every interval_s)
    assert w.observe(3700.0, 10) == 5
    assert w.observe(5500.0, 12) == 4  # the reading at 0 s left the hour
    text = fleet_table([{"id": "z", "state": "offline", "at": None},
                        {"id": "a", "state": "online", "version": "1", "uptime_s": 7200,
                         "backlog": 3, "upstreams": {"c": False}, "models": {"p": "2"},
                         "alerts_1h": 1, "at": 100.0}], now=130.0)
    rows = [ln.split() for ln in text.splitlines()]
    assert rows[1] == ["a", "online", "1", "2.0h", "3", "c:DOWN", "p=2", "1", "30s", "ago"]
    assert rows[2][:2] == ["z", "offline"]
