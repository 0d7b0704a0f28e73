"""The stream detector with the fault-kind classifier beside it (``fault_classifier.py``,
the shipped ``models/anomaly.onnx`` in a real onnxruntime session), as the gateway runs
them: the simulator's faults found per reading and per episode on a run neither training
(seeds 1001-1004), the threshold choice (3003-3006) nor the model card (2002) used, each
named by its kind, a fault inside an open episode an incident of its own, and mature
streams left to the detector alone."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.datasets import healthy_stream
from firmware_sim.generator import generate
from firmware_sim.quality import fault_spans
from firmware_sim.scenario import Scenario
from rapidmq_edge.intelligence import fault_classifier
from rapidmq_edge.intelligence.fault_classifier import (
    LABEL_KIND,
    ClassifiedTable,
    CombineParams,
)
from rapidmq_edge.intelligence.models import load_scorer
from rapidmq_edge.intelligence.stream_detector import DetectorParams, DetectorTable, Verdict

MODELS = Path(__file__).resolve().parent.parent / "models"
RUN = Scenario(seed=4343, devices=100, duration=1800.0, coap_fraction=0.2, fault_rate=3.0,
               attackers=0, misconfigured=0, dashboards=0)
AFTER = 5  # an opening within a fault or this many readings after it detects it


@pytest.fixture(scope="module")
def proba() -> Any:
    sc = load_scorer(MODELS, "anomaly", "model")
    assert sc.source == "model", sc.fallback
    return sc.probabilities


def _verdicts(table: DetectorTable | ClassifiedTable, msgs: list[Any], base: float
              ) -> list[Verdict]:
    out: list[Verdict] = []
    for i in range(0, len(msgs), 64):
        c = msgs[i:i + 64]
        out += table.update([m.topic for m in c], [base + m.t for m in c],
                            [float(m.value) for m in c])
    return out


def _quality(msgs: list[Any], verdicts: list[Verdict]) -> dict[str, Any]:
    """Per reading (grace readings excluded) and per episode P/R, and the kind each
    opening that detects a fault names."""
    p_open = DetectorParams().p_open
    tp = fp = fn = 0
    for m, v in zip(msgs, verdicts, strict=True):
        if m.grace:
            continue
        flagged = v.likelihood > 1.0 - p_open
        tp += flagged and m.fault != "none"
        fp += flagged and m.fault == "none"
        fn += not flagged and m.fault != "none"
    by_stream: dict[str, list[int]] = {}
    for j, m in enumerate(msgs):
        by_stream.setdefault(m.topic, []).append(j)
    found = faults = true_opens = false_opens = named = 0
    for idx in by_stream.values():
        # one fault, even when single readings of a second series on the same topic
        # interrupt it (as bench/anomaly_nab.py's sim_score counts)
        spans = fault_spans([msgs[j].fault for j in idx])
        for pos, j in enumerate(idx):
            if verdicts[j].opens:
                hit = [sp for sp in spans if sp[1] <= pos <= sp[2] + AFTER]
                for sp in hit:
                    sp[3] = True
                true_opens += bool(hit)
                false_opens += not hit
                named += any(verdicts[j].kind == LABEL_KIND[("none", "drift", "spike", "stuck",
                                                              "burst").index(sp[0])]
                             for sp in hit)
        faults += len(spans)
        found += sum(sp[3] for sp in spans)
    return {"reading_p": tp / (tp + fp), "reading_r": tp / (tp + fn),
            "episode_p": true_opens / (true_opens + false_opens), "episode_r": found / faults,
            "named": named / true_opens, "faults": faults}


def test_simulator_faults_per_reading_and_per_episode(proba: Any) -> None:
    run = generate(RUN)
    msgs = [m for m in run.messages if m.value is not None]
    base = run.scenario.start_epoch
    both = _quality(msgs, _verdicts(ClassifiedTable(None, proba), msgs, base))
    alone = _quality(msgs, _verdicts(DetectorTable(), msgs, base))
    assert both["faults"] > 60, both
    # per reading the 0.95 target; per episode 0.91 here (69 of 76 faults, 0.87 before
    # the tail columns; bench/anomaly_select.py: 0.92 on the untouched seeds, not 0.95)
    assert min(both["reading_p"], both["reading_r"], both["episode_p"]) >= 0.95, both
    assert both["episode_r"] >= 0.88, both
    # the classifier is what gets there: the detector alone misses many more
    assert both["reading_r"] > alone["reading_r"] + 0.05, (both, alone)
    assert both["episode_r"] > alone["episode_r"] + 0.1, (both, alone)
    assert both["named"] >= 0.9, both  # an opening names the fault's kind


def test_mature_streams_are_the_detectors_and_healthy_young_ones_stay_quiet(proba: Any
                                                                            ) -> None:
    """Past CombineParams.young readings every opening is the detector's own (so NAB's
    numbers are the detector's); healthy streams of every kind (the test seeds of
    firmware_sim.datasets.healthy_stream) with a level shift at reading 1,200 get no
    incident from the classifier while young, and the shift's from the detector."""
    young = CombineParams().young
    extra = 0
    for seed in range(6):
        ts, xs = healthy_stream(seed, 1500)
        sd = max(1e-9, (max(xs[:200]) - min(xs[:200])) / 4)
        xs = xs[:1200] + [x + 8 * sd for x in xs[1200:]]
        both = ClassifiedTable(None, proba).update([0] * len(ts), ts, xs)
        alone = DetectorTable().update([0] * len(ts), ts, xs)
        assert [v.opens for v in both[young + 1:]] == [v.opens for v in alone[young + 1:]]
        extra += sum(b.opens and not a.opens for b, a in zip(both, alone, strict=True))
    assert extra <= 1  # at most one false young incident over six healthy streams


