"""Edge-intelligence models vs their rule-based fallback, on a held-out simulator run.

Prints JSON: priority macro-F1, anomaly precision/recall as the gateway combines the stream
detector and the fault classifier (per reading, per episode, recall per fault kind; the
detector alone, what runs without the model, beside it), threat recall and
false-positive rate on benign clients, for the committed ONNX models and for the rules in
``rapidmq_edge/intelligence/rules.py`` side by side; inference µs per message amortized at
batch sizes 1/16/64/256 (onnxruntime, 1 intra-op thread, no spinning) next to the rules'
cost; and the feature-extraction cost per message. With ``--routing`` it also runs
``bench/routing.py`` (real Mosquitto brokers behind a fault-injecting proxy) and reports the
bandit's end-to-end tail latency against round-robin and fixed-order failover; with
``--path`` it runs ``bench/intelligence_path.py`` (a real gateway, intelligence off vs on,
real Mosquitto upstream) and reports the runtime's µs per message as deployed and the added
p99 latency in the path.

    .venv/bin/python bench/intelligence.py [--quick] [--routing] [--path] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firmware_sim.datasets import (  # noqa: E402
    client_dataset,
    priority_dataset,
    residual_dataset,
)
from firmware_sim.generator import generate  # noqa: E402
from firmware_sim.quality import (  # noqa: E402
    anomaly_quality,
    inference_cost,
    ort_session,
    per_class,
    predict,
    threat_quality,
)
from firmware_sim.scenario import FleetRun, Scenario  # noqa: E402
from rapidmq_edge.intelligence import rules  # noqa: E402
from rapidmq_edge.intelligence.fault_classifier import ClassifiedTable  # noqa: E402
from rapidmq_edge.intelligence.features import (  # noqa: E402
    ClientWindows,
    message_features,
)
from rapidmq_edge.intelligence.stream_detector import DetectorParams, DetectorTable  # noqa: E402

#: the model cards' held-out run (seed 2002; training used 1001)
HELDOUT = Scenario(seed=2002, devices=150, duration=3600.0, coap_fraction=0.2, fault_rate=3.0,
                   attackers=30, misconfigured=6, dashboards=2)
QUICK = Scenario(seed=2002, devices=60, duration=1200.0, coap_fraction=0.2, fault_rate=4.0,
                 attackers=12, misconfigured=3, dashboards=1)
BATCHES = (1, 16, 64, 256)


def _rule_cost(fn: Callable[[np.ndarray], np.ndarray], X: np.ndarray) -> dict[str, float]:
    out = {}
    for b in BATCHES:
        xb = np.ascontiguousarray(X[:b])
        times = []
        deadline = time.perf_counter() + 0.2
        while time.perf_counter() < deadline or len(times) < 5:
            t0 = time.perf_counter_ns()
            fn(xb)
            times.append(time.perf_counter_ns() - t0)
        out[str(b)] = round(float(np.median(times)) / 1000 / len(xb), 3)
    return out


def _feature_cost(run: Any) -> dict[str, float]:
    """µs per message of each feature extractor, fed like the runtime (batches of 64)."""
    sensor = [m for m in run.messages if m.value is not None][:20000]
    table = ClassifiedTable()
    t0 = time.perf_counter()
    for i in range(0, len(sensor), 64):
        c = sensor[i:i + 64]
        keys, ts, xs = [m.topic for m in c], [m.t for m in c], [float(m.value) for m in c]  # type: ignore[arg-type]
        table.rows(keys, ts, xs, table.detectors.update(keys, ts, xs), every=True)
    stream_us = (time.perf_counter() - t0) * 1e6 / len(sensor)
    msgs = run.messages[:20000]
    t0 = time.perf_counter()
    for i in range(0, len(msgs), 64):
        c = msgs[i:i + 64]
        message_features([m.topic for m in c], [m.payload for m in c], [m.qos for m in c],
                         [m.retain for m in c])
    msg_us = (time.perf_counter() - t0) * 1e6 / len(msgs)
    acts = run.actions[:20000]
    win = ClientWindows()
    t0 = time.perf_counter()
    for a in acts:
        if a.action == "publish":
            win.publish(a.client, a.t, a.topic, a.size, a.ok)
        elif a.action == "connect":
            win.connect(a.client, a.t, a.ok, a.username)
    win.flush()
    client_us = (time.perf_counter() - t0) * 1e6 / len(acts)
    return {"detector_and_residual_rows_batch64": round(stream_us, 3),
            "message_features_batch64": round(msg_us, 3),
            "client_windows_per_event": round(client_us, 3)}


def _routing_tails(scenario: str = "flaky") -> dict[str, Any]:
    """End-to-end p99/p99.9 per endpoint policy from one ``bench/routing.py`` run."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "routing.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / "routing.py"), "--scenarios",
                        scenario, "--out", str(out)], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
        data = json.loads(out.read_text())
    runs = data["scenarios"][scenario]
    return {"scenario": scenario, **{
        policy: {"e2e_p99_ms": r["e2e_ms"]["p99"], "e2e_p999_ms": r["e2e_ms"]["p999"],
                 "lost": r["lost"], "switches": r["switches"]}
        for policy, r in runs.items()}}


