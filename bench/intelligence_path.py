"""The intelligence runtime as deployed: cost per message and added latency in the path.

Prints JSON with two parts, measured in one invocation:

* ``runtime_us_per_msg``: features + inference per message, amortized, through the
  runtime's own batch scorer (``IntelligenceRuntime._score``: ``message_features`` +
  priority model, ``reading_value`` + ``StreamTable`` + anomaly model) on a held-out
  simulator run replayed in time order, in the micro-batches the 1 ms window forms at a
  given message rate (batch = rate x window, at least 1) and at ``max_batch`` (saturation):
  the first half of the run warms the runtime up, the second half is timed; as shipped
  (priority label cache + split-grid cells + anomaly gate), "no_cells" (without the
  cells), "ungated" (features + both models for every message: the reference) and with
  the rules; interleaved, median of 3. ``priority_labels_heldout`` checks that the cached
  labels equal the model's for every message of the run.
* ``path``: device -> gateway -> upstream Mosquitto, QoS 1 at a fixed rate, simulator
  payloads; latency = upstream subscriber receipt - device publish (paho, same process),
  p50/p99/max ms, for the gateway with ``[intelligence]`` off and on (default settings,
  ``[[forward]] filter = "#"`` without a class, so every message is scored), alternated
  ``--rounds`` times; ``added_p99_ms`` = on - off per round; ``queue_commits`` (forward queue
  group commits, each an fsync) shows that both group the same way. Mean micro-batch and the
  runtime's own per-message cost come from its ``$SYS`` counters (``rapidmq-edge status``).

    .venv/bin/python bench/intelligence_path.py [--rate 500] [--seconds 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firmware_sim.generator import generate  # noqa: E402
from firmware_sim.scenario import Scenario  # noqa: E402
from rapidmq_edge.broker.broker import Broker, BrokerLimits  # noqa: E402
from rapidmq_edge.config_intelligence import IntelligenceSettings  # noqa: E402
from rapidmq_edge.intelligence.features import message_features  # noqa: E402
from rapidmq_edge.intelligence.models import load_scorer  # noqa: E402
from rapidmq_edge.intelligence.runtime import IntelligenceRuntime  # noqa: E402
from rapidmq_edge.intelligence.splitkey import split_key_for  # noqa: E402
from tests.gateway_proc import GatewayProcess, _free_port  # noqa: E402

V2 = mqtt.CallbackAPIVersion.VERSION2
HELDOUT = Scenario(seed=2002, devices=300, duration=1800.0, coap_fraction=0.0, fault_rate=3.0,
                   attackers=0, misconfigured=0, dashboards=0)
RATES = (1000, 5000, 20000, 50000)


class _Ungated(IntelligenceRuntime):
    """The reference: every message through ``message_features`` + the priority model and
    every reading through the anomaly model (no label cache, no gate)."""

    def _priority_labels(self, topics: list[str], payloads: list[bytes], qos: list[int],
                         retain: list[bool], need: list[int]) -> list[int]:
        X = message_features([topics[i] for i in need], [payloads[i] for i in need],
                             [qos[i] for i in need], [retain[i] for i in need])
        out = [-1] * len(topics)
        for i, lab in zip(need, self.priority.predict(X)[0].tolist(), strict=True):
            out[i] = lab
        return out


def _runtime(mode: str, reference: bool, cells: bool = True) -> IntelligenceRuntime:
    cls = _Ungated if reference else IntelligenceRuntime
    rt = cls(IntelligenceSettings(enabled=True, priority=mode, anomaly=mode, threat="off"),
             Broker(BrokerLimits()), None)
    # the runtime without upstreams turns priority off: load it as deployed with one
    rt.priority = load_scorer(rt.settings.models_dir, "priority", mode)
    rt._prio_split = split_key_for(rt.priority) if cells else None
    if reference:
        rt.anomaly_gate = None
    return rt


def runtime_cost(messages: list[Any], window_ms: float = 1.0, max_batch: int = 256,
                 reps: int = 3) -> dict[str, Any]:
    """µs per message of the runtime's batch scorer at each rate's batch size, for the
    models as shipped (label cache + gate), the ungated reference and the rules; the run's
    first half warms the runtime up (not timed), the second half is timed; variants are
    interleaved, ``reps`` times each, median reported."""
    half = len(messages) // 2
    cols = [[m.topic for m in messages], [m.payload for m in messages],
            [m.qos for m in messages], [m.retain for m in messages], [m.t for m in messages]]
    sizes = {f"{r}_msg_s": max(1, int(r * window_ms / 1000)) for r in RATES}
    sizes["saturated"] = max_batch
    variants = {"model": ("model", False, True), "model_no_cells": ("model", False, False),
                "model_ungated": ("model", True, False), "rules": ("rules", False, True)}
    times: dict[str, dict[str, list[float]]] = {v: {s: [] for s in sizes} for v in variants}
    stats: dict[str, dict[str, float]] = {}
    for _ in range(reps):
        for name, b in sizes.items():
            for v, (mode, ref, cells) in variants.items():
                rt = _runtime(mode, ref, cells)
                for part, timed in ((range(0, half), False), (range(half, len(messages)), True)):
                    t0 = time.perf_counter()
                    for i in range(part.start, part.stop, b):
                        j = min(i + b, part.stop)
                        rt._score(*(c[i:j] for c in cols), list(range(j - i)))
                    if timed:
                        times[v][name].append((time.perf_counter() - t0) * 1e6 / len(part))
                if v == "model" and name == "5000_msg_s":
                    n = len(messages)
                    stats = {"priority_cache_hit_share": round(rt.prio_cache_hits / n, 3),
                             "priority_cell_hit_share": round(rt.prio_cell_hits / n, 3),
                             "priority_cells": len(rt._prio_cells),
                             "anomaly_gated_share_of_messages": round(rt.anomaly_gated / n, 3)}
    out: dict[str, Any] = {}
    for v in variants:
        out[v] = {name: round(float(np.median(times[v][name])), 3) for name in sizes}
    out["batch_sizes"] = sizes
    out["speedup_vs_ungated"] = {name: round(out["model_ungated"][name] / out["model"][name], 2)
                                 for name in sizes}
    out["speedup_vs_no_cells"] = {name: round(out["model_no_cells"][name] / out["model"][name],
                                              2) for name in sizes}
    out["model_stats_5000_msg_s"] = stats
    return out


def labels_check(messages: list[Any], batch: int = 5) -> dict[str, Any]:
    """Priority labels through the runtime (label cache + split-grid cells) against
    ``message_features`` + the model for every message of the run: must be identical."""
    rt = _runtime("model", False)
    cols = [[m.topic for m in messages], [m.payload for m in messages],
            [m.qos for m in messages], [m.retain for m in messages], [m.t for m in messages]]
    got: list[int] = []
    for i in range(0, len(messages), batch):
        j = min(i + batch, len(messages))
        got += rt._score(*(c[i:j] for c in cols), list(range(j - i))).priority or []
    want: list[int] = []
    for i in range(0, len(messages), 4096):
        X = message_features(*(c[i:i + 4096] for c in cols[:4]))
        want += rt.priority.predict(X)[0].tolist()
    split = rt._prio_split
    return {"messages": len(messages), "identical": got == want,
            "differing": sum(a != b for a, b in zip(got, want, strict=True)),
            "grid_columns": len(split.columns) if split else 0,
            "grid_thresholds": sum(len(t) for t in split.thresholds) if split else 0,
            "cells_seen": len(rt._prio_cells)}


class Upstream:
    """A Mosquitto on a free port."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        conf = tmp / f"mosq-{self.port}.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nmax_queued_messages 0\nset_tcp_nodelay true\n"
                        + ("user root\n" if os.geteuid() == 0 else ""))
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def path_latency(messages: list[Any], up: Upstream, tmp: Path, intelligence: bool,
                 rate: float, seconds: float) -> dict[str, Any]:
    """Latency device -> gateway -> upstream for one gateway configuration."""
    cfg: dict[str, Any] = {
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{up.port}"]}],
        "forward": [{"filter": "#", "upstream": "cloud", "qos": 1}],
        "mqtt": {"sys_interval": 1.0},
        "gateway": {"log_level": "warning"},
    }
    if intelligence:
        cfg["intelligence"] = {"enabled": True}
    sub_dir = Path(tempfile.mkdtemp(dir=tmp))
    gw = GatewayProcess(sub_dir, cfg).start()
    sent: dict[bytes, float] = {}
    lat: list[float] = []
    lock = threading.Lock()
    prefix = "edge/test-gw/"
    cloud = mqtt.Client(V2, client_id=f"cloud-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)

    def on_message(c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        with lock:
            t = sent.pop(m.payload, None)
            if t is not None:
                lat.append(now - t)

    ready = threading.Event()
    cloud.on_message = on_message
    cloud.on_subscribe = lambda *a: ready.set()
    cloud.connect("127.0.0.1", up.port)
    cloud.loop_start()
    cloud.subscribe(prefix + "#", qos=1)
    ready.wait(5)
    dev = mqtt.Client(V2, client_id="bench-dev", protocol=mqtt.MQTTv5)
    dev.max_inflight_messages_set(1000)
    dev.connect("127.0.0.1", gw.port)
    dev.loop_start()
    time.sleep(1.0)
    n = int(rate * seconds)
    msgs = [m for m in messages if m.payload][:n]
    start = time.monotonic()
    for i, m in enumerate(msgs):
        due = start + i / rate
        while True:
            d = due - time.monotonic()
            if d <= 0:
                break
            time.sleep(d)
        with lock:
            if m.payload in sent:
                continue
            sent[m.payload] = time.monotonic()
        dev.publish(m.topic, m.payload, qos=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with lock:
            if not sent:
                break
        time.sleep(0.05)
    time.sleep(1.2)
    status = json.loads((gw.data_dir / "status.json").read_text()) if (
        gw.data_dir / "status.json").exists() else {}
    dev.disconnect()
    dev.loop_stop()
    cloud.disconnect()
    cloud.loop_stop()
    gw.stop()
    a = np.asarray(lat[len(lat) // 20:]) * 1000  # the first 5 % warm up
    intel = status.get("intelligence") or {}
    return {
        "messages": len(msgs), "received": len(lat), "lost": len(sent),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
        "queue_commits": (status.get("forwarding") or {}).get("commits"),
        **({"mean_batch": intel.get("mean_batch"),
            "score_us_per_message": intel.get("score_us_per_message"),
            "loop_ms_max": intel.get("loop_ms_max"),
            "classes": intel.get("classes"), "alerts": intel.get("alerts")}
           if intelligence else {}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=500.0, help="messages per second")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-path", action="store_true", help="only the runtime cost part")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    run = generate(HELDOUT)
    msgs = sorted(run.messages, key=lambda m: m.t)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(),
                    "python": platform.python_version()},
        "targets": {"us_per_message": 5.0, "added_p99_ms": 2.0},
        "priority_labels_heldout": labels_check(msgs),
        "runtime_us_per_msg": runtime_cost(msgs),
    }
    rc = result["runtime_us_per_msg"]["model"]
    result["targets_met"] = {
        "us_per_message_at_5000_msg_s": rc["5000_msg_s"] <= 5.0,
        "us_per_message_saturated": rc["saturated"] <= 5.0,
    }
    if not args.no_path:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            up = Upstream(tmp)
            try:
                rounds = []
                for _ in range(args.rounds):
                    off = path_latency(msgs, up, tmp, False, args.rate, args.seconds)
                    on = path_latency(msgs, up, tmp, True, args.rate, args.seconds)
                    rounds.append({"off": off, "on": on,
                                   "added_p99_ms": round(on["p99_ms"] - off["p99_ms"], 3),
                                   "added_p50_ms": round(on["p50_ms"] - off["p50_ms"], 3)})
            finally:
                up.stop()
        result["path"] = {"rate_msg_s": args.rate, "seconds": args.seconds, "rounds": rounds}
        result["targets_met"]["added_p99_ms"] = max(r["added_p99_ms"] for r in rounds) <= 2.0
    result["loadavg_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
