"""The fleet simulator: a pure seeded generator, and its replay against the real gateway."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt

from firmware_sim.generator import generate
from firmware_sim.runner import RunnerConfig, run_fleet, write_labels
from firmware_sim.scenario import FAULTS, PRIORITIES, THREATS, Scenario

from .gateway_proc import GatewayProcess

LOOPBACK = "127.0.0.1"
SMALL = Scenario(seed=7, devices=60, duration=1800.0, coap_fraction=0.25, fault_rate=4.0,
                 attackers=3, misconfigured=1, dashboards=1)


def test_same_seed_same_run_other_seed_other_run() -> None:
    a, b, c = generate(SMALL), generate(SMALL), generate(Scenario(**{**SMALL.to_dict(),
                                                                     "seed": 8}))
    assert [(m.t, m.topic, m.payload, m.label()["fault"]) for m in a.messages] == \
        [(m.t, m.topic, m.payload, m.label()["fault"]) for m in b.messages]
    assert a.actions == b.actions and a.outages == b.outages
    assert [m.payload for m in a.messages[:200]] != [m.payload for m in c.messages[:200]]


def test_ground_truth_covers_every_class_and_is_consistent() -> None:
    run = generate(SMALL)
    assert {m.priority for m in run.messages} == set(PRIORITIES)
    assert {m.fault for m in run.messages} == set(FAULTS)
    assert {a.label for a in run.actions} == set(THREATS)
    assert {m.kind for m in run.messages} == {"temperature", "vibration", "power", "door",
                                              "alarm", "log"}
    by_topic: dict[str, list] = {}
    for m in run.messages:
        by_topic.setdefault(m.topic, []).append(m)
    for msgs in by_topic.values():
        for prev, m in zip(msgs, msgs[1:], strict=False):
            if m.fault == "stuck" and not m.grace:
                assert m.value == prev.value  # a stuck sensor repeats itself exactly
            if m.fault == "burst" and not m.grace:
                assert m.t - prev.t < 0.2 * run.devices[m.device]["period"]
    # payloads: JSON for MQTT devices, CBOR for CoAP ones, text for log lines
    for m in run.messages:
        if m.content_format == "json":
            body = json.loads(m.payload)
        elif m.content_format == "cbor":
            assert m.protocol == "coap"
            body = cbor2.loads(m.payload)
        else:
            assert m.kind == "log" and b" " in m.payload
            continue
        assert body["seq"] == m.seq and body["ts"] >= SMALL.start_epoch
        if m.value is not None:
            assert body["value"] == m.value
    # no device publishes while it is offline
    for o in run.outages:
        assert not any(m.device == o.device and o.start <= m.t < o.end for m in run.messages)
    # an offline MQTT device disconnects and reconnects around its outage
    assert sum(a.action == "disconnect" and a.label == "benign" for a in run.actions) > 0


def test_cli_dry_run_writes_identical_labels(tmp_path: Path) -> None:
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        res = subprocess.run(
            [sys.executable, "-m", "firmware_sim", "--dry-run", "--seed", "5", "--devices", "30",
             "--duration", "600", "--attackers", "2", "--out", str(out)],
            capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(res.stdout)["messages"] > 100
        outs.append(out)
    for f in ("labels.jsonl", "clients.jsonl", "outages.jsonl", "run.json"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()
    labels = [json.loads(line) for line in (outs[0] / "labels.jsonl").read_text().splitlines()]
    assert {"priority", "fault", "grace", "topic", "seq"} <= set(labels[0])
    bad = subprocess.run([sys.executable, "-m", "firmware_sim", "--coap-fraction", "2",
                          "--dry-run"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "coap-fraction" in bad.stderr


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def test_fleet_replay_through_the_gateway(tmp_path: Path) -> None:
    """MQTT and CoAP devices reach an MQTT subscriber byte for byte; labels beside the run."""
    coap_port = _udp_port()
    gw = GatewayProcess(tmp_path, {"coap": {"listen": [f"udp://{LOOPBACK}:{coap_port}"]}})
    gw.start()
    sc = Scenario(seed=11, devices=24, duration=90.0, coap_fraction=0.25, fault_rate=20.0,
                  outage_rate=0.0, attackers=2, misconfigured=1, dashboards=1)
    run = generate(sc)
    got: list[tuple[str, bytes]] = []
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with lock:
            got.append((msg.topic, bytes(msg.payload)))

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sim-observer")
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe([("devices/#", 1), ("site/#", 1),
                                                ("plant0/#", 1), ("plant1/#", 1),
                                                ("plant2/#", 1), ("plant3/#", 1)])
    try:
        sub.connect(LOOPBACK, gw.port)
        sub.loop_start()
        assert subscribed.wait(10)
        out = tmp_path / "run"
        cfg = RunnerConfig(port=gw.port, coap_port=coap_port, time_scale=30.0, out_dir=out)
        stats = asyncio.run(asyncio.wait_for(run_fleet(run, cfg), 60))
        expected = Counter((m.topic, m.payload) for m in run.messages)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if sum(expected.values()) <= len(got):
                    break
            time.sleep(0.1)
        with lock:
            received = Counter(got)
    finally:
        sub.loop_stop()
        sub.disconnect()
        gw.stop()
    coap_msgs = [m for m in run.messages if m.protocol == "coap"]
    assert coap_msgs and stats.coap_published == len(coap_msgs), stats
    assert stats.mqtt_published >= len(run.messages) - len(coap_msgs)
    assert stats.connect_errors == 0, stats.errors
    missing = expected - received
    assert not missing, f"{sum(missing.values())} of {sum(expected.values())} missing"
    # CoAP devices' CBOR payloads arrive unchanged at the MQTT subscriber
    assert any(cbor2.loads(p)["seq"] >= 0 for t, p in received if t == coap_msgs[0].topic)
    # ground truth beside the run, identical to what the generator alone writes
    again = tmp_path / "again"
    write_labels(generate(sc), again, 30.0)
    assert (out / "labels.jsonl").read_bytes() == (again / "labels.jsonl").read_bytes()
    assert len((out / "labels.jsonl").read_text().splitlines()) == len(run.messages)
    assert json.loads((out / "stats.json").read_text())["coap_published"] == len(coap_msgs)
