"""The feedback loop's parts (issue 14 part 5), each with real pieces: the shipped priority
model in onnxruntime, real SQLite files, real ONNX export and validation.

* the sampler: at most N rows per minute whatever the message rate, every message the same
  chance, a bounded buffer that drops its oldest with a count, and its cost per batch;
* the wire format: a batch reads back to the same rows; broken ones are refused by reason;
* the archive refuses a batch on another gateway's topic;
* incidents and verdicts survive reopening the database; a replaced verdict is due again;
  the service refuses bad bodies and unknown incidents with 400 / 404;
* the trainer: a confirmed incident relabels its stream's rows; the exported model passes
  the OTA candidate validation (``ota/validate.py``) and agrees with what it learnt from.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rapidmq_edge.broker.message import Message
from rapidmq_edge.intelligence.features import MESSAGE_FEATURES, PRIORITY_LABELS
from rapidmq_edge.intelligence.models import load_scorer
from rapidmq_edge.ota.feedback import (
    FeedbackError,
    FeedbackRow,
    FeedbackSampler,
    FeedbackTap,
    IncidentBook,
    decode_feedback,
    encode_rows,
    encode_verdicts,
)
from rapidmq_edge.ota.feedback_collect import FeedbackArchive, load_archive
from rapidmq_edge.ota.feedback_upload import FeedbackService
from rapidmq_edge.ota.trainer import relabel, train, training_set
from rapidmq_edge.ota.validate import validate_candidate
from rapidmq_edge.ota.verdicts import VerdictStore

MODELS = Path(__file__).resolve().parent.parent / "models"
WIDTH = len(MESSAGE_FEATURES)


class Clock:
    """Time for the sampler (a mock may stand in for time)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _batch(n: int, k0: int = 0) -> list[tuple[Message, list[Any], float]]:
    out = []
    for k in range(k0, k0 + n):
        topic = f"site/sensors/{k % 13}/t" if k % 4 else f"site/alarm/{k % 3}"
        payload = json.dumps({"value": 20 + k % 7}).encode()
        out.append((Message(topic, payload, k % 2, False, {}, None, "dev"), [], 0.0))
    return out


@pytest.fixture(scope="module")
def scorer() -> Any:
    sc = load_scorer(MODELS, "priority", "model")
    assert sc.source == "model", sc.fallback
    return sc


def test_sampler_keeps_to_its_rate_and_samples_every_message_alike(scorer: Any) -> None:
    clock = Clock()
    s = FeedbackSampler("priority", rows_per_minute=120, buffer=10_000, clock=clock,
                        wall=clock, rng=random.Random(1))
    topics: dict[str, int] = {}
    # 2,000 msg/s in batches of 40 for 3 simulated minutes
    for step in range(3 * 60 * 50):
        clock.t += 0.02
        batch = _batch(40, step * 40)
        s.offer(batch, [2] * len(batch), scorer)
    assert s.offered == 3 * 60 * 2000
    # at most 120 in each minute, and about that many
    assert 320 <= s.sampled <= 3 * 120, s.sampled
    assert len(s.rows) == s.sampled and s.dropped == 0
    for r in s.rows:
        topics[r.topic] = topics.get(r.topic, 0) + 1
        assert len(r.features) == WIDTH and r.model == scorer.version
        assert 0.0 < r.confidence <= 1.0 and r.label in range(len(PRIORITY_LABELS))
    # every topic of the 16 was sampled (uniform over messages, not over batches)
    assert len(topics) == 16, topics


def test_sampler_buffer_is_bounded_and_counts_what_it_drops(scorer: Any) -> None:
    clock = Clock()
    s = FeedbackSampler("priority", rows_per_minute=6000, buffer=50, clock=clock,
                        wall=clock, rng=random.Random(2))
    for step in range(200):
        clock.t += 1.0
        s.offer(_batch(10, step * 10), [1] * 10, scorer)
    assert len(s.rows) == 50 and s.sampled == 2000 and s.dropped == 1950
    newest = list(s.rows)[-1]
    first = s.take(20)
    assert len(first) == 20 and len(s.rows) == 30
    s.put_back(first)  # a failed upload: back in front, nothing lost within the bound
    assert len(s.rows) == 50 and list(s.rows)[:20] == first and list(s.rows)[-1] == newest
    clock.t += 1.0
    s.offer(_batch(10), [1] * 10, scorer)
    assert len(s.rows) == 50 and s.dropped == 1960


