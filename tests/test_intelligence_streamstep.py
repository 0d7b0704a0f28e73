"""The optional C kernel of the stream table (``intelligence/_streamstep.c``) computes
exactly what the Python loop of ``StreamTable.update_outside`` computes: the same positions,
rows and new states, bit for bit, on simulator runs and on NaN, infinite and huge values.

``make test`` installs a compiler, so the kernel is built here; a silently skipped build
would make these checks (and the benchmark's C-vs-Python numbers) meaningless, hence the
first test.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.generator import generate
from firmware_sim.scenario import Scenario
from rapidmq_edge.intelligence import streams
from rapidmq_edge.intelligence.healthy_region import healthy_region_for
from rapidmq_edge.intelligence.models import load_scorer
from rapidmq_edge.intelligence.streams import _STEADY, _ZERO, Box, StreamTable

MODELS = Path(__file__).resolve().parent.parent / "models"
KERNEL = streams._KERNEL
#: steady streams, outages (gaps), faults of every kind, CBOR payloads (CoAP)
RUN = Scenario(seed=11, devices=40, duration=3600.0, coap_fraction=0.3, fault_rate=8.0,
               outage_rate=1.5)


def _bits(v: Any) -> Any:
    """A value with every float replaced by its exact bits (one NaN: payloads are not
    observable from Python) and its type, for a bit-for-bit comparison."""
    if isinstance(v, float):
        return ("f", "nan" if math.isnan(v) else v.hex())
    if isinstance(v, list | tuple):
        return [type(v).__name__, *(_bits(e) for e in v)]
    if isinstance(v, dict):
        return {k: _bits(e) for k, e in v.items()}
    return (type(v).__name__, v)


@pytest.fixture
def python_loop(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The pure-Python loop inside the block (``RAPIDMQ_EDGE_PURE_PYTHON``'s path)."""
    monkeypatch.setattr(streams, "_KERNEL", None)
    yield


def _both(tables: tuple[StreamTable, StreamTable], keys: Sequence[Any], ts: Sequence[Any],
          xs: Sequence[Any], box: Box | None) -> tuple[Any, Any]:
    """update_outside through the kernel on tables[0] and the Python loop on tables[1]:
    (result, exception) each."""
    out = []
    for table, kernel in zip(tables, (KERNEL, None), strict=True):
        saved = streams._KERNEL
        streams._KERNEL = kernel
        try:
            out.append((table.update_outside(keys, ts, xs, box), None))
        except Exception as exc:  # noqa: BLE001 (compared below: both must raise alike)
            out.append((None, (type(exc), str(exc))))
        finally:
            streams._KERNEL = saved
    return out[0], out[1]


@pytest.fixture(scope="module")
def readings() -> tuple[list[str], list[float], list[float]]:
    msgs = [m for m in sorted(generate(RUN).messages, key=lambda m: m.t) if m.value is not None]
    return [m.topic for m in msgs], [m.t for m in msgs], [float(m.value) for m in msgs]


@pytest.fixture(scope="module")
def gate_box() -> Box:
    gate = healthy_region_for(load_scorer(MODELS, "anomaly", "model"))
    assert gate is not None
    return Box(gate.lo.tolist(), gate.hi.tolist())


def test_the_kernel_is_built_and_in_use() -> None:
    assert KERNEL is not None, "rapidmq_edge/intelligence/_streamstep.c was not built (gcc?)"
    from rapidmq_edge.intelligence import _streamstep  # type: ignore[attr-defined]

    assert KERNEL is _streamstep.update_outside


