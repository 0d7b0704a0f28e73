"""Candidate validation and the shadow gate on real onnxruntime sessions: each rejection
reason; a "same" model passes the gate, a constant-label model fails it on agreement, a
model that raises in onnxruntime fails on exceptions without ever raising into the path;
the batch scorer's shadow and swap (real feature rows of real message batches)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rapidmq_edge.config.ota import OtaSettings
from rapidmq_edge.intelligence.features import message_features
from rapidmq_edge.intelligence.models import Shadow, load_scorer
from rapidmq_edge.intelligence.scoring import BatchScorer
from rapidmq_edge.intelligence.threat import ClientWatch
from rapidmq_edge.ota.activate import gate_from_settings
from rapidmq_edge.ota.shadow import ShadowEvaluator, ShadowGate
from rapidmq_edge.ota.validate import CandidateRejected, validate_candidate

from .ota_model_helpers import MODELS, constant_model, copy_shipped, digest, vectors

PRIO_IN = [{"name": "features", "dtype": "float32", "shape": [None, 82]}]
PRIO_OUT = [{"name": "label", "dtype": "int64", "shape": [None]},
            {"name": "probabilities", "dtype": "float32", "shape": [None, 4]}]


def _validate(path: Path, **kw: object) -> object:
    args: dict[str, object] = {"inputs": PRIO_IN, "outputs": PRIO_OUT,
                               "vectors": vectors("priority"), "version": "2.0.0"}
    args.update(kw)
    return validate_candidate("priority", path, str(args.pop("digest", digest(path))),
                              int(args.pop("size", path.stat().st_size)),  # type: ignore[call-overload]
                              **args)  # type: ignore[arg-type]


def _rejected(path: Path, **kw: object) -> CandidateRejected:
    with pytest.raises(CandidateRejected) as err:
        _validate(path, **kw)
    return err.value


def test_validation_accepts_a_good_model_and_names_each_rejection(tmp_path: Path) -> None:
    good = copy_shipped("priority", tmp_path / "good.onnx")
    vm = _validate(good)
    assert vm.scorer.source == "model" and vm.scorer.version.startswith("2.0.0+f63844aa")  # type: ignore[attr-defined]
    labels, _ = vm.scorer.predict(np.asarray([r for r, _ in vectors("priority")],  # type: ignore[attr-defined]
                                             np.float32))
    assert labels.tolist() == [lab for _, lab in vectors("priority")]
    assert _rejected(good, size=good.stat().st_size + 1).reason == "size"
    assert _rejected(good, digest="00" * 32).reason == "digest"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not an onnx model at all")
    assert _rejected(junk).reason == "load"
    # the threat model in the priority slot: 18 features, not the contract's 82
    threat = copy_shipped("threat", tmp_path / "threat.onnx")
    err = _rejected(threat, inputs=None, outputs=None)
    assert err.reason == "shapes" and "model inputs" in err.detail and "82" in err.detail
    # a manifest that declares another signature than the contract
    err = _rejected(good, outputs=PRIO_OUT[:1])
    assert err.reason == "shapes" and "declared outputs" in err.detail
    # a constant model fails the shipped golden rows
    worse = constant_model(tmp_path / "worse.onnx", 82, 4, 3)
    err = _rejected(worse)
    assert err.reason == "vectors" and "expected" in err.detail
    assert _rejected(good, vectors=[]).reason == "vectors"
    assert _rejected(good, vectors=[[[0.0] * 5, 1]]).reason == "vectors"
    # expected probabilities are checked too, within their tolerance
    row, lab = vectors("priority")[0]
    err = _rejected(good, vectors=[{"input": row, "label": lab,
                                    "probabilities": [0.25] * 4, "tolerance": 1e-3}])
    assert err.reason == "vectors" and "probabilities" in err.detail


def test_gate_from_a_manifest_or_config() -> None:
    g = ShadowGate.from_mapping({"min_messages": 50, "max_cost_us": 80.0, "max_shift": None})
    assert (g.min_messages, g.max_cost_us, g.max_shift, g.min_agreement) == (50, 80.0, None, 0.98)
    # the configured gate ([ota] shadow_*), under which a manifest's gate is laid
    conf = gate_from_settings(OtaSettings(shadow_min_messages=200, shadow_min_agreement=0.9))
    assert (conf.min_messages, conf.min_agreement, conf.min_seconds) == (200, 0.9, 60.0)
    assert gate_from_settings(None) == ShadowGate()
    assert ShadowGate.from_mapping({"min_messages": 5}, conf).min_agreement == 0.9
    for bad, msg in [({"min_agreement": 1.5}, "at most 1"), ({"min_mesages": 1}, "unknown key"),
                     ({"min_messages": 1.5}, "integer"), ({"max_cost_us": -1}, ">= 0"),
                     ({"min_seconds": "1"}, "number")]:
        with pytest.raises(ValueError, match=msg):
            ShadowGate.from_mapping(bad)


def _traffic(n: int, seed: int = 1) -> np.ndarray:
    """Feature rows of ``n`` varied messages (topics, payloads, QoS) as the gateway computes."""
    rng = np.random.default_rng(seed)
    kinds = ["site/s{}/temperature/sn{}/reading", "devices/dev{}/alarm/evt{}",
             "plant1/line{}/log/node{}/lines", "fleet/t{}/gps/{}"]
    topics, payloads = [], []
    for i in range(n):
        k = int(rng.integers(len(kinds)))
        topics.append(kinds[k].format(int(rng.integers(30)), int(rng.integers(9))))
        payloads.append(json.dumps({"ts": 1.7e9 + i, "v": float(rng.normal()),
                                    "severity": ["info", "critical"][int(rng.integers(2))]}
                                   ).encode() if k != 2 else b"DEBUG fwupd: idle " * (k + 1))
    qos = [int(q) for q in rng.integers(0, 2, n)]
    return message_features(topics, payloads, qos, [False] * n)


def _run_shadow(candidate_path: Path, gate: ShadowGate, batches: int = 12,
                size: int = 50) -> ShadowEvaluator:
    active = load_scorer(MODELS, "priority", "model")
    cand = validate_candidate("priority", candidate_path, digest(candidate_path),
                              candidate_path.stat().st_size, require_vectors=False).scorer
    clock = [0.0]
    ev = ShadowEvaluator("priority", gate, clock=lambda: clock[0])
    shadow = Shadow(cand, ev)
    for b in range(batches):
        X = _traffic(size, seed=b)
        labels, conf = active.predict(X)
        shadow.rows(X, labels, conf, 1e-5)
        clock[0] += 1.0
    return ev


GATE = ShadowGate(min_messages=500, min_seconds=5.0, min_agreement=0.98, max_shift=0.25,
                  max_cost_ratio=None, max_cost_us=5000.0)


def test_same_model_passes_the_gate_worse_model_fails_on_agreement(tmp_path: Path) -> None:
    same = _run_shadow(copy_shipped("priority", tmp_path / "same.onnx"), GATE)
    d = same.decision()
    assert d.state == "pass", d
    assert same.agreement == 1.0 and same.shift < 1e-9 and same.messages == 600
    assert same.cost_us > 0 and same.exceptions == 0
    worse = _run_shadow(constant_model(tmp_path / "bulk.onnx", 82, 4, 3), GATE)
    d = worse.decision()
    assert (d.state, d.reason) == ("fail", "agreement"), d
    assert worse.agreement < 0.9 and worse.labels_cand == {3: 600}
    # judged on confidences alone, the constant model's distribution is far off too
    lenient = ShadowGate(min_messages=500, min_seconds=5.0, min_agreement=0.0)
    d = _run_shadow(constant_model(tmp_path / "bulk2.onnx", 82, 4, 3), lenient).decision()
    assert (d.state, d.reason) == ("fail", "shift"), d


def test_pending_until_enough_messages_and_time(tmp_path: Path) -> None:
    same = copy_shipped("priority", tmp_path / "same.onnx")
    ev = _run_shadow(same, ShadowGate(min_messages=1000, min_seconds=5.0), batches=6)
    assert ev.decision().state == "pending" and "300/1000" in ev.decision().detail
    ev = _run_shadow(same, ShadowGate(min_messages=100, min_seconds=60.0), batches=6)
    assert ev.decision().state == "pending"  # 6 s of the 60 s
    ev = _run_shadow(same, ShadowGate(min_messages=100, min_seconds=1.0, max_cost_us=0.001,
                                      max_cost_ratio=None), batches=6)
    assert ev.decision().reason == "cost"


def test_a_candidate_that_raises_fails_on_exceptions_and_never_raises(tmp_path: Path) -> None:
    # onnxruntime raises for every batch whose size is not a multiple of 3
    odd = constant_model(tmp_path / "odd.onnx", 82, 4, 2, batch_multiple=3)
    ev = _run_shadow(odd, ShadowGate(min_messages=10**6, max_exceptions=2), batches=4,
                     size=49)
    d = ev.decision()
    assert (d.state, d.reason) == ("fail", "exceptions") and ev.exceptions == 4, d
    assert "Reshape" in d.detail or "shape" in d.detail.lower()
    assert ev.compared == 0 and ev.messages == 4 * 49


def _batch(n: int, offset: int = 0) -> tuple[list[str], list[bytes], list[int], list[bool],
                                              list[float], list[int]]:
    topics = [f"site/s{i % 7}/{['alarm', 'temperature', 'log'][i % 3]}/sn{i % 5}"
              for i in range(offset, offset + n)]
    payloads = [b'{"v":%d,"severity":"critical"}' % (i % 4) if i % 3 == 0 else
                b'{"v":%d}' % (i % 10) for i in range(offset, offset + n)]
    return topics, payloads, [1] * n, [False] * n, [0.0] * n, list(range(n))


def test_batch_scorer_shadow_sees_every_message_and_swaps_between_batches(
        tmp_path: Path) -> None:
    active = load_scorer(MODELS, "priority", "model")
    bs = BatchScorer(active, None, False)
    worse = validate_candidate("priority", constant_model(tmp_path / "b.onnx", 82, 4, 3),
                               digest(tmp_path / "b.onnx"), (tmp_path / "b.onnx").stat().st_size,
                               require_vectors=False).scorer
    ev = ShadowEvaluator("priority", ShadowGate(min_messages=1, min_seconds=0.0))
    bs.shadow = Shadow(worse, ev)
    decided = []
    for k in range(5):
        r = bs.score(*_batch(64, k * 64))
        assert r.priority is not None and r.shadow is not None
        decided.append(r.priority)
        r.shadow()  # what the runtime runs after the batch is acknowledged
    # every needed message was compared, though most rows came from the label cache
    assert ev.messages == ev.compared == 5 * 64
    assert ev.rows_run < ev.messages and ev.labels_cand == {3: 320}
    assert ev.decision().reason == "agreement"
    # the shadow never decided: the labels are the active model's
    bs2 = BatchScorer(active, None, False)
    assert [bs2.score(*_batch(64, k * 64)).priority for k in range(5)] == decided
    # a swap takes effect at the next batch, with the label cache started over
    bs.shadow = None
    bs.use(worse)
    assert bs.priority is active
    r = bs.score(*_batch(64))
    assert bs.priority is worse and set(r.priority or []) == {3}


def test_threat_watch_shadow_scores_the_same_rows(tmp_path: Path) -> None:
    active = load_scorer(MODELS, "threat", "model")
    same_path = copy_shipped("threat", tmp_path / "t.onnx")
    cand = validate_candidate("threat", same_path, digest(same_path),
                              same_path.stat().st_size, vectors=vectors("threat")).scorer
    now = [100.0]
    watch = ClientWatch(active, action="log", min_events=1, clock=lambda: now[0])
    ev = ShadowEvaluator("threat", ShadowGate(min_messages=3, min_seconds=0.0))
    watch.shadow = Shadow(cand, ev)
    for c in range(3):
        watch.published(f"dev{c}", f"s/{c}", 20, True)
    watch.tick()
    assert ev.messages == ev.compared == 3 and ev.decision().state == "pass"


def test_small_and_large_batches_accumulate_the_same() -> None:
    rng = np.random.default_rng(3)
    a_lab, c_lab = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    a_conf, c_conf = rng.random(300), rng.random(300)
    c_conf[[5, 17]] = [np.nan, 1.0]  # NaN and the top edge land in the end bins
    one = ShadowEvaluator("priority")
    one.feed(a_lab, a_conf, c_lab, c_conf)
    many = ShadowEvaluator("priority")
    for i in range(0, 300, 7):  # lists of up to 7: the plain-Python path
        many.feed(a_lab[i:i + 7].tolist(), a_conf[i:i + 7].tolist(),
                  c_lab[i:i + 7].tolist(), c_conf[i:i + 7].tolist())
    assert one.agreed == many.agreed == int((a_lab == c_lab).sum())
    assert one.hist_cand.tolist() == many.hist_cand.tolist()
    assert one.hist_active.tolist() == many.hist_active.tolist()
    assert one.labels_cand == many.labels_cand and one.shift == many.shift > 0
    with pytest.raises(ValueError, match="candidate labels"):
        one.feed([1, 2], [0.5, 0.5], [1], [0.5])


def test_forget_labels_starts_the_caches_over(tmp_path: Path) -> None:
    """An erasure's ``forget_labels``: the label cache and the shadow's per-key answers
    (keyed by topic) start over; the same labels come back, computed again."""
    active = load_scorer(MODELS, "priority", "model")
    bs = BatchScorer(active, None, False)
    bs.shadow = Shadow(active, ShadowEvaluator("priority", ShadowGate(min_messages=1)))
    r = bs.score(*_batch(64))
    assert r.shadow is not None
    r.shadow()  # after the batch is acknowledged
    first, hits = r.priority, bs.cache_hits
    assert bs.score(*_batch(64)).priority == first and bs.cache_hits == hits + 64
    assert bs.shadow.known
    bs.forget_labels()
    assert not bs.shadow.known
    assert bs.score(*_batch(64)).priority == first and bs.cache_hits == hits + 64