def test_sampler_skips_unscored_messages_and_a_failing_model(scorer: Any) -> None:
    clock = Clock()
    s = FeedbackSampler("priority", rows_per_minute=600, clock=clock, wall=clock,
                        rng=random.Random(3))
    assert s.offer(_batch(5), [-1] * 5, scorer) == 0  # nothing needed a label
    broken = load_scorer(MODELS, "priority", "model")
    broken.session = None  # predict fails (no rule either): the row keeps its label
    clock.t += 1.0
    assert s.offer(_batch(3), [3, 3, 3], broken) >= 1
    assert all(r.label == 3 and r.confidence != r.confidence for r in s.rows)
    tap = FeedbackTap(None, IncidentBook())
    tap.offer(_batch(3), [1, 1, 1], scorer)  # sampling off: nothing, no error


def test_hook_cost_per_batch(scorer: Any) -> None:
    """The hook's cost in the message path per batch of 64 at 2,000 msg/s (simulated time):
    amortised over a minute with 60 and with 600 rows sampled, and a batch after the
    minute's rows are taken (the common case)."""
    out = {}
    batch = _batch(64)
    labels = [2] * 64
    for per_minute in (60, 600):
        clock = Clock()
        s = FeedbackSampler("priority", rows_per_minute=per_minute, buffer=10_000,
                            clock=clock, rng=random.Random(4))
        tap = FeedbackTap(s, IncidentBook())
        n = 60 * 2000 // 64
        spent = 0.0
        for _ in range(n):
            clock.t += 64 / 2000
            t0 = time.perf_counter()
            tap.offer(batch, labels, scorer)
            spent += time.perf_counter() - t0
        assert per_minute * 0.8 <= s.sampled <= per_minute, s.sampled
        out[f"hook_us_per_batch_{per_minute}_rows_per_min"] = round(spent / n * 1e6, 2)
    s.per_minute = s._minute[1]  # this minute's rows are all taken
    t0 = time.perf_counter()
    for _ in range(20_000):
        tap.offer(batch, labels, scorer)
    idle_us = (time.perf_counter() - t0) / 20_000 * 1e6
    out["hook_us_per_batch_idle"] = round(idle_us, 2)
    print(json.dumps(out))
    assert idle_us < 20  # ~1 µs here; the bound is loose for 2 loaded shared cores
    assert out["hook_us_per_batch_60_rows_per_min"] < 50


def test_batches_read_back_and_broken_ones_are_refused() -> None:
    rows = [FeedbackRow(1.7e9 + i, "1.0.0+abc" if i % 2 else "1.1.0+def", f"t/{i}", i % 4,
                        0.5 + i / 100, tuple(float(np.float32(0.1 * j + i)) for j in
                                             range(WIDTH))) for i in range(5)]
    data = encode_rows("gw-1", "priority", rows, seq=3, dropped=7)
    b = decode_feedback(data)
    assert (b.kind, b.gateway, b.component, b.seq, b.dropped) == ("rows", "gw-1", "priority",
                                                                  3, 7)
    # the features read back to the same float32 values
    assert (np.asarray([r.features for r in b.rows], np.float32)
            == np.asarray([r.features for r in rows], np.float32)).all()
    assert [(r.model, r.topic, r.label) for r in b.rows] == \
        [(r.model, r.topic, r.label) for r in rows]
    v = decode_feedback(encode_verdicts("gw-1", [{"incident": "a-1", "verdict": "dismissed"}]))
    assert v.kind == "verdicts" and v.verdicts[0]["verdict"] == "dismissed"
    doc = json.loads(data)
    bad = {
        "version": {**doc, "v": 2},
        "width": {**doc, "rows": [doc["rows"][0][:5] + [[1.0, 2.0]]]},
        "malformed": {**doc, "rows": [doc["rows"][0][:4] + [0.5, [1] * WIDTH] + ["x"]]},
    }
    for reason, d in bad.items():
        with pytest.raises(FeedbackError) as err:
            decode_feedback(json.dumps(d).encode())
        assert err.value.reason == reason, (reason, err.value)
    for data_bad, reason in ((b"\xff", "malformed"), (b"[]", "malformed"),
                             (json.dumps({**doc, "component": "x"}).encode(), "malformed"),
                             (json.dumps({**doc, "rows": [[*doc["rows"][0][:3], 9, 0.5,
                                                           [0.0] * WIDTH]]}).encode(),
                              "malformed"),
                             (b"{" * 10, "malformed"), (b" " * 100, "malformed")):
        with pytest.raises(FeedbackError) as err:
            decode_feedback(data_bad)
        assert err.value.reason == reason
    with pytest.raises(FeedbackError) as err:
        decode_feedback(data, max_bytes=100)
    assert err.value.reason == "too-large"