@pytest.mark.parametrize("batch", [1, 5, 37, 256])
@pytest.mark.parametrize("boxed", [False, True])
def test_kernel_equals_the_python_loop_on_a_simulator_run(
        readings: tuple[list[str], list[float], list[float]], gate_box: Box, batch: int,
        boxed: bool) -> None:
    """Positions, rows and every stream's state after every batch, bit for bit, on a run
    with outages (gaps: the Python general update) and faults (spikes, stuck, drift)."""
    keys, ts, xs = readings
    box = gate_box if boxed else None
    tables = StreamTable(), StreamTable()
    kept = steady = 0
    for i in range(0, len(keys), batch):
        part = slice(i, i + batch)
        (got, err), (want, want_err) = _both(tables, keys[part], ts[part], xs[part], box)
        assert err is None and want_err is None
        assert _bits(got) == _bits(want), i
        kept += len(got[0])
        steady += sum(1 for r in got[1] if r[0] == 1.0 and r[9] == 0.0)
        if i % (batch * 50) == 0:
            assert _bits(tables[0]._rows) == _bits(tables[1]._rows), i
    assert _bits(tables[0]._rows) == _bits(tables[1]._rows)
    warm = sum(1 for st in tables[0]._rows.values() if st[0] >= _STEADY)
    assert warm > len(tables[0]) // 2  # most streams end on the fast path
    if boxed:
        assert 0 < kept < len(keys) * 3 // 4  # the box leaves many readings out
    else:
        assert kept == len(keys) and steady > len(keys) // 2  # mostly the fast path
        assert steady < len(keys)  # and the general update (warm-up, gaps)


SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1e-300,
           1e300, 1.0, -1.0, 1e-6, 1e-7, 20.0, 3.5]


def _special(rnd: random.Random, scale: float) -> float:
    return rnd.choice(SPECIAL) if rnd.random() < 0.3 else rnd.gauss(0.0, scale)


def test_kernel_equals_the_python_loop_on_nan_inf_and_huge_values(gate_box: Box) -> None:
    """Random steady states and readings, a third of them NaN, infinite, huge, tiny or
    signed zeros: identical results and states, or the same exception (math.exp overflow
    of a huge interval baseline raises OverflowError on both paths)."""
    rnd = random.Random(42)
    raised = 0
    for trial in range(3000):
        n = rnd.choice([_STEADY, _STEADY - 1.0, 40.0, 1e6, math.nan, math.inf])
        state = [n, n - 1.0, 100.0, _special(rnd, 5.0), _special(rnd, 5.0),
                 _special(rnd, 5.0), abs(_special(rnd, 2.0)), _special(rnd, 0.5),
                 rnd.choice([0.0, 1.0, -2.0, 700.0, 720.0, math.nan, math.inf, -math.inf,
                             _special(rnd, 1.0)]),
                 _special(rnd, 1.0), rnd.choice([0.0, 3.0, 25.0, math.nan])]
        tables = StreamTable(), StreamTable()
        for tb in tables:
            tb._rows = {"a": list(state), "b": list(state)}
        m = rnd.randint(1, 6)
        keys = [rnd.choice("abc") for _ in range(m)]
        ts = [100.0 + rnd.choice([1.0, 0.0, -5.0, 1e-7, 1e6, math.nan, math.inf,
                                  _special(rnd, 10.0)]) for _ in range(m)]
        xs = [rnd.choice([state[3], _special(rnd, 5.0)]) for _ in range(m)]
        box = gate_box if trial % 2 else None
        (got, err), (want, want_err) = _both(tables, keys, ts, xs, box)
        assert err == want_err, trial
        raised += err is not None
        assert _bits(got) == _bits(want), trial
        assert _bits(tables[0]._rows) == _bits(tables[1]._rows), trial
    assert 0 < raised < 300


