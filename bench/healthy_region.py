"""The anomaly gate (:mod:`rapidmq_edge.intelligence.healthy_region`) on a held-out simulator run.

Prints JSON: the box, its proof margin against ``models/anomaly.onnx``'s trees, the share
of held-out readings inside it (they skip the model), whether the gated labels equal the
ungated model's on every held-out row (they must: the box is proven "none"), and anomaly
precision/recall per fault kind with and without the gate; the same for the rule
fallback's box. ``--search`` grows a new box on the training run (seed 1001) first; paste
the printed ``box`` into ``MODEL_BOX`` after a retrain.

    .venv/bin/python bench/healthy_region.py [--search] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firmware_sim.datasets import anomaly_dataset  # noqa: E402
from firmware_sim.generator import generate  # noqa: E402
from firmware_sim.quality import anomaly_quality, ort_session, predict  # noqa: E402
from firmware_sim.scenario import Scenario  # noqa: E402
from rapidmq_edge.intelligence import rules  # noqa: E402
from rapidmq_edge.intelligence.healthy_region import (  # noqa: E402
    MODEL_BOX,
    HealthyRegion,
    _f32,
    box_margin,
    rules_box,
    search_box,
    tree_ensemble,
)

HELDOUT = Scenario(seed=2002, devices=150, duration=3600.0, coap_fraction=0.2, fault_rate=3.0,
                   attackers=30, misconfigured=6, dashboards=2)
TRAIN = Scenario(seed=1001, devices=150, duration=3600.0, coap_fraction=0.2, fault_rate=3.0,
                 attackers=0, misconfigured=0, dashboards=0)
#: search start (a small box around a settled healthy reading) and widening steps
START = ((1.0, 1.0), (-0.5, 0.5), (-0.5, 0.5), (-0.5, 0.5), (-0.25, 0.25), (-0.1, 0.1),
         (0.0, 0.0), (-0.1, 0.1), (-0.1, 0.1), (0.0, 0.0))
STEPS = (1 / 32, 0.25, 0.25, 0.25, 0.25, 0.1, 0.0, 0.1, 0.1, 0.0)
ROUNDS = 100


def _quality(ds: Any, pred: np.ndarray) -> dict[str, Any]:
    q = anomaly_quality(ds.y, pred, ds.scored, ds.labels)
    return {k: ({"precision": v["precision"], "recall": v["recall"]} if isinstance(v, dict)
                else v) for k, v in q.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--search", action="store_true", help="grow a box on the training run")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    path = args.models / "anomaly.onnx"
    ens = tree_ensemble(onnx.load(str(path)))
    box = MODEL_BOX
    result: dict[str, Any] = {}
    if args.search:
        t0 = time.perf_counter()
        train = anomaly_dataset(generate(TRAIN))
        box = search_box(ens, train.X[train.y == 0], START, STEPS, ROUNDS)
        result["search"] = {"scenario": TRAIN.to_dict(), "rows": int(len(train.y)),
                            "seconds": round(time.perf_counter() - t0, 1)}
    ds = anomaly_dataset(generate(HELDOUT))
    sess = ort_session(path)
    full, _ = predict(sess, ds.X)
    lo, hi = _f32(box)
    result["heldout_scenario"] = HELDOUT.to_dict()
    result["rows"] = int(len(ds.y))
    for who, gate, labels in (
            ("model", HealthyRegion(lo, hi, "model"), full),
            ("rules", HealthyRegion(*_f32(rules_box()), "rules"), rules.anomaly_rules(ds.X))):
        inside = gate.inside(ds.X)
        gated = labels.copy()
        gated[inside] = 0
        entry: dict[str, Any] = {
            "skip_share": round(float(inside.mean()), 4),
            "skip_share_of_healthy": round(float(inside[ds.y == 0].mean()), 4),
            "labels_changed": int(np.sum(gated != labels)),
            "model_anomaly_inside_box": int(np.sum(labels[inside] != 0)),
            "quality_ungated": _quality(ds, labels),
            "quality_gated": _quality(ds, gated),
        }
        if who == "model":
            entry["box"] = gate.as_dict()
            entry["proof_margin"] = round(box_margin(ens, lo, hi), 6)
        result[who] = entry
    result["loadavg_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