def test_archive_refuses_a_batch_on_another_gateways_topic(tmp_path: Path) -> None:
    arch = FeedbackArchive(tmp_path)
    rows = [FeedbackRow(1.0, "m", "t", 1, 0.9, (0.0,) * WIDTH)]
    data = encode_rows("gw-1", "priority", rows)
    assert arch.add("rapidmq/ota/feedback/gw-2/priority", data) is None
    assert arch.add("rapidmq/ota/feedback/gw-1/threat", data) is None
    assert arch.add("rapidmq/ota/feedback/gw-1/priority", b"junk") is None
    assert arch.refused == {"wrong-topic": 2, "malformed": 1}
    assert arch.add("rapidmq/ota/feedback/gw-1/priority", data) is not None
    got, verdicts = load_archive(tmp_path, "priority")
    assert got == rows and verdicts == []


def test_verdicts_are_durable_and_refused_with_reasons(tmp_path: Path) -> None:
    db = tmp_path / "ota" / "ota.sqlite"

    async def scenario() -> dict[str, Any]:
        svc = FeedbackService(VerdictStore(db))
        svc.tap.incident({"state": "open", "incident": "65f0-1", "kind": "spike",
                          "stream": "s/1", "at": 100.0})
        svc.tap.incident({"state": "closed", "incident": "65f0-1", "stream": "s/1",
                          "readings": 9, "duration_s": 50.0, "at": 150.0})
        assert await svc.flush() == 0  # no link: incidents kept, nothing uploaded
        refusals = [await svc.http_verdict(i, b, "ops") for i, b in (
            ("65f0-2", {"verdict": "confirmed"}), ("../x", {"verdict": "confirmed"}),
            ("65f0-1", {"verdict": "sure"}), ("65f0-1", {"verdict": "confirmed", "x": 1}),
            ("65f0-1", ["confirmed"]), ("65f0-1", {"verdict": "dismissed", "note": 5}))]
        assert [s for s, _ in refusals] == [404, 404, 400, 400, 400, 400], refusals
        svc.store.close()
        # a restarted gateway: the incident is found in the database
        svc2 = FeedbackService(VerdictStore(db))
        status, doc = await svc2.http_verdict("65f0-1", {"verdict": "confirmed",
                                                         "note": "real"}, "ops")
        assert status == 201, doc
        return doc

    doc = asyncio.run(scenario())
    assert (doc["stream"], doc["opened_at"], doc["closed_at"]) == ("s/1", 100.0, 150.0)
    store = VerdictStore(db)
    pending = store.pending()
    assert [(v["incident"], v["verdict"], v["by"]) for v in pending] == \
        [("65f0-1", "confirmed", "ops")]
    store.mark_sent(pending)
    assert store.pending() == [] and store.verdicts()[0]["sent"] is True
    time.sleep(0.01)
    store.record(store.incident("65f0-1") or {}, "dismissed", "no, a test")
    assert [v["verdict"] for v in store.pending()] == ["dismissed"]  # due again


def _rows(scorer: Any, n: int, t0: float = 1000.0) -> list[FeedbackRow]:
    from rapidmq_edge.intelligence.features import message_features

    rng = random.Random(5)
    msgs = []
    for i in range(n):
        kind = i % 3
        topic = (f"site/sensors/{i % 5}/t", f"site/alarm/{i % 2}", f"site/log/{i % 2}")[kind]
        payload = (json.dumps({"value": round(20 + rng.random(), 2)}),
                   json.dumps({"alarm": True}), "x" * (300 + i % 50))[kind].encode()
        msgs.append((topic, payload, 1 if kind == 1 else 0))
    X = message_features([m[0] for m in msgs], [m[1] for m in msgs], [m[2] for m in msgs],
                         [False] * n)
    lab, conf = scorer.predict(X)
    return [FeedbackRow(t0 + i, scorer.version, m[0], int(lab[i]), float(conf[i]),
                        tuple(X[i].tolist())) for i, m in enumerate(msgs)]


