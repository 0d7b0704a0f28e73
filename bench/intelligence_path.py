"""The intelligence runtime as deployed: cost per message and added latency in the path.

Prints JSON with two parts, measured in one invocation:

* ``runtime_us_per_msg``: features + inference per message, amortized, through the
  runtime's own batch scorer (:class:`~rapidmq_edge.intelligence.scoring.BatchScorer`:
  payload templates, priority label cache / ``message_features`` + priority model, reading
  values and device times + the per-stream detector) on a held-out simulator run replayed
  in time order, in the micro-batches the 1 ms window forms at a given message rate (batch =
  rate x window, at least 1) and at ``max_batch`` (saturation): the first half of the run
  warms the runtime up, the second half is timed; as shipped, "ungated" (no label cache:
  features + the priority model for every message, the reference) and with the rules;
  interleaved, median of 3. ``labels_heldout`` checks that the shipped scorer's priority
  labels and anomaly openings equal the reference's for every message of the run.
* ``path``: device -> gateway -> upstream Mosquitto, QoS 1 at a fixed rate, simulator
  payloads; latency = upstream subscriber receipt - device publish (paho, same process),
  p50/p99/max ms, for the gateway with ``[intelligence]`` off and on (default settings,
  ``[[forward]] filter = "#"`` without a class, so every message is scored), alternated
  ``--rounds`` times; ``added_p99_ms`` = on - off per round; ``queue_commits`` (forward queue
  group commits, each an fsync) shows that both group the same way. Mean micro-batch and the
  runtime's own per-message cost come from its ``$SYS`` counters (``rapidmq-edge status``).

  ``path.loadgen``: the same off/on comparison at ``--high-rates`` (2,000 and 5,000 msg/s),
  where paho in the bench process would be the bottleneck: bench/loadgen.py's paced QoS 1
  publisher and latency subscriber in their own processes, replaying simulator messages with
  their recorded spacing scaled to the rate (the send time as their ``"ts"``):
  ``fleet_steady``: a long-running fleet's routine traffic (:data:`STEADY`: 100 devices,
  2 h, rare faults); ``fleet_heldout``: the held-out run (fault-dense, short streams: the
  anomaly model runs for most readings); ``one_stream``: telemetry-like JSON on one sensor
  topic at the whole rate (one detector state for the whole rate). The publisher
  is on ``threat_exempt_clients``: a single client at that rate is a flood.

    .venv/bin/python bench/intelligence_path.py [--rate 500] [--seconds 8] [--rounds 2]
        [--high-rates 2000,5000]
"""

from __future__ import annotations

import argparse
import gc
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
sys.path.insert(0, str(ROOT / "bench"))

from firmware_sim.generator import generate  # noqa: E402
from firmware_sim.scenario import Scenario  # noqa: E402
from rapidmq_edge.config.intelligence import IntelligenceSettings  # noqa: E402
from rapidmq_edge.intelligence.features import message_features  # noqa: E402
from rapidmq_edge.intelligence.models import load_scorer  # noqa: E402
from rapidmq_edge.intelligence.scoring import BatchScorer  # noqa: E402
from rapidmq_edge.intelligence.stream_detector import DetectorParams  # noqa: E402
from tests.gateway_proc import GatewayProcess, _free_port  # noqa: E402

V2 = mqtt.CallbackAPIVersion.VERSION2
HELDOUT = Scenario(seed=2002, devices=300, duration=1800.0, coap_fraction=0.0, fault_rate=3.0,
                   attackers=0, misconfigured=0, dashboards=0)
#: routine traffic of a long-running fleet (faults rare, streams long warmed up): the load
#: of the high-rate path part beside the held-out run (3 faults per stream and hour, ~60
#: readings per stream: half of them in their stream's warm-up)
STEADY = Scenario(seed=2002, devices=100, duration=7200.0, coap_fraction=0.0, fault_rate=0.1,
                  attackers=0, misconfigured=0, dashboards=0)
RATES = (1000, 5000, 20000, 50000)


class _Ungated(BatchScorer):
    """The reference: every message through ``message_features`` + the priority model (no
    label cache); readings through the stream detector as shipped."""

    def _priority_labels(self, topics: Any, payloads: Any, templates: Any, qos: Any,
                         retain: Any, need: Any) -> list[int]:
        X = message_features([topics[i] for i in need], [payloads[i] for i in need],
                             [qos[i] for i in need], [retain[i] for i in need])
        out = [-1] * len(topics)
        for i, lab in zip(need, self.priority.predict(X)[0].tolist(), strict=True):
            out[i] = lab
        return out


def _scorer(mode: str, reference: bool) -> BatchScorer:
    """The runtime's batch scorer as deployed (priority model or rules, stream detector)."""
    priority = load_scorer(IntelligenceSettings().models_dir, "priority", mode)
    return (_Ungated if reference else BatchScorer)(priority, DetectorParams(), True)