def test_a_fault_inside_an_open_episode_is_an_incident_of_its_own(proba: Any) -> None:
    rng = random.Random(5)
    ts = [1_700_000_000.0 + 10.0 * i for i in range(260)]
    xs = [20.0 + rng.gauss(0.0, 0.5) for _ in ts]
    xs[100] += 6.0  # a 12-sigma spike, then a stuck sensor while its episode is open
    for i in range(160, 190):
        xs[i] = xs[159]
    table = ClassifiedTable(None, proba)
    vs = table.update(["s"] * len(ts), ts, xs)
    opens = [(i, v.kind) for i, v in enumerate(vs) if v.opens]
    assert opens[:1] == [(100, "spike")], opens
    assert any(160 <= i <= 170 and k == "stuck" for i, k in opens), opens
    assert all(v.in_episode for v in vs[100:190])
    assert table.classified == len(ts)  # a young stream: every reading read by the model


def test_kernel_equals_the_python_loop(proba: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_residualstep.c`` gives the Python loop's residual rows and combined verdicts bit
    for bit (a simulator run with every fault kind, gaps, CBOR devices; micro-batches with
    many readings of one stream; non-finite readings), and the verdicts do not depend on
    how readings are batched."""
    assert fault_classifier._KERNEL is not None  # built here (setup.py), as in CI
    run = generate(Scenario(seed=77, devices=30, duration=1200.0, coap_fraction=0.3,
                            fault_rate=6.0, outage_rate=1.0, attackers=0, misconfigured=0,
                            dashboards=0))
    msgs = [m for m in run.messages if m.value is not None]
    base = run.scenario.start_epoch
    keys = [m.topic for m in msgs]
    ts = [base + m.t for m in msgs]
    xs = [float(m.value) for m in msgs]
    xs[100] = float("nan")
    tables = {}
    for name, kernel in (("c", fault_classifier._KERNEL), ("py", None)):
        monkeypatch.setattr(fault_classifier, "_KERNEL", kernel)
        tables[name] = (ClassifiedTable(None, proba), ClassifiedTable())
    got: dict[str, tuple[list[Verdict], list[Any]]] = {"c": ([], []), "py": ([], [])}
    for i in range(0, len(msgs), 97):
        part = slice(i, i + 97)
        for name, (combined, plain) in tables.items():
            got[name][0].extend(combined.update(keys[part], ts[part], xs[part]))
            v = plain.detectors.update(keys[part], ts[part], xs[part])
            got[name][1].append(plain.rows(keys[part], ts[part], xs[part], v, every=True)[1])
    assert got["c"][0] == got["py"][0]
    one = ClassifiedTable(None, proba)  # reading by reading: the same verdicts
    assert [one.update([k], [t], [x])[0] for k, t, x in zip(keys, ts, xs, strict=True)
            ] == got["c"][0]
    assert any(v.opens for v in got["c"][0]) and tables["c"][0].classified > 1000
    for a, b in zip(got["c"][1], got["py"][1], strict=True):
        assert a.tobytes() == b.tobytes()


def test_a_streams_own_tails_tell_a_spike_from_its_usual_outliers() -> None:
    """The tail columns: a 10-sigma jump in a Gaussian stream is far beyond anything it
    showed (z_max_ratio high, tail_log low); the same jump in a stream that has shown such
    outliers before is not."""
    col = {n: i for i, n in enumerate(fault_classifier.RESIDUAL_FEATURES)}
    rng = random.Random(3)
    ts = [1_700_000_000.0 + 10.0 * i for i in range(201)]
    calm = [20.0 + rng.gauss(0.0, 0.5) for _ in ts]
    wild = [x + (5.0 if i % 2 else -5.0) * (i % 17 == 3) for i, x in enumerate(calm)]
    last = {}
    for name, xs in (("calm", calm), ("wild", wild)):
        xs = xs[:200] + [calm[200] + 5.0]
        table = ClassifiedTable()
        for t, x in zip(ts, xs, strict=True):
            v = table.detectors.update([name], [t], [x])
            row = table.rows([name], [t], [x], v, every=True)[1][0]
        last[name] = row
    c, w = last["calm"], last["wild"]
    assert c[col["z"]] > 6 and c[col["z_max_ratio"]] > 1.5 and c[col["tail_log"]] < -2, c
    assert w[col["z_max_ratio"]] < 1.2 and w[col["tail_log"]] > -1.6, w
    assert w[col["tail_log"]] > c[col["tail_log"]] + 0.8


def test_an_anomaly_model_of_other_columns_is_refused(tmp_path: Path) -> None:
    """The runtime checks the manifest's columns: the 17-column model this one replaced
    (no tail columns) falls back to the rules."""
    for f in ("anomaly.onnx", "anomaly.json"):
        (tmp_path / f).write_bytes((MODELS / f).read_bytes())
    man = json.loads((tmp_path / "anomaly.json").read_text())
    man["input"]["feature_names"] = man["input"]["feature_names"][:17]
    (tmp_path / "anomaly.json").write_text(json.dumps(man))
    sc = load_scorer(tmp_path, "anomaly", "model")
    assert sc.source == "rules" and "feature names" in sc.fallback
