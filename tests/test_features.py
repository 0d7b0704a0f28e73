"""Feature extraction shared by training and the runtime, and the rule baselines."""

from __future__ import annotations

import json

import cbor2
import numpy as np

from firmware_sim.datasets import healthy_stream, residual_dataset
from firmware_sim.generator import generate
from firmware_sim.scenario import FAULTS, PRIORITIES, THREATS, Scenario
from rapidmq_edge.intelligence import rules
from rapidmq_edge.intelligence.fault_classifier import ClassifiedTable
from rapidmq_edge.intelligence.features import (
    ANOMALY_LABELS,
    CLIENT_FEATURES,
    MESSAGE_FEATURES,
    PRIORITY_LABELS,
    RESIDUAL_FEATURES,
    THREAT_LABELS,
    ClientWindows,
    message_features,
    reading_value,
)

S = {n: i for i, n in enumerate(RESIDUAL_FEATURES)}
M = {n: i for i, n in enumerate(MESSAGE_FEATURES)}
C = {n: i for i, n in enumerate(CLIENT_FEATURES)}


def _healthy(n: int, seed: int = 0, period: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n) * period
    return t, np.round(20 + rng.normal(0, 0.2, n), 2)


def _feed(table: ClassifiedTable, key: str, t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Residual rows of readings fed one at a time (the detector first, as the runtime)."""
    out = []
    for ti, xi in zip(t.tolist(), x.tolist(), strict=True):
        v = table.detectors.update([key], [ti], [xi])
        out.append(table.rows([key], [ti], [xi], v, every=True)[1])
    return np.concatenate(out)


def test_labels_are_one_contract() -> None:
    assert PRIORITY_LABELS == PRIORITIES and ANOMALY_LABELS == FAULTS and THREAT_LABELS == THREATS


def test_batched_residual_rows_equal_one_by_one() -> None:
    run = generate(Scenario(seed=3, devices=20, duration=900.0, fault_rate=8.0))
    one = residual_dataset(run, batch=1)
    many = residual_dataset(run, batch=256)  # many readings of one stream per batch
    assert one.X.shape == many.X.shape == (len(one.y), len(RESIDUAL_FEATURES))
    assert len(one.X) > 500 and np.array_equal(one.X, many.X)
    assert set(one.y.tolist()) == set(range(len(ANOMALY_LABELS)))  # every kind, labelled


def test_residual_features_see_each_fault_kind() -> None:
    t, x = _healthy(80)
    table = ClassifiedTable()
    f = _feed(table, "a", t, x)
    assert f[0].tolist() == [0.0] * len(RESIDUAL_FEATURES)  # the first reading: no state yet
    assert np.all(np.abs(f[40:, S["z"]]) < 6) and f[-1, S["age_log"]] == np.float32(np.log(80))
    assert np.all(f[40:, S["dt_jitter"]] < 0.1)  # a regular stream
    spike = _feed(table, "a", np.array([810.0]), np.array([20 + 10 * 0.2]))[0]
    assert spike[S["z"]] > 6 and spike[S["dz"]] > 6 and spike[S["z_rel"]] > 6
    after = _feed(table, "a", np.array([820.0]), np.array([20.0]))[0]
    assert abs(after[S["z"]]) < 4  # the spike did not move the expected value much
    stuck = _feed(table, "a", 830.0 + 10 * np.arange(5), np.full(5, 20.05))
    assert np.allclose(np.expm1(stuck[:, S["run_log"]]), [0, 1, 2, 3, 4], atol=1e-5)
    burst = _feed(table, "a", 880.5 + 0.5 * np.arange(10), x[:10])
    assert np.all(burst[1:, S["log_dt"]] < -2) and burst[-1, S["burst"]] > 2  # [0]: on time
    gap = _feed(table, "a", np.array([900.0 + 500.0]), np.array([20.0]))[0]
    assert gap[S["gap"]] == 1
    # a second stream grows the table without touching the first
    other = _feed(table, "b", t[:3], x[:3])
    assert len(table) == 2 and other[0].tolist() == [0.0] * len(RESIDUAL_FEATURES)
    drift_t, drift_x = _healthy(100, seed=1)
    drift_x = drift_x + 0.2 * 0.5 * np.maximum(np.arange(100) - 60, 0)
    d = _feed(ClassifiedTable(), "c", drift_t, drift_x)
    assert d[-1, S["g_fast"]] > 3 and d[-1, S["slope"]] > 0.2


def test_healthy_training_streams_are_seeded_and_varied() -> None:
    """models/train.py's healthy streams: the same for a seed, and of every kind (cycles,
    coarse values, heavy tails, irregular sampling, gaps) across seeds."""
    assert healthy_stream(10_000, 50) == healthy_stream(10_000, 50)
    kinds = {"coarse": 0, "irregular": 0, "gap": 0}
    for seed in range(10_000, 10_040):
        ts, xs = healthy_stream(seed, 400)
        dt = np.diff(ts)
        kinds["coarse"] += len(set(xs)) < 100
        kinds["irregular"] += float(np.std(dt) / np.mean(dt)) > 0.5
        kinds["gap"] += float(dt.max()) > 10 * float(np.median(dt))
    assert all(n >= 3 for n in kinds.values()), kinds


def test_reading_value_parses_json_and_cbor_only() -> None:
    assert reading_value(b'{"ts":1,"value":21.5}') == 21.5
    assert reading_value(cbor2.dumps({"value": 3})) == 3.0
    for bad in (b"", b"21.5", b'{"value":"x"}', b'{"value":true}', b"{broken",
                b"\xa1\xff", json.dumps({"value": None}).encode(), b'[1,2]'):
        assert reading_value(bad) is None


def test_message_features_columns() -> None:
    X = message_features(
        ["site/s01/door/dev0001/event", "devices/sn0002/syslog/log", "a/b"],
        [b'{"event":"forced","door":"d1"}', b"2023-11-14T00:00:00Z ERROR x[1]: modbus timeout",
         cbor2.dumps({"value": 1.5})], qos=[1, 0, 0], retain=[False, False, True])
    assert X.shape == (3, len(MESSAGE_FEATURES)) and X.dtype == np.float32
    assert X[0, M["kw_forced"]] == 1 and X[0, M["kw_event"]] == 1 and X[0, M["qos"]] == 1
    assert X[0, M["fmt_json_object"]] == 1 and X[1, M["fmt_text"]] == 1
    assert X[1, M["kw_ERROR"]] == 1 and X[1, M["kw_error"]] == 0  # case-sensitive
    assert X[2, M["fmt_cbor_map"]] == 1 and X[2, M["kw_value"]] == 1 and X[2, M["retain"]] == 1
    assert X[0, M["topic_depth"]] == 5
    hashed = X[:, :32].sum(axis=1)
    assert hashed.tolist() == [5, 4, 2]
    # dev0001 and dev0099 hash alike (digits dropped): the model generalises across ids
    a, b = message_features(["x/dev0001"], [b""]), message_features(["x/dev0099"], [b""])
    np.testing.assert_array_equal(a, b)


def test_client_windows_count_per_window() -> None:
    w = ClientWindows(window=10.0)
    for i in range(6):
        w.connect("guess", 1.0 + i, ok=False, username=f"u{i % 3}")
    w.publish("dev", 2.0, "a/b", 100)
    w.publish("dev", 3.0, "a/c", 300, ok=False)
    w.subscribe("dev", 4.0, "$SYS/#")
    assert w.current("dev") is not None and w.current("nobody") is None
    w.publish("dev", 12.0, "a/b", 10)  # a later window closes the first one
    rows = w.flush(now=9.5)  # only windows closed by later activity
    assert rows.clients == ["dev"] and rows.windows == [0]
    f = rows.features[0]
    assert np.expm1(f[C["publishes_log"]]) == 2 and np.expm1(f[C["publish_denied_log"]]) == 1
    assert np.isclose(np.expm1(f[C["sys_subs_log"]]), 1)
    assert np.isclose(np.exp2(f[C["max_size_log2"]]) - 1, 300)
    rest = w.flush()
    assert sorted(rest.clients) == ["dev", "guess"]
    g = rest.features[rest.clients.index("guess")]
    assert np.isclose(np.expm1(g[C["auth_failures_log"]]), 6) and g[C["failure_ratio"]] == 1
    assert np.isclose(np.expm1(g[C["usernames_log"]]), 3)
    assert rules.threat_rules(rest.features)[rest.clients.index("guess")] == 1
    assert w.flush().features.shape == (0, len(CLIENT_FEATURES))


def test_rules_on_obvious_cases() -> None:
    X = message_features(["p/alarm/event", "p/log", "p/temp/reading", "p/status"],
                         [b'{"severity":"critical"}', b"t DEBUG poll", b'{"value":1}',
                          b'{"heartbeat":1}'])
    assert [PRIORITY_LABELS[i] for i in rules.priority_rules(X)] == [
        "critical", "bulk", "normal", "bulk"]
    rows = np.zeros((5, len(RESIDUAL_FEATURES)), np.float32)
    rows[:, S["age_log"]] = np.log1p(100)
    rows[0, [S["z"], S["dz"]]] = 9
    rows[1, S["run_log"]] = np.log1p(3)
    rows[2, S["log_dt"]] = -2
    rows[3, S["g_fast"]] = 5
    assert [ANOMALY_LABELS[i] for i in rules.residual_rules(rows)] == [
        "spike", "stuck", "burst", "drift", "none"]
