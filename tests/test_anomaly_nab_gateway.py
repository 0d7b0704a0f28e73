"""A real NAB series through a running gateway: its labelled anomaly windows become
incidents, and few incidents open anywhere else.

``realKnownCause/machine_temperature_system_failure.csv`` (22,695 readings of an industrial
machine's temperature, 5-minute steps, four labelled failures) from the shared NAB subset
(``../shared/datasets/nab``, never used to tune the detector's defaults) is published by a
paho client as ``{"value": x, "ts": "<RFC 3339>"}`` on one topic, QoS 1, as fast as the
gateway acknowledges it (the device's clock in the payload, so the gateway judges the
series on its own time). The incidents are what ``$edge/alerts/<kind>/<topic>`` says.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from rapidmq_edge.intelligence.stream_detector import KINDS
from tests.gateway_proc import GatewayProcess

NAB = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "nab"
NAME = "realKnownCause/machine_temperature_system_failure.csv"
TOPIC = "plant/machine7/temperature"
V2 = mqtt.CallbackAPIVersion.VERSION2


def _epoch(s: str) -> float:
    return datetime.fromisoformat(s.strip()).replace(tzinfo=UTC).timestamp()


def test_nab_series_through_gateway_opens_incidents_in_its_windows(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    path = NAB / "data" / NAME
    assert path.is_file(), f"{path} is missing (shared/datasets/nab beside the clone)"
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    windows = [(_epoch(a), _epoch(b)) for a, b in
               json.loads((NAB / "labels" / "windows.json").read_text())[NAME]]
    gw = gateway_factory({
        "intelligence": {"enabled": True, "priority": "rules", "health": False,
                         "threat_exempt_clients": ["historian"]},  # a bridge replaying
    })
    opened: list[dict[str, Any]] = []
    closed: list[dict[str, Any]] = []
    lock = threading.Lock()
    ready = threading.Event()

    def on_message(c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        body = json.loads(m.payload)
        with lock:
            (opened if body["state"] == "open" else closed).append(body)

    alerts = mqtt.Client(V2, client_id="operator", protocol=mqtt.MQTTv5)
    alerts.on_message = on_message
    alerts.on_subscribe = lambda *a: ready.set()
    alerts.connect("127.0.0.1", gw.port)
    alerts.loop_start()
    alerts.subscribe(f"$edge/alerts/+/{TOPIC}", qos=1)
    assert ready.wait(5)
    dev = mqtt.Client(V2, client_id="historian", protocol=mqtt.MQTTv5)
    dev.max_inflight_messages_set(100)
    connected = threading.Event()
    dev.on_connect = lambda *a: connected.set()
    dev.connect("127.0.0.1", gw.port)
    dev.loop_start()
    try:
        assert connected.wait(5)
        payloads = [json.dumps({"value": float(r["value"]),
                                "ts": r["timestamp"].replace(" ", "T") + "Z"}) for r in rows]
        for i in range(0, len(payloads), 1000):  # QoS 1, 100 in flight (the receive maximum)
            infos = [dev.publish(TOPIC, p, qos=1) for p in payloads[i:i + 1000]]
            for info in infos:
                info.wait_for_publish(30)
                assert info.is_published()
        # the last reading is scored before the gateway acknowledges it: alerts are out
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if all(b["incident"] in {c["incident"] for c in closed} for b in opened):
                    break  # nothing left open that may still close
            time.sleep(0.1)
    finally:
        dev.disconnect()
        dev.loop_stop()
        alerts.disconnect()
        alerts.loop_stop()
    with lock:
        opens = [b["at"] for b in opened]
    assert opened, "no incident on a series with four labelled failures"
    for b in opened:  # every incident carries what an operator needs
        assert b["stream"] == TOPIC and b["model"] == "stream-detector/1"
        assert b["kind"] in set(KINDS)
        assert 0.99 <= b["score"] <= 1.0 and b["incident"] and len(b["band"]) == 2
    inside = [t for t in opens if any(a <= t <= b for a, b in windows)]
    hit = [w for w in windows if any(w[0] <= t <= w[1] for t in opens)]
    probation_end = _epoch(rows[min(int(0.15 * len(rows)), 750)]["timestamp"])
    outside = [t for t in opens if t >= probation_end
               and not any(a <= t <= b for a, b in windows)]
    assert len(hit) >= 3, (windows, opens)  # measured: 3 of 4 (offline the same)
    assert inside and len(outside) <= 22, outside  # < 1 per 1,000 readings (measured 10)
    # judged on the device's clock: every incident is at one of the series' own timestamps
    stamps = {_epoch(r["timestamp"]) for r in rows}
    assert all(t in stamps for t in opens)