def _columns(messages: list[Any]) -> list[list[Any]]:
    return [[m.topic for m in messages], [m.payload for m in messages],
            [m.qos for m in messages], [m.retain for m in messages], [m.t for m in messages]]


def runtime_cost(messages: list[Any], window_ms: float = 1.0, max_batch: int = 256,
                 reps: int = 3) -> dict[str, Any]:
    """µs per message of the runtime's batch scorer at each rate's batch size, for the
    models as shipped (label cache), the uncached reference and the rules; the run's
    first half warms the scorer up (not timed), the second half is timed; variants are
    interleaved, ``reps`` times each, median reported."""
    half = len(messages) // 2
    cols = _columns(messages)
    sizes = {f"{r}_msg_s": max(1, int(r * window_ms / 1000)) for r in RATES}
    sizes["saturated"] = max_batch
    variants = {"model": ("model", False), "model_ungated": ("model", True),
                "rules": ("rules", False)}
    times: dict[str, dict[str, list[float]]] = {v: {s: [] for s in sizes} for v in variants}
    stats: dict[str, float] = {}
    for _ in range(reps):
        for name, b in sizes.items():
            for v, (mode, ref) in variants.items():
                sc = _scorer(mode, ref)
                for part, timed in ((range(0, half), False), (range(half, len(messages)), True)):
                    t0 = time.perf_counter()
                    for i in range(part.start, part.stop, b):
                        j = min(i + b, part.stop)
                        sc.score(*(c[i:j] for c in cols), range(j - i))
                    if timed:
                        times[v][name].append((time.perf_counter() - t0) * 1e6 / len(part))
                if v == "model" and name == "20000_msg_s":
                    n = len(messages)
                    stats = {"priority_cache_hit_share": round(sc.cache_hits / n, 3)}
    out: dict[str, Any] = {}
    for v in variants:
        out[v] = {name: round(float(np.median(times[v][name])), 3) for name in sizes}
    out["batch_sizes"] = sizes
    out["speedup_vs_ungated"] = {name: round(out["model_ungated"][name] / out["model"][name], 2)
                                 for name in sizes}
    out["model_stats_20000_msg_s"] = stats
    return out


def labels_check(messages: list[Any], batch: int = 20) -> dict[str, Any]:
    """Priority labels and anomaly openings of the shipped scorer (label cache, value layouts)
    against the reference (``message_features`` + model for every message, every reading
    through the anomaly model) for every message of the run: must be identical."""
    cols = _columns(messages)
    out: dict[str, Any] = {"messages": len(messages)}
    got: dict[str, list[int]] = {"priority": [], "anomaly": []}
    want: dict[str, list[int]] = {"priority": [], "anomaly": []}
    for sc, acc in ((_scorer("model", False), got), (_scorer("model", True), want)):
        for i in range(0, len(messages), batch):
            j = min(i + batch, len(messages))
            r = sc.score(*(c[i:j] for c in cols), range(j - i))
            acc["priority"] += r.priority or []
            acc["anomaly"] += [int(v is not None and v.opens) for v in
                               (r.verdicts or [None] * (j - i))]
    for k in got:
        out[f"{k}_identical"] = got[k] == want[k]
        out[f"{k}_differing"] = sum(a != b for a, b in zip(got[k], want[k], strict=True))
    out["anomalies"] = sum(1 for a in want["anomaly"] if a)
    return out


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


def _gateway_config(up: Upstream, intelligence: dict[str, Any] | None) -> dict[str, Any]:
    """Forward everything to ``up`` (QoS 1); ``[intelligence]`` as given, or none."""
    cfg: dict[str, Any] = {
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{up.port}"]}],
        "forward": [{"filter": "#", "upstream": "cloud", "qos": 1}],
        "mqtt": {"sys_interval": 1.0},
        "gateway": {"log_level": "warning"},
    }
    if intelligence is not None:
        cfg["intelligence"] = intelligence
    return cfg


def path_latency(messages: list[Any], up: Upstream, tmp: Path, intelligence: bool,
                 rate: float, seconds: float) -> dict[str, Any]:
    """Latency device -> gateway -> upstream for one gateway configuration."""
    # one client at 500 msg/s is a flood to the threat watch (throttled: a third of the
    # messages were not delivered within the wait), so it is exempt like loadgen's
    cfg = _gateway_config(up, {"enabled": True, "threat_exempt_clients": ["bench-dev"]}
                          if intelligence else None)
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


