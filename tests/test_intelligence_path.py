"""The intelligence runtime in a real gateway process: real paho clients, real Mosquitto
upstream, real onnxruntime sessions on the committed models."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from rapidmq_edge.config import ConfigError, parse_config
from rapidmq_edge.security.users import add_user

from .conftest import MosquittoBroker, free_port
from .gateway_proc import GatewayProcess
from .test_store_forward import Collector, _persistent_cloud

V2 = mqtt.CallbackAPIVersion.VERSION2
MODELS = Path(__file__).resolve().parent.parent / "models"
STREAM = "site/s23/temperature/sn0008/reading"


class Listener:
    """A paho MQTT 5 client on the gateway that records what it receives."""

    def __init__(self, port: int, topic: str) -> None:
        self.got: dict[str, bytes] = {}
        self.order: list[str] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.c = mqtt.Client(V2, client_id=f"l-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
        self.c.on_message = self._msg
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe(topic, qos=1)
        assert ready.wait(5)

    def _msg(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got[m.topic] = m.payload
            self.order.append(m.topic)

    def wait(self, pred: Callable[[dict[str, bytes]], bool], timeout: float = 8.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if pred(self.got):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _device(port: int, cid: str) -> mqtt.Client:
    c = mqtt.Client(V2, client_id=cid, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def _send(dev: mqtt.Client, items: list[tuple[str, bytes]], qos: int = 1,
          gap: float = 0.0) -> None:
    infos = []
    for topic, payload in items:
        infos.append(dev.publish(topic, payload, qos=qos))
        if gap:
            time.sleep(gap)
    for info in infos:
        info.wait_for_publish(20)
        assert info.is_published()


#: device time of the replayed readings: one every 5 minutes from here
T0 = 1_700_000_000.0


def _reading(i: int, value: float, ts: float | None = None) -> tuple[str, bytes]:
    return STREAM, json.dumps({"ts": round(time.time() if ts is None else ts, 3), "seq": i,
                               "value": value, "unit": "C"}, separators=(",", ":")).encode()


def _history(values: list[float], start: int = 0) -> list[tuple[str, bytes]]:
    """Readings on the device's clock, 5 minutes apart (a buffered history, sent at once)."""
    return [_reading(start + i, v, T0 + 300.0 * (start + i)) for i, v in enumerate(values)]


def _healthy(n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return [round(20.0 + float(v), 2) for v in rng.normal(0, 0.2, n)]


BULK = [(f"plant1/line5/log/node{i:04d}/lines",
         f"2023-11-14T22:13:{i % 60:02d}.790Z DEBUG fwupd[{i}]: alarm zone scan {i} idle".encode())
        for i in range(150)]
CRITICAL = [("devices/dev0025/alarm/evt",
             b'{"ts":1700000380.633,"seq":6,"event":"alarm","type":"fire","zone":1,'
             b'"severity":"critical"}'),
            ("plant1/line5/log/node0022/lines",
             b"2023-11-14T22:21:08.473Z CRITICAL fwupd[39]: power supply failure")]


def _config(up_port: int, **intel: Any) -> dict[str, Any]:
    return {
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{up_port}"],
                      "keep_alive": 5}],
        "forward": [{"filter": "#", "upstream": "cloud", "qos": 1}],
        "queue": {"commit_delay_ms": 2.0},
        "intelligence": {"enabled": True, **intel},
    }


def _sys_until(port: int, key: str, pred: Callable[[str], bool],
               timeout: float = 8.0) -> dict[str, str]:
    """``$SYS/broker/intelligence/...`` once ``pred`` holds for ``key`` (published each second)."""
    lst = Listener(port, "$SYS/broker/intelligence/#")
    topic = f"$SYS/broker/intelligence/{key}"
    try:
        lst.wait(lambda g: topic in g and pred(g[topic].decode()), timeout)
        with lst.lock:
            return {k.removeprefix("$SYS/broker/intelligence/"): v.decode()
                    for k, v in lst.got.items()}
    finally:
        lst.close()