def test_readings_it_leaves_to_python_give_the_python_results() -> None:
    """Ints, a float subclass, bools and a state with ints or a wrong length are left to the
    Python loop from that reading on: the same values and types as Python alone."""

    class F(float):
        pass

    steady = [40.0, 39.0, 10.0, 1.0, 1.0, 1.0, 0.01, 0.0, 0.0, 0.0, 0.0]
    cases: list[tuple[dict[str, list[Any]], list[Any], list[Any]]] = [
        ({"a": list(steady)}, [11.0, 12, 13.0], [1.0, 2.0, 3]),
        ({"a": list(steady)}, [11.0, F(12.0), 13.0], [1.0, 2.0, True]),
        ({"a": [40, *steady[1:]]}, [11.0, 12.0], [1.0, 2.0]),
        ({"a": list(steady), "b": [1.0] * 10}, [11.0, 12.0, 13.0], [1.0, 2.0, 3.0]),
    ]
    for rows, ts, xs in cases:
        keys = ["a", "a", "b"][:len(ts)]
        tables = StreamTable(), StreamTable()
        for tb in tables:
            tb._rows = {k: list(v) for k, v in rows.items()}
        (got, err), (want, want_err) = _both(tables, keys, ts, xs, None)
        assert err == want_err
        assert _bits(got) == _bits(want)
        assert _bits(tables[0]._rows) == _bits(tables[1]._rows)
    assert KERNEL is not None
    table = {"a": list(steady)}
    assert KERNEL(table, ["a", "a"], [11.0, 12], [1.0, 2.0], None, [], []) == 1
    assert table["a"][0] == 41.0  # the first reading went through C


def test_a_state_held_elsewhere_is_not_changed() -> None:
    """The kernel stores a new state list, as the Python loop does: a list someone else
    holds keeps its values, and the results are the same."""
    steady = [40.0, 39.0, 10.0, 1.0, 1.0, 1.0, 0.01, 0.0, 0.0, 0.0, 0.0]
    table, ref = StreamTable(), StreamTable()
    for tb in (table, ref):
        tb._rows = {"a": list(steady), "b": list(steady)}
    held = table._rows["a"]
    (got, _), (want, _) = _both((table, ref), ["a", "b", "a", "b"], [11.0, 11.0, 12.0, 12.0],
                                [1.5, 1.5, 2.0, 2.0], None)
    assert held == steady and table._rows["a"] is not held and table._rows["a"][0] == 42.0
    assert _bits(got) == _bits(want) and _bits(table._rows) == _bits(ref._rows)


def test_unequal_lengths_raise_after_the_same_readings() -> None:
    for extra in ([1.0], []):
        tables = StreamTable(), StreamTable()
        (_, err), (_, want_err) = _both(tables, ["a", "b"], [1.0, 2.0] + extra, [1.0], None)
        assert err is not None and want_err is not None and err[0] is want_err[0] is ValueError
        assert _bits(tables[0]._rows) == _bits(tables[1]._rows) and len(tables[0]) == 1


def test_bad_arguments_raise_type_errors() -> None:
    from rapidmq_edge.intelligence import _streamstep  # type: ignore[attr-defined]

    assert KERNEL is not None
    ok: list[Any] = [{}, ["a"], [1.0], [1.0], None, [], []]
    for j, bad in [(0, []), (1, 5), (2, None), (3, 1.0), (5, ()), (6, None)]:
        args = list(ok)
        args[j] = bad
        with pytest.raises(TypeError):
            KERNEL(*args)
    with pytest.raises(TypeError):
        KERNEL(*ok[:6])
    with pytest.raises(TypeError):  # an unhashable key, as dict.get raises
        KERNEL({}, [["a"]], [1.0], [1.0], None, [], [])

    class BadBox:
        fast = (1.0,) * 15
        steady_in = True

    with pytest.raises(TypeError):
        KERNEL({}, ["a"], [1.0], [1.0], BadBox(), [], [])
    for bad_conf in [((1.0,) * 12, streams._scalar_step, _ZERO),
                     ((1.0,) * 13, None, _ZERO), ((1.0,) * 13, streams._scalar_step, [0.0])]:
        with pytest.raises(TypeError):
            _streamstep.configure(*bad_conf)
    KERNEL(ok[0], *ok[1:])  # still configured: the bad calls changed nothing
    assert ok[0]["a"][0] == 1.0


def test_forced_python_path_runs_the_loop(python_loop: None) -> None:
    """``_KERNEL = None`` (what ``RAPIDMQ_EDGE_PURE_PYTHON=1`` gives) runs the Python loop."""
    assert streams._KERNEL is None
    table = StreamTable()
    pos, rows = table.update_outside(["a", "a"], [1.0, 2.0], [3.0, 3.0], None)
    assert pos == [0, 1] and rows[1][6] == 1.0 and table._rows["a"][0] == 2.0