def test_a_confirmed_incident_relabels_its_streams_rows(scorer: Any) -> None:
    rows = _rows(scorer, 300)
    ts = training_set(rows, "priority")
    before = ts.y.copy()
    verdicts = [
        {"incident": "a-1", "verdict": "confirmed", "stream": "site/sensors/1/t",
         "opened_at": 1000.0, "closed_at": 1150.0},
        {"incident": "a-2", "verdict": "dismissed", "stream": "site/sensors/2/t",
         "opened_at": 1000.0, "closed_at": 1300.0},
    ]
    changed = relabel(ts, verdicts)
    hit = [i for i, r in enumerate(rows) if r.topic == "site/sensors/1/t" and r.at <= 1150.0]
    assert changed == sum(before[i] != 0 for i in hit) > 0
    assert all(ts.y[i] == 0 for i in hit)
    others = [i for i in range(len(rows)) if i not in hit]
    assert (ts.y[others] == before[others]).all()  # the dismissed one changed nothing


def test_trained_model_passes_ota_validation_and_learns_the_labels(
        scorer: Any, tmp_path: Path) -> None:
    rows = _rows(scorer, 400)
    out = tmp_path / "priority.onnx"
    report = train(rows, [], "priority", out, version="1.1.0", epochs=300)
    assert report["quality"]["agreement_holdout"] >= 0.95, report
    data = out.read_bytes()
    assert report["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads(out.with_suffix(".json").read_text())["version"] == "1.1.0"
    X = np.asarray([r.features for r in rows[:8]], np.float32)
    want, _ = scorer.predict(X)
    vm = validate_candidate("priority", out, report["sha256"], len(data),
                            vectors=[[x.tolist(), int(w)] for x, w in zip(X, want,
                                                                           strict=True)],
                            version="1.1.0")
    lab, conf = vm.scorer.predict(np.asarray([r.features for r in rows], np.float32))
    assert (lab == np.asarray([r.label for r in rows])).mean() >= 0.95
    # distilled: the confidences follow the active model's (what the shadow gate compares)
    assert abs(float(conf.mean()) - float(np.mean([r.confidence for r in rows]))) < 0.1
    again = train(rows, [], "priority", tmp_path / "again.onnx", version="1.1.0", epochs=300)
    assert again["sha256"] == report["sha256"]  # same data and seed: the same bytes


def test_feedback_keys_are_checked(tmp_path: Path) -> None:
    from rapidmq_edge.config import ConfigError
    from rapidmq_edge.config.ota import parse_ota

    s = parse_ota({"feedback": True, "feedback_rows_per_minute": 30, "feedback_buffer": 5,
                   "feedback_interval": 0.5}, tmp_path)
    assert (s.feedback, s.feedback_rows_per_minute, s.feedback_buffer,
            s.feedback_interval) == (True, 30, 5, 0.5)
    assert parse_ota({}, tmp_path).feedback is False
    for bad, key in (({"feedback": "yes"}, "ota.feedback"),
                     ({"feedback_rows_per_minute": 0}, "ota.feedback_rows_per_minute"),
                     ({"feedback_buffer": -1}, "ota.feedback_buffer"),
                     ({"feedback_interval": 0}, "ota.feedback_interval")):
        with pytest.raises(ConfigError, match=key):
            parse_ota(bad, tmp_path)


def test_model_train_refuses_too_few_rows(scorer: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    arch = FeedbackArchive(tmp_path / "fb")
    arch.add("rapidmq/ota/feedback/gw-1/priority",
             encode_rows("gw-1", "priority", _rows(scorer, 10)))
    res = subprocess.run([sys.executable, "-m", "rapidmq_edge", "model", "train", "--from",
                          str(tmp_path / "fb"), "--out", str(tmp_path / "m.onnx"),
                          "--model-version", "2"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "only 10 priority rows" in res.stderr, res.stderr
    assert not (tmp_path / "m.onnx").exists()