def _path_latency() -> dict[str, Any]:
    """Headline of one ``bench/intelligence_path.py`` run (2 rounds, ~8 min)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "path.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / "intelligence_path.py"),
                        "--rounds", "2", "--out", str(out)], check=True, timeout=1800,
                       stdout=subprocess.DEVNULL)
        data = json.loads(out.read_text())
    path = data["path"]
    return {
        "runtime_us_per_msg_as_deployed": data["runtime_us_per_msg"]["model"],
        "added_p99_ms_500_msg_s_heldout": [r["added_p99_ms"] for r in path["rounds"]],
        **{f"added_p99_ms_{k}": [r["added_p99_ms"] for r in v["rounds"]]
           for k, v in path["loadgen"].items()},
    }


def combined_anomaly(run: FleetRun, sess: Any | None) -> dict[str, Any]:
    """The anomaly verdicts as the gateway makes them on the run's sensor readings (in
    time order, micro-batches of 64): the stream detector with the fault classifier
    (``sess``'s probabilities, :class:`ClassifiedTable`), or alone (``sess`` None, the
    gateway without the model), scored by ``bench/anomaly_nab.py``'s :func:`sim_score`
    (per reading: likelihood over 1 - p_open, grace readings excluded; per episode: an
    opening within a fault or 5 readings after it)."""
    from bench.anomaly_nab import sim_score

    prm = DetectorParams()
    if sess is None:
        table: DetectorTable | ClassifiedTable = DetectorTable(prm)
    else:
        out = [o.name for o in sess.get_outputs()][1:2]
        table = ClassifiedTable(prm, lambda X: sess.run(out, {"features": X})[0])
    msgs = [m for m in run.messages if m.value is not None]
    base = run.scenario.start_epoch
    verdicts = []
    for i in range(0, len(msgs), 64):
        c = msgs[i:i + 64]
        verdicts += table.update([m.topic for m in c], [base + m.t for m in c],
                                 [float(m.value) for m in c])  # type: ignore[arg-type]
    q = sim_score(msgs, verdicts, prm)
    r, e = q["per_reading"], q["episodes"]
    return {"per_reading": {"precision": r["precision"], "recall": r["recall"],
                            "recall_by_kind": r["recall_by_kind"]},
            "per_episode": {"precision": e["precision"], "recall": e["recall"],
                            "recall_by_kind": e["recall_by_kind"], "faults": e["faults"]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller held-out run (~10 s)")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--routing", action="store_true",
                    help="also run bench/routing.py (flaky scenario, ~50 s) for the bandit's tail")
    ap.add_argument("--path", action="store_true",
                    help="also run bench/intelligence_path.py (~8 min) for the added latency")
    args = ap.parse_args(argv)
    sc = QUICK if args.quick else HELDOUT
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    run = generate(sc)
    gen_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "heldout_scenario": sc.to_dict(), "generate_seconds": round(gen_s, 2),
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(),
                    "python": platform.python_version()},
        "targets": {"anomaly_precision_recall": 0.95, "priority_macro_f1": 0.9,
                    "us_per_message": 5.0},
    }
    specs = {
        "priority": (priority_dataset, rules.priority_rules),
        "anomaly": (residual_dataset, rules.residual_rules),
        "threat": (client_dataset, rules.threat_rules),
    }
    for name, (build, rule) in specs.items():
        ds = build(run)
        path = args.models / f"{name}.onnx"
        entry: dict[str, Any] = {"rows": int(len(ds.y))}
        rule_pred = rule(ds.X)
        if path.exists():
            sess = ort_session(path)
            pred, _ = predict(sess, ds.X)
            entry["inference_us_per_msg"] = inference_cost(sess, ds.X, BATCHES)
        else:
            pred = None
            entry["model"] = "missing"
        entry["rules_us_per_msg"] = _rule_cost(rule, ds.X)
        for who, p in (("model", pred), ("rules", rule_pred)):
            if p is None:
                continue
            if name == "anomaly":
                # the model's top label on every reading is not what the gateway does
                # (it reads young streams and episodes, beside the detector): that view
                # stays as "top_label", the scores are the combination's
                q = anomaly_quality(ds.y, p, ds.scored, ds.labels)
                entry[who] = {"top_label_any_fault": {
                    k: q["any_fault"][k] for k in ("precision", "recall")}}
            elif name == "threat":
                entry[who] = threat_quality(ds.y, p, ds.labels)
            else:
                q = per_class(ds.y, p, ds.labels)
                entry[who] = {"macro_f1": q["macro_f1"],
                              "f1": {k: q[k]["f1"] for k in ds.labels}}
        if name == "anomaly":
            entry["model"] = {**entry.get("model", {}), **combined_anomaly(
                run, ort_session(path) if path.exists() else None)} if path.exists() else {}
            entry["detector_alone"] = combined_anomaly(run, None)
        result[name] = entry
    result["feature_us_per_msg"] = _feature_cost(run)
    a = result["anomaly"].get("model", {})
    result["targets_met"] = {
        "anomaly_pr_combined": bool(a) and all(
            a[w][k] >= 0.95 for w in ("per_reading", "per_episode")
            for k in ("precision", "recall")),
        "anomaly_recall_per_kind": bool(a) and all(
            v >= 0.95 for w in ("per_reading", "per_episode")
            for v in a[w]["recall_by_kind"].values()),
        "priority_macro_f1": result["priority"].get("model", {}).get("macro_f1", 0) >= 0.9,
        "us_per_message_at_batch_16": all(
            result[n].get("inference_us_per_msg", {}).get("16", 1e9) <= 5.0 for n in specs),
    }
    if args.routing:
        result["routing"] = _routing_tails()
    if args.path:
        result["path"] = _path_latency()
    result["loadavg_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
