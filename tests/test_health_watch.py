"""The gateway watches its own health with the stream detector: a disk that stalls (the
forward queue's database held by another process, so commits wait) opens an incident on
the commit latency, announced on ``$edge/alerts/health/commit_ms`` and under ``$SYS``, and
closes once the disk is back."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from .conftest import free_port
from .gateway_proc import GatewayProcess

V2 = mqtt.CallbackAPIVersion.VERSION2


def test_a_stalled_disk_opens_a_health_incident_and_closes_it(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_factory({
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{free_port()}"]}],
        "forward": [{"filter": "sensors/#", "upstream": "cloud"}],
        "queue": {"durability": "normal"},
        "intelligence": {"enabled": True, "threat": "off", "health_interval_s": 0.05},
    })
    got: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()
    watcher = mqtt.Client(V2, client_id="ops", protocol=mqtt.MQTTv5)

    def on_message(c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        with lock:
            got.append((m.topic, json.loads(m.payload)))

    watcher.on_message = on_message
    watcher.connect("127.0.0.1", gw.port)
    watcher.loop_start()
    watcher.subscribe("$edge/alerts/health/#", qos=1)
    dev = mqtt.Client(V2, client_id="dev", protocol=mqtt.MQTTv311)
    dev.connect("127.0.0.1", gw.port)
    dev.loop_start()
    stop = threading.Event()

    def publish() -> None:  # steady traffic: a commit every few milliseconds
        i = 0
        while not stop.is_set():
            dev.publish("sensors/t", b'{"value": %d}' % (i % 7), qos=0)
            i += 1
            time.sleep(0.01)

    feeder = threading.Thread(target=publish, daemon=True)
    feeder.start()

    def wait(pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                if pred():
                    return True
            time.sleep(0.05)
        return False

    try:
        time.sleep(10)  # 200 samples: the detector learns the healthy commit latency
        with lock:
            assert not [t for t, _ in got if t.endswith("/commit_ms")], got
        db = sqlite3.connect(gw.data_dir / "forward.db", timeout=1)
        db.execute("BEGIN EXCLUSIVE")  # the disk stalls: every commit waits
        time.sleep(2.0)
        db.execute("ROLLBACK")
        db.close()
        topic = "$edge/alerts/health/commit_ms"
        assert wait(lambda: any(t == topic and b["state"] == "open" for t, b in got), 10), got
        opened = next(b for t, b in got if t == topic and b["state"] == "open")
        assert opened["metric"] == "commit_ms" and opened["source"] == "health"
        assert opened["reading"] > 200 and opened["reading"] > 10 * opened["expected"]
        assert wait(lambda: any(t == topic and b["state"] == "closed" for t, b in got), 20)
        closed = next(b for t, b in got if t == topic and b["state"] == "closed")
        assert closed["incident"] == opened["incident"] and closed["worst"] > 1500
        assert closed["duration_s"] >= 1.5  # open for as long as the disk stalled
    finally:
        stop.set()
        feeder.join(5)
        dev.loop_stop()
        watcher.loop_stop()
    status = json.loads((gw.data_dir / "status.json").read_text())
    assert status["health"]["incidents"] >= 1 and "commit_ms" in status["health"]["metrics"]
