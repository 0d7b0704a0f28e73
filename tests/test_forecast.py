"""Capacity forecast: the pure maths with injected time, the row-size estimate against a real
queue file, and the forecast in `rapidmq-edge status` and $SYS from a real gateway whose
upstream is down while devices keep publishing."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from rapidmq_edge.ops.forecast import (
    ROW_OVERHEAD,
    CapacityForecaster,
    Ewma,
    LaneBounds,
    format_duration,
)
from rapidmq_edge.ops.status import render
from rapidmq_edge.store.forward_queue import ForwardQueue

from .conftest import MosquittoBroker, free_port
from .gateway_proc import GatewayProcess

NORMAL = 2


def stats(lanes: dict[str, dict[int, tuple[int, int]]]) -> dict[str, Any]:
    """A ``ForwardQueue.stats()``-shaped document: upstream -> class -> (messages, bytes)."""
    ups = {
        up: {p: {"messages": m, "bytes": b, "in_flight": 0, "oldest_age": 0.0}
             for p, (m, b) in classes.items()}
        for up, classes in lanes.items()
    }
    return {
        "upstreams": ups,
        "messages": sum(c["messages"] for u in ups.values() for c in u.values()),
        "bytes": sum(c["bytes"] for u in ups.values() for c in u.values()),
    }


def run(fc: CapacityForecaster, seconds: int, inflow: float, drain: float, size: int = 100,
        start: tuple[int, int, float] = (0, 0, 0.0), free: int = 10**12,
        step: int = 5) -> tuple[dict[str, Any], tuple[int, int, float]]:
    """Feed ``fc`` a steady inflow/drain (msg/s) for ``seconds``; return the last forecast
    and the (queued, acked, time) reached."""
    queued, acked, t = start
    out: dict[str, Any] = {}
    for _ in range(seconds // step + 1):
        out = fc.observe(t, stats({"cloud": {NORMAL: (queued, queued * size)}}),
                         {"cloud": acked}, free)
        moved = min(queued + int(inflow * step), int(drain * step))
        queued += int(inflow * step) - moved
        acked += moved
        t += step
    return out, (queued, acked, t)


# =========================================================================== pure


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (45.4, "45 s"), (180, "3 min"), (7800, "2 h 10 min"), (18720, "5 h 12 min"),
    (7200, "2 h"), (3 * 86400 + 4 * 3600, "3 d 4 h"), (-5, "0 s"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_ewma_weights_by_elapsed_time() -> None:
    e = Ewma(tau=60)
    assert e.add(10.0, 5) == 10.0  # the first rate is taken as is
    assert e.add(0.0, 60) == pytest.approx(10.0 * 0.36788, rel=1e-4)  # one tau: 1/e left
    short = Ewma(60)
    short.add(10.0, 5)
    assert short.add(0.0, 1) > 9.8  # a short interval moves it little


def test_growing_queue_hits_its_class_bound() -> None:
    fc = CapacityForecaster({NORMAL: LaneBounds(max_messages=100_000)}, tau=30)
    out, (queued, _, _) = run(fc, 120, inflow=10, drain=0)
    up = out["upstreams"]["cloud"]
    assert up["state"] == "growing"
    assert up["inflow_msg_per_s"] == pytest.approx(10, rel=0.01)
    assert up["queue_full_in_s"] == pytest.approx((100_000 - queued + 50) / 10, rel=0.01)
    assert up["text"] == (
        f"queue full in {format_duration(up['queue_full_in_s'])} "
        "(class normal max_messages, then oldest dropped)"
    )


def test_refuse_new_class_and_byte_bound() -> None:
    fc = CapacityForecaster({NORMAL: LaneBounds(max_bytes=1_000_000, policy="refuse_new")})
    out, _ = run(fc, 60, inflow=20, drain=5, size=100)  # +1500 B/s
    up = out["upstreams"]["cloud"]
    assert up["growth_msg_per_s"] == pytest.approx(15, rel=0.01)
    assert up["inflow_msg_per_s"] == pytest.approx(20, rel=0.01)
    assert up["queue_full_bound"] == "class normal max_bytes, then new refused"
    assert up["queue_full_in_s"] == pytest.approx((1_000_000 - 60 * 15 * 100) / 1500, rel=0.02)


def test_disk_full_at_current_rate() -> None:
    fc = CapacityForecaster({NORMAL: LaneBounds()})
    out, _ = run(fc, 60, inflow=10, drain=0, size=100, free=18_720 * 10 * (100 + ROW_OVERHEAD))
    q = out["queue"]
    assert q["disk_full_in_s"] == pytest.approx(18_720, rel=0.01)
    assert q["text"] == "disk full in 5 h 12 min at current rate"
    assert out["upstreams"]["cloud"]["text"] == "growing 10.0 msg/s (no class bound)"


def test_queue_bound_before_disk_hides_the_disk_forecast() -> None:
    fc = CapacityForecaster({NORMAL: LaneBounds()}, max_bytes=10**6)
    out, _ = run(fc, 60, inflow=10, drain=0, size=100, free=10**12)
    q = out["queue"]
    assert q["disk_full_in_s"] is None
    assert q["queue_full_in_s"] == pytest.approx((10**6 - 600 * 100) / 1000, rel=0.02)
    assert q["text"] == "queue max_bytes reached in 16 min"


def test_backlog_drains_and_then_is_stable() -> None:
    fc = CapacityForecaster({NORMAL: LaneBounds()}, tau=20)
    out, state = run(fc, 30, inflow=0, drain=100, start=(20_000, 0, 0.0))
    up = out["upstreams"]["cloud"]
    assert up["state"] == "draining" and up["drain_msg_per_s"] == pytest.approx(100, rel=0.01)
    assert up["drains_in_s"] == pytest.approx(state[0] / 100 + 5, rel=0.05)
    assert up["text"].startswith("drains in 3 min")
    out, _ = run(fc, 300, inflow=50, drain=50, start=(0, state[1], state[2]))
    assert out["upstreams"]["cloud"]["text"] == "stable (empty)"
    assert out["queue"]["text"] == "not growing"


def test_rates_follow_a_change_and_ignore_too_close_samples() -> None:
    fc = CapacityForecaster({NORMAL: LaneBounds()}, tau=30)
    out, state = run(fc, 300, inflow=10, drain=0)
    assert out["upstreams"]["cloud"]["growth_msg_per_s"] == pytest.approx(10, rel=0.01)
    out, state = run(fc, 300, inflow=40, drain=0, start=state)  # 10 tau later
    assert out["upstreams"]["cloud"]["growth_msg_per_s"] == pytest.approx(40, rel=0.01)
    # a second snapshot 0.2 s later (the $SYS and status loops both ask) changes nothing
    queued, acked, t = state
    before = fc.observe(t - 4.8, stats({"cloud": {NORMAL: (queued + 5000, 0)}}),
                        {"cloud": acked}, 10**12)
    assert before["upstreams"]["cloud"]["growth_msg_per_s"] == pytest.approx(40, rel=0.01)


def test_first_sample_is_warming_up() -> None:
    fc = CapacityForecaster({NORMAL: LaneBounds()})
    out = fc.observe(0.0, stats({"cloud": {NORMAL: (5, 500)}}), {"cloud": 0}, 10**9)
    assert out["upstreams"]["cloud"] == {"state": "warming_up", "text": "measuring rates"}
    assert out["queue"]["text"] == "measuring rates"


def test_render_shows_forecast_lines() -> None:
    fc = CapacityForecaster({NORMAL: LaneBounds(max_messages=100_000)})
    out, _ = run(fc, 60, inflow=10, drain=0, free=10**9)
    doc = {
        "written_at": 100.0, "interval": 5, "gateway": "gw", "broker": {},
        "forwarding": {
            "queued": 600, "queued_bytes": 60_000, "drops": {}, "forecast": out["queue"],
            "upstreams": {"cloud": {
                "connected": False, "current_url": None, "queued": 600, "oldest_age": 60,
                "inflight": 0, "acked": 0, "drain_rate": 0.0, "forecast": out["upstreams"]["cloud"],
            }},
        },
    }
    text = render(doc, now=101.0)
    assert "  forecast: disk full in " in text
    assert "    forecast: queue full in 2 h 46 min (class normal max_messages" in text


# =========================================================================== real queue file


def test_row_overhead_estimate_matches_a_real_queue_file(tmp_path: Path) -> None:
    """ROW_OVERHEAD (per-row SQLite cost) predicts the file growth within 35 %."""

    async def fill() -> tuple[int, int, int]:
        q = ForwardQueue(tmp_path / "forward.db", "normal", 0.001)
        base = sum(f.stat().st_size for f in tmp_path.iterdir())
        for i in range(20_000):
            q.put("cloud", NORMAL, f"edge/gw/sensor/{i % 50}", b"x" * 64)
            if i % 2000 == 0:
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        logical = q.stats()["bytes"]
        await q.close()
        return base, logical, sum(f.stat().st_size for f in tmp_path.iterdir())

    base, logical, size = asyncio.run(fill())
    estimate = logical + 20_000 * ROW_OVERHEAD
    assert abs(estimate - (size - base)) / (size - base) < 0.35, (logical, size - base)


# =========================================================================== real gateway


def test_status_shows_forecast_with_upstream_down(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    dead = free_port()  # nothing listens: the upstream is down the whole time
    gw = gateway_factory({
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{dead}"]}],
        "forward": [{"filter": "sensors/#", "upstream": "cloud", "qos": 1}],
        "queue": {"commit_delay_ms": 2.0, "normal": {"max_messages": 1_000_000}},
    })
    dev = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev", protocol=mqtt.MQTTv311)
    dev.connect("127.0.0.1", gw.port)
    dev.loop_start()
    sys_seen: dict[str, bytes] = {}
    probe = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv311)
    probe.on_message = lambda c, u, m: sys_seen.__setitem__(m.topic, bytes(m.payload))
    probe.connect("127.0.0.1", gw.port)
    probe.loop_start()
    probe.subscribe("$SYS/broker/forward/#", qos=0)
    text = ""
    try:
        deadline = time.monotonic() + 20
        i = 0
        while time.monotonic() < deadline:
            for _ in range(20):  # ~200 msg/s of 64 B
                dev.publish(f"sensors/t{i % 7}", b"x" * 64, qos=0)
                i += 1
            time.sleep(0.1)
            if i % 400 == 0:
                out = subprocess.run(
                    [sys.executable, "-m", "rapidmq_edge", "status", "--data-dir",
                     str(gw.data_dir)], capture_output=True, text=True, timeout=20)
                text = out.stdout
                if "forecast: queue full in" in text and "disk full in" in text:
                    break
        assert "upstream cloud: DISCONNECTED" in text, text
        assert "    forecast: queue full in " in text, text
        assert "(class normal max_messages, then oldest dropped)" in text, text
        assert "  forecast: disk full in " in text and "at current rate" in text, text
        data = json.loads(subprocess.run(
            [sys.executable, "-m", "rapidmq_edge", "status", "--data-dir", str(gw.data_dir),
             "--json"], capture_output=True, text=True, timeout=20, check=True).stdout)
        fc = data["forwarding"]["upstreams"]["cloud"]["forecast"]
        assert fc["state"] == "growing" and 50 < fc["inflow_msg_per_s"] < 400, fc
        assert fc["drain_msg_per_s"] == 0
        assert 0 < fc["queue_full_in_s"] < 1_000_000 / 50
        deadline = time.monotonic() + 5
        key = "$SYS/broker/forward/upstreams/cloud/forecast/queue_full_in_s"
        while key not in sys_seen and time.monotonic() < deadline:
            time.sleep(0.1)
        assert float(sys_seen[key]) > 0, sorted(sys_seen)
        assert b"disk full in" in sys_seen["$SYS/broker/forward/forecast/text"]
    finally:
        for c in (dev, probe):
            c.disconnect()
            c.loop_stop()


# =========================================================================== a step


def test_eta_follows_an_outage_ending_within_25_percent_after_5_s() -> None:
    """Inflow ~100 msg/s throughout; the upstream is down for 60 s, then drains with a
    300 msg/s cap (net −200 msg/s). From 5 s after the step, the one ETA (net of the inflow)
    is within ±25 % of the time the backlog really takes (was: "growing, full in 61 s" for
    30 s, then the ack rate alone: −41 %)."""
    rng = random.Random(7)
    fc = CapacityForecaster({NORMAL: LaneBounds(max_messages=1_000_000)})
    queued = acked = 0
    t = 0.0
    history: list[tuple[float, int, dict[str, Any]]] = []
    step_at = 120.0
    while True:
        out = fc.observe(t, stats({"cloud": {NORMAL: (queued, queued * 100)}}),
                         {"cloud": acked}, 10**12)
        history.append((t, queued, out["upstreams"]["cloud"]))
        if t > step_at and queued == 0:
            drained_at = t
            break
        arrive = rng.randint(85, 115)  # ~100 msg/s, noisy
        up = t < 60 or t >= step_at  # up for a minute, down for a minute, then capped
        moved = min(queued + arrive, 300 if t >= step_at else 1000) if up else 0
        queued += arrive - moved
        acked += moved
        t += 1.0
    assert 5500 < max(q for _, q, _ in history) < 6500
    checked = 0
    for when, q, fc_out in history:
        if step_at + 5 <= when and q > 500:
            truth = drained_at - when
            assert fc_out["state"] == "draining", (when, fc_out)
            assert abs(fc_out["drains_in_s"] - truth) <= 0.25 * truth, (when, fc_out, truth)
            assert "drains in" in fc_out["text"] and "acked" in fc_out["text"]
            checked += 1
    assert checked >= 15
    # during the outage the growth is followed as quickly (queue full in ~ bound/100 s)
    during = [o for w, _, o in history if 65 <= w < step_at]
    assert all(o["state"] == "growing" for o in during)
    assert all(abs(o["growth_msg_per_s"] - 100) < 25 for o in during)


def test_drain_eta_through_a_real_gateway(
    gateway_factory: Callable[..., GatewayProcess],
    mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    """A real outage and a capped drain: a device at ~100 msg/s, the upstream away for
    ~15 s, then back with the uplink capped at 200 msg/s (a net drain of ~100 msg/s). From
    5 s after the acks start, the ETA in ``status`` is within ±25 % of when the backlog is
    really gone."""
    up_port = free_port()
    gw = gateway_factory({
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{up_port}"],
                      "reconnect_max_s": 0.5, "rate_limit": 200.0}],
        "forward": [{"filter": "sensors/#", "upstream": "cloud"}],
    })
    stop = threading.Event()

    def publish() -> None:
        dev = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-eta")
        dev.connect("127.0.0.1", gw.port)
        dev.loop_start()
        due = time.monotonic()
        while not stop.is_set():
            dev.publish("sensors/t", b"x" * 64, qos=0)
            due += 0.01
            time.sleep(max(0.0, due - time.monotonic()))
        dev.loop_stop()
        dev.disconnect()

    pub = threading.Thread(target=publish, daemon=True)
    pub.start()
    samples: list[tuple[float, int, int, float | None]] = []  # t, queued, acked, eta

    def sample() -> None:
        doc = json.loads((gw.data_dir / "status.json").read_text())
        up = doc["forwarding"]["upstreams"]["cloud"]
        samples.append((time.monotonic(), up["queued"], up["acked"], up["drain_eta_s"]))

    try:
        time.sleep(15)  # the upstream is away: ~1,500 queued
        mosquitto_factory(f"listener {up_port} 127.0.0.1\n")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.5)
            sample()
            if samples[-1][2] > 0 and samples[-1][1] < 100:
                break
    finally:
        stop.set()
        pub.join(5)
    acks_start = next(t for t, _, acked, _ in samples if acked > 0)
    drained = samples[-1][0]
    assert samples[-1][1] < 100 and max(q for _, q, _, _ in samples) > 1200, samples[-3:]
    checked = [(t, eta, drained - t) for t, q, _, eta in samples
               if t >= acks_start + 5 and q > 300]
    assert len(checked) >= 6, (acks_start, drained, samples)
    for t, eta, truth in checked:
        assert eta is not None and abs(eta - truth) <= 0.25 * truth + 1.0, (t, eta, truth)
    text = subprocess.run([sys.executable, "-m", "rapidmq_edge", "status", "--data-dir",
                           str(gw.data_dir)], capture_output=True, text=True, timeout=20).stdout
    assert text.count("ETA") == 0 and text.count("drains in") <= 1, text