def path_loadgen(up: Upstream, tmp: Path, intelligence: bool, rate: float,
                 seconds: float, json_stamp: bool = True, streams: int = 1,
                 replay: list[Any] | None = None) -> dict[str, Any]:
    """Latency at a high rate, where the paho harness of :func:`path_latency` is the
    bottleneck itself: bench/loadgen.py's paced QoS 1 publisher and latency subscriber
    (separate processes). ``replay``: simulator messages sent with their recorded spacing
    scaled to ``rate`` on average (their topics and payloads, the ``"ts"`` replaced by the
    send time); otherwise one sensor topic (or ``streams`` of them) of telemetry-like JSON
    with the send time as digits and a slowly varying ``"value"`` (``loadgen.JSON_STAMP``),
    or with ``json_stamp=False`` 64 B with the time in binary (no reading)."""
    import mqtt_throughput as mt
    from store_forward import _recv, start_subscriber

    # one client at thousands of msg/s is a flood to the threat model (throttled to 2/s by
    # default): exempt it, as an operator exempts a bridge or a PLC
    cfg = _gateway_config(up, {"enabled": True, "threat_exempt_clients": ["ip-paced-*"]}
                          if intelligence else None)
    gw = GatewayProcess(Path(tempfile.mkdtemp(dir=tmp)), cfg).start()
    n = int(rate * seconds)
    pairs = times = None
    if replay:
        t0, scale = replay[0].t, len(replay) / (rate * (replay[-1].t - replay[0].t))
        pairs = [(m.topic, m.payload) for m in replay]
        times = [(m.t - t0) * scale for m in replay]
        n = min(n, len(replay))
    procs: list[Any] = []
    try:
        sproc, spipe = start_subscriber(up.port, "edge/test-gw/#", n, latency=True,
                                        start_timeout=15.0, idle_timeout=5.0,
                                        max_seconds=seconds * 3 + 20, client_prefix="ip-sub",
                                        json_stamp=json_stamp)
        procs.append(sproc)
        pproc, ppipe = mt._spawn("paced", {
            "host": "127.0.0.1", "port": gw.port, "topic": "plant/line1/dev7/temp", "qos": 1,
            "rate": rate, "seconds": seconds, "size": 64, "client_id": "ip-paced",
            "json_stamp": json_stamp, "streams": streams, "replay": pairs,
            "replay_times": times,
        }, None)
        procs.append(pproc)
        _recv(ppipe, seconds * 3 + 20, "paced publisher")
        sub = _recv(spipe, seconds * 3 + 25, "subscriber")
        status = json.loads((gw.data_dir / "status.json").read_text()) if (
            gw.data_dir / "status.json").exists() else {}
        intel = status.get("intelligence") or {}
        lat = sub.get("latency_ms", {})
        return {"messages": n, "received": sub.get("received"),
                **{k: lat[k] for k in ("p50", "p99", "max") if k in lat},
                "queue_commits": (status.get("forwarding") or {}).get("commits"),
                **({"mean_batch": intel.get("mean_batch"),
                    "score_us_per_message": intel.get("score_us_per_message")}
                   if intelligence else {})}
    finally:
        mt._reap(procs)
        gw.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=500.0, help="messages per second")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-path", action="store_true", help="only the runtime cost part")
    ap.add_argument("--high-rates", default="2000,5000",
                    help="rates (msg/s) of the loadgen-driven path part; '' to skip")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    run = generate(HELDOUT)
    msgs = sorted(run.messages, key=lambda m: m.t)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(),
                    "python": platform.python_version()},
        "targets": {"us_per_message": 5.0, "added_p99_ms": 2.0},
        "labels_heldout": labels_check(msgs),
        "runtime_us_per_msg": runtime_cost(msgs),
    }
    rc = result["runtime_us_per_msg"]["model"]
    result["targets_met"] = {f"us_per_message_at_{k}": rc[k] <= 5.0
                             for k in ("20000_msg_s", "50000_msg_s", "saturated")}
    if not args.no_path:
        # the harness's own heap (runs, scorers) out of the collector's way: a full
        # collection in this process (paho's receiving thread) or in a forked loadgen
        # process (which inherits the heap) would stall the measurement, not the gateway
        gc.collect()
        gc.freeze()
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
                high: dict[str, Any] = {}
                loads = {"fleet_steady": [m for m in sorted(generate(STEADY).messages,
                                                            key=lambda m: m.t) if m.payload],
                         "fleet_heldout": [m for m in msgs if m.payload], "one_stream": None}
                for rate in [float(r) for r in args.high_rates.split(",") if r]:
                    for load, replay in loads.items():
                        runs = []
                        for _ in range(args.rounds):
                            off = path_loadgen(up, tmp, False, rate, args.seconds,
                                               replay=replay)
                            on = path_loadgen(up, tmp, True, rate, args.seconds,
                                              replay=replay)
                            runs.append({"off": off, "on": on, **{
                                f"added_{q}_ms": round(on.get(q, float("nan"))
                                                       - off.get(q, float("nan")), 3)
                                for q in ("p50", "p99")}})
                        high[f"{rate:g}_msg_s_{load}"] = {
                            "median_added_p99_ms": float(np.median(
                                [r["added_p99_ms"] for r in runs])),
                            "rounds": runs}
            finally:
                up.stop()
        result["path"] = {"rate_msg_s": args.rate, "seconds": args.seconds, "rounds": rounds,
                          "loadgen": high}
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
