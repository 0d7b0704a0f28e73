"""The p99 at 1,000 msg/s over several invocations: one figure that holds still.

One invocation of ``bench/mqtt_throughput.py``'s latency scenarios moves by about ±0.1
in its gateway/Mosquitto p99 ratio (the machine's wake-ups, not the brokers: see
docs/benchmarks.md); a target of ≤ 1.2× needs more than one. This runs ``--invocations``
of ``mqtt_throughput.py --repeat R --only latency_qos0_1000mps --only
latency_qos1_1000mps`` one after the other (a pause between them) and prints, as JSON,
per QoS:

* each invocation's ratios (the run with the median p99, and pooled) and load average;
* ``all_runs``: every run of every invocation, the median of the gateway's run p99s over
  the median of Mosquitto's (brokers alternate run by run, so both see the same machine);
* the count of invocation figures above ``--target``.

Usage::

    python bench/latency_campaign.py [--invocations 5] [--repeat 9] [--busy] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent / "mqtt_throughput.py"
SCENARIOS = ("latency_qos0_1000mps", "latency_qos1_1000mps")


def invoke(out: Path, repeat: int, busy: bool, timeout: float) -> dict[str, Any]:
    """One ``mqtt_throughput.py`` invocation; its JSON."""
    cmd = [sys.executable, str(BENCH), "--repeat", str(repeat), "--out", str(out)]
    for name in SCENARIOS:
        cmd += ["--only", name]
    if busy:
        cmd.append("--busy")
    subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def combine(results: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Per scenario: each invocation's ratios and the ratio over all runs."""
    summary: dict[str, Any] = {}
    for name in SCENARIOS:
        per, mosq, gw = [], [], []
        for res in results:
            sc = res["scenarios"].get(name, {})
            m, g = sc.get("mosquitto", {}), sc.get("gateway", {})
            if "p99" not in m or "p99" not in g:
                per.append({"error": m.get("error") or g.get("error") or "no result"})
                continue
            mosq += [r["p99"] for r in m.get("runs", [m])]  # --repeat 1: the run itself
            gw += [r["p99"] for r in g.get("runs", [g])]
            per.append({"median_run": sc["ratio"]["p99"],
                        "pooled": sc["ratio"].get("pooled_p99"),
                        "mosquitto_pooled_p99_ms": m.get("pooled_p99"),
                        "gateway_pooled_p99_ms": g.get("pooled_p99"),
                        "load_1m": (res["meta"].get("loadavg_at_start") or [None])[0]})
        figures = [v for p in per for k in ("median_run", "pooled")
                   if isinstance(v := p.get(k), float)]
        entry: dict[str, Any] = {"invocations": per,
                                 "figures_above_target": sum(f > target for f in figures),
                                 "figures": len(figures)}
        if mosq and gw:
            entry["all_runs"] = {
                "runs": len(gw),
                "mosquitto_median_p99_ms": round(statistics.median(mosq), 3),
                "gateway_median_p99_ms": round(statistics.median(gw), 3),
                "ratio": round(statistics.median(gw) / statistics.median(mosq), 3)}
        summary[name] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--invocations", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=9, help="runs per broker per invocation")
    ap.add_argument("--pause", type=float, default=10.0, help="seconds between invocations")
    ap.add_argument("--target", type=float, default=1.2)
    ap.add_argument("--busy", action="store_true", help="one core kept busy (mqtt_throughput)")
    ap.add_argument("--keep", type=Path, help="keep each invocation's JSON in this directory")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per invocation (s)")
    args = ap.parse_args(argv)
    keep = args.keep or Path(tempfile.mkdtemp(prefix="latency-campaign-"))
    keep.mkdir(parents=True, exist_ok=True)
    results = []
    load_start = os.getloadavg()
    for i in range(args.invocations):
        if i:
            time.sleep(args.pause)
        results.append(invoke(keep / f"invocation-{i + 1}.json", args.repeat, args.busy,
                              args.timeout))
    out = {"meta": {"invocations": args.invocations, "repeat": args.repeat,
                    "busy": args.busy, "target": args.target, "jsons": str(keep),
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
           "scenarios": combine(results, args.target)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