def test_anomaly_incident_local_and_upstream_ahead_of_bulk_and_critical_first(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    """A day of healthy readings on the device's clock teaches the stream; a 20-sigma
    reading opens one incident (one alert, not one per reading), announced locally and
    upstream ahead of the bulk backlog; normal readings close it with a second alert."""
    port = free_port()
    start_upstream = _persistent_cloud(mosquitto_factory, port, tmp_path)
    gw = gateway_factory(_config(port, episode_close_readings=10))
    alerts = Listener(gw.port, "$edge/alerts/#")
    dev = _device(gw.port, "dev-a")
    # white noise has ~4 false openings per 1,000 readings; seed 5 has none in these 340
    healthy = _healthy(340, seed=5)
    try:
        _send(dev, BULK)  # upstream down: a bulk backlog builds up
        _send(dev, _history(healthy[:320]))
        time.sleep(0.05)
        spike = 24.5  # ~20 sigma above a 0.2-sigma stream
        _send(dev, _history([spike], 320))
        _send(dev, CRITICAL)
        assert alerts.wait(lambda g: any(t.endswith(STREAM) for t in g)), alerts.order
        found = {t for t in alerts.got if t.endswith(STREAM)}
        assert len(found) == 1, found
        [topic] = found
        body = json.loads(alerts.got[topic])
        assert body["state"] == "open" and body["reading"] == spike and body["stream"] == STREAM
        assert topic == f"$edge/alerts/{body['kind']}/{STREAM}"
        assert body["source"] == "detector" and body["model"] == "stream-detector/1"
        assert body["at"] == T0 + 300.0 * 320  # judged on the device's own clock
        assert abs(body["expected"] - 20.0) < 0.5 and body["band"][0] < 20 < body["band"][1]
        assert body["score"] >= 0.99 and body["incident"]
        _send(dev, _history(healthy[320:340], 321))  # back to normal: the incident closes
        assert alerts.wait(lambda g: json.loads(g[topic]).get("state") == "closed")
        closed = json.loads(alerts.got[topic])
        assert closed["incident"] == body["incident"] and closed["readings"] >= 10
        assert alerts.order.count(topic) == 2  # opened once, closed once
    finally:
        dev.disconnect()
        dev.loop_stop()
        alerts.close()
    start_upstream()
    cloud = Collector(port, "edge/#", client_id="cloud")
    try:
        n = len(BULK) + 341 + len(CRITICAL) + 2
        got = cloud.wait_for(n, 30)
        topics = [t for t, _, _ in got]
        up_alert = f"edge/test-gw/alerts/{body['kind']}/{STREAM}"
        assert up_alert in topics, topics[:5]
        first_bulk = min(i for i, t in enumerate(topics) if "/log/" in t and t.endswith("lines")
                         and b"DEBUG" in got[i][1])
        assert topics.index(up_alert) < first_bulk
        crit = [i for i, (_, p, _) in enumerate(got) if b"critical" in p.lower()
                and not got[i][0].startswith("edge/test-gw/alerts/")]
        assert len(crit) == 2 and max(crit) < first_bulk, (crit, first_bulk)
        assert len({p for _, p, _ in got if b"DEBUG" in p}) == len(BULK)  # nothing lost
    finally:
        cloud.close()
    sys = _sys_until(gw.port, "alerts", lambda v: v == "2")
    assert int(sys["alerts"]) == 2 and sys["models/anomaly/source"] == "detector"
    assert sys["incidents/opened"] == "1" and sys["incidents/closed"] == "1"
    assert int(sys["device_times"]) >= 341
    assert int(sys["classes/bulk"]) >= len(BULK) and sys["fallback_active"] == "false"


def test_summarisation_past_backlog_threshold(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    port = free_port()
    start_upstream = _persistent_cloud(mosquitto_factory, port, tmp_path)
    gw = gateway_factory(_config(port, summarise_backlog_messages=100, summary_window_s=1.0,
                                 pressure_check_s=0.1))
    dev = _device(gw.port, "dev-s")
    try:
        _send(dev, BULK[:120])  # backlog 120 >= 100 while the upstream is down
        on = _sys_until(gw.port, "summarising", lambda v: v == "true")
        assert on["summarising"] == "true", "summarising never switched on"
        assert "backlog messages" in on["summarising_reason"]
        values = _healthy(30, seed=3)
        _send(dev, [_reading(i, v) for i, v in enumerate(values)], gap=0.01)
        time.sleep(1.5)  # the 1 s window closes and its summary is queued
    finally:
        dev.disconnect()
        dev.loop_stop()
    sys = _sys_until(gw.port, "summaries", lambda v: int(v) >= 1)
    assert int(sys["summarised_readings"]) == 30 and int(sys["summaries"]) >= 1
    start_upstream()
    cloud = Collector(port, "edge/#", client_id="cloud")
    try:
        summary_topic = f"edge/test-gw/{STREAM}/summary"
        got = cloud.wait_for(120 + 1, 20)
        summaries = [json.loads(p) for t, p, _ in got if t == summary_topic]
        singles = [p for t, p, _ in got if t == f"edge/test-gw/{STREAM}"]
        assert summaries and not singles, (len(summaries), len(singles))
        assert sum(s["count"] for s in summaries) == 30
        assert min(s["min"] for s in summaries) == min(values)
        assert max(s["max"] for s in summaries) == max(values)
        total = sum(s["mean"] * s["count"] for s in summaries)
        assert abs(total / 30 - sum(values) / 30) < 1e-9
        assert all(s["stream"] == STREAM and s["end"] >= s["start"] for s in summaries)
    finally:
        cloud.close()


def test_summarised_readings_acknowledged_survive_kill_9(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    """Readings folded into a summary window are acknowledged only once the window is on
    disk: after ``kill -9`` the restarted gateway queues the window, every acknowledged
    reading counted (was: held in memory, lost with the process)."""
    port = free_port()
    start_upstream = _persistent_cloud(mosquitto_factory, port, tmp_path)
    gw = gateway_factory(_config(port, summarise_backlog_messages=100, summary_window_s=600.0,
                                 pressure_check_s=0.1))
    dev = _device(gw.port, "dev-k")
    try:
        _send(dev, BULK[:120])
        on = _sys_until(gw.port, "summarising", lambda v: v == "true")
        assert on["summarising"] == "true", "summarising never switched on"
        values = _healthy(30, seed=5)
        _send(dev, [_reading(i, v) for i, v in enumerate(values)], gap=0.01)  # all acked
        sys = _sys_until(gw.port, "summarised_readings", lambda v: int(v) >= 30)
        assert int(sys["summarised_readings"]) == 30 and int(sys["summaries"]) == 0
    finally:
        dev.disconnect()
        dev.loop_stop()
    gw.restart(hard=True)  # SIGKILL with the 600 s window open
    assert "1 summary window(s) left open by the previous run" in gw.log()
    start_upstream()
    cloud = Collector(port, "edge/#", client_id="cloud")
    try:
        got = cloud.wait_for(120 + 1, 20)
        summaries = [json.loads(p) for t, p, _ in got
                     if t == f"edge/test-gw/{STREAM}/summary"]
        assert [s["count"] for s in summaries] == [30]
        assert summaries[0]["min"] == min(values) and summaries[0]["max"] == max(values)
        assert abs(summaries[0]["mean"] - sum(values) / 30) < 1e-9
        assert not [p for t, p, _ in got if t == f"edge/test-gw/{STREAM}"]
    finally:
        cloud.close()
    seen = len(gw.log())
    gw.restart()  # the window was queued and its state deleted in one commit: not again
    assert "left open by the previous run" not in gw.log()[seen:]


class Flooder:
    """A paho MQTT 5 client publishing QoS 0 as fast as it can (about 2000/s) from a thread
    until it is disconnected or stopped, at most ``limit`` seconds (bounded backlog)."""

    def __init__(self, port: int, limit: float = 15.0) -> None:
        self.reasons: list[int] = []
        self.gone = threading.Event()
        self.stop = threading.Event()
        self.c = mqtt.Client(V2, client_id="flooder", protocol=mqtt.MQTTv5)
        self.c.on_disconnect = self._disconnected
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.thread = threading.Thread(target=self._run, args=(limit,), daemon=True)
        self.thread.start()

    def _disconnected(self, c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self.reasons.append(rc.value)
        self.gone.set()

    def _run(self, limit: float) -> None:
        payload = b"x" * 512
        deadline = time.monotonic() + limit
        i = 0
        while not (self.gone.is_set() or self.stop.is_set()) and time.monotonic() < deadline:
            self.c.publish(f"spam/flooder/{i % 2}", payload, qos=0)
            i += 1
            if i % 10 == 0:
                time.sleep(0.005)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.c.disconnect()
        self.c.loop_stop()


def _log_until(gw: GatewayProcess, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in gw.log():
            return True
        time.sleep(0.05)
    return False


def test_flooding_client_throttled_then_disconnected_with_reason_others_keep_working(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    # a flood is throttled first; still flooding at its limit (20/s = 200 per 10 s window,
    # a flood to the model) it is disconnected. The flooder floods until it is disconnected:
    # a fixed burst that the gateway happens to read within a fraction of a second (CPU
    # contention) has a short active span and would be judged with less confidence.
    gw = gateway_factory({"intelligence": {"enabled": True, "threat_interval_s": 0.2,
                                           "ban_s": 30, "throttle_rate": 20}})
    good = Listener(gw.port, "ok/#")
    flood = Flooder(gw.port)
    try:
        assert flood.gone.wait(15), "the flooder was not disconnected"
        # the reason arrives although the flooder was still writing (no reset before it)
        assert flood.reasons[0] == 0x96, hex(flood.reasons[0])  # Message rate too high
    finally:
        flood.close()
    log = gw.log()
    throttled = log.find("flooder looks like flood")
    assert 0 <= throttled < log.find("throttled to 20/s") < log.find(": disconnected"), log
    # others keep working
    dev = _device(gw.port, "dev-good")
    try:
        _send(dev, [(f"ok/{i}", b"fine") for i in range(20)])
        assert good.wait(lambda g: len(g) == 20)
    finally:
        dev.disconnect()
        dev.loop_stop()
        good.close()
    # the flooder's client id is banned for a while
    again = mqtt.Client(V2, client_id="flooder", protocol=mqtt.MQTTv5)
    codes: list[int] = []
    answered = threading.Event()
    again.on_connect = lambda c, u, f, rc, p: (codes.append(rc.value), answered.set())
    again.connect("127.0.0.1", gw.port)
    again.loop_start()
    try:
        assert answered.wait(5) and codes == [0x8A], codes  # Banned
    finally:
        again.loop_stop()
    sys = _sys_until(gw.port, "threat/recent", lambda v: "disconnected" in v)
    assert sys["threat/disconnected"] == "1" and int(sys["threat/detected/flood"]) >= 2
    assert sys["threat/throttled"] == "1" and sys["threat/throttled_now"] == "0"


def test_exempt_client_floods_unjudged_while_it_is_exempt(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    """A client id on ``threat_exempt_clients`` (a bridge, a PLC) is never throttled or
    disconnected for its rate; the same flood without the exemption is throttled."""
    gw = gateway_factory({"intelligence": {"enabled": True, "threat_interval_s": 0.2,
                                           "throttle_rate": 20,
                                           "threat_exempt_clients": ["flood*"]}})
    flood = Flooder(gw.port)
    try:
        sys = _sys_until(gw.port, "threat/exempt_connected", lambda v: v == "1")
        assert sys["threat/exempt_connected"] == "1"
        time.sleep(2.5)  # more than ten scoring ticks of flooding
        assert not flood.gone.is_set() and "looks like flood" not in gw.log(), gw.log()
    finally:
        flood.close()
    sys = _sys_until(gw.port, "threat/exempt_connected", lambda v: v == "0")
    assert sys["threat/throttled"] == "0" and sys["threat/disconnected"] == "0"
    with pytest.raises(ConfigError, match="threat_exempt_users"):
        parse_config({"intelligence": {"threat_exempt_users": "bridge"}}, Path("/tmp"))


def test_throttled_flooder_held_at_its_limit_normal_client_unaffected(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    limit = 20.0
    gw = gateway_factory({"intelligence": {"enabled": True, "threat_interval_s": 0.2,
                                           "threat_action": "throttle",
                                           "throttle_rate": limit}})
    arrivals: list[float] = []
    lock = threading.Lock()
    ready = threading.Event()
    spy = mqtt.Client(V2, client_id="spy", protocol=mqtt.MQTTv5)

    def on_message(c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        with lock:
            arrivals.append(time.monotonic())

    spy.on_message = on_message
    spy.on_subscribe = lambda *a: ready.set()
    spy.connect("127.0.0.1", gw.port)
    spy.loop_start()
    spy.subscribe("spam/#", qos=0)
    assert ready.wait(5)
    good = Listener(gw.port, "ok/#")
    flood = Flooder(gw.port)
    try:
        assert _log_until(gw, "throttled to 20/s", 8), gw.log()
        t_throttle = time.monotonic()
        with lock:
            before = list(arrivals)
        assert before and len(before) / max(t_throttle - before[0], 0.05) > 5 * limit
        # a normal client publishes at full speed meanwhile
        dev = _device(gw.port, "dev-normal")
        try:
            t0 = time.monotonic()
            _send(dev, [(f"ok/{i}", b"fine") for i in range(100)])
            assert good.wait(lambda g: len(g) == 100)
            assert time.monotonic() - t0 < 100 / limit / 2  # far above the flooder's limit
        finally:
            dev.disconnect()
            dev.loop_stop()
        time.sleep(max(0.0, t_throttle + 0.5 - time.monotonic()))  # bucket burst spent
        with lock:
            n0 = len(arrivals)
        t0 = time.monotonic()
        time.sleep(2.0)  # the measuring interval (not a synchronisation)
        with lock:
            n1 = len(arrivals)
        rate = (n1 - n0) / (time.monotonic() - t0)
        assert 0.5 * limit <= rate <= 1.3 * limit, rate  # held at its limit, still served
        assert not flood.gone.is_set()  # "throttle" never disconnects
    finally:
        flood.close()
        spy.loop_stop()
        good.close()
    # "recent" is the last of the threat counters published
    sys = _sys_until(gw.port, "threat/recent", lambda v: "flooder flood throttled" in v)
    assert json.loads(sys["threat/recent"]) == ["flooder flood throttled to 20/s"]
    assert sys["threat/throttled"] == "1" and sys["threat/disconnected"] == "0"


def test_credential_guessing_is_banned(
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    users = tmp_path / "users.toml"
    add_user(users, "alice", "wonderland")
    gw = gateway_factory({"auth": {"allow_anonymous": False, "users_file": str(users)},
                          "intelligence": {"enabled": True, "threat_interval_s": 0.2}})
    codes: list[int] = []
    for i in range(25):
        c = mqtt.Client(V2, client_id="guesser", protocol=mqtt.MQTTv5)
        c.username_pw_set(["admin", "root", "pi"][i % 3], f"guess{i}")
        got = threading.Event()
        c.on_connect = lambda cl, u, f, rc, p, got=got: (codes.append(rc.value), got.set())
        c.connect("127.0.0.1", gw.port)
        c.loop_start()
        got.wait(3)
        c.loop_stop()
        c.disconnect()
        if codes and codes[-1] == 0x8A:
            break
        time.sleep(0.05)
    assert codes[0] == 0x86 and codes[-1] == 0x8A, [hex(c) for c in codes]  # then Banned
    ok = mqtt.Client(V2, client_id="alice-1", protocol=mqtt.MQTTv5)
    ok.username_pw_set("alice", "wonderland")
    res: list[int] = []
    done = threading.Event()
    ok.on_connect = lambda cl, u, f, rc, p: (res.append(rc.value), done.set())
    ok.connect("127.0.0.1", gw.port)
    ok.loop_start()
    try:
        assert done.wait(5) and res == [0]  # the real user is not affected
    finally:
        ok.loop_stop()
        ok.disconnect()
    assert "guesser looks like credential_guessing" in gw.log()


def test_tampered_and_missing_models_fall_back_to_rules(
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    """A tampered or missing model is replaced by its rules; the gateway serves, and the
    anomaly detector (which needs no model file) keeps judging."""
    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    blob = bytearray((models / "threat.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # tampered: the sha256 no longer matches
    (models / "threat.onnx").write_bytes(bytes(blob))
    (models / "priority.onnx").unlink()  # missing
    gw = gateway_factory({"intelligence": {"enabled": True, "models_dir": str(models)}})
    alerts = Listener(gw.port, "$edge/alerts/#")
    dev = _device(gw.port, "dev-f")
    try:
        _send(dev, _history(_healthy(320, seed=5)))
        _send(dev, _history([25.0], 320))
        assert alerts.wait(lambda g: any(t.endswith(STREAM) for t in g)), alerts.order
        body = json.loads(next(v for t, v in alerts.got.items() if t.endswith(STREAM)))
        assert body["source"] == "detector" and body["state"] == "open"
    finally:
        dev.disconnect()
        dev.loop_stop()
        alerts.close()
    sys = _sys_until(gw.port, "fallback_active", lambda v: v == "true")
    assert sys["fallback_active"] == "true" and sys["models/threat/source"] == "rules"
    assert "sha256" in sys["models/threat/fallback"]
    assert sys["models/anomaly/source"] == "detector"
    assert sys["models/priority/source"] == "off"  # no upstream: nothing to prioritise
    log = gw.log()
    assert "threat model not used, rule fallback active" in log
