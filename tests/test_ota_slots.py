"""A/B slots on real files: install never touches the active slot, promote and rollback,
kill -9 at every step of install and promote (a subprocess exiting hard at an exact point,
and SIGKILL at random moments) leaves one complete slot active; the crash-loop guard; a real
gateway process uses the active slot at start, rolls back a crash loop of kill -9 restarts
and a slot that fails validation at start."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rapidmq_edge.ota.activate import load_active_models
from rapidmq_edge.ota.slots import ModelInfo, SlotError, SlotStore

from .gateway_proc import GatewayProcess
from .ota_model_helpers import constant_model, copy_shipped, digest, info_for, vectors

ROOT = Path(__file__).resolve().parent.parent


def _models(tmp: Path) -> tuple[Path, Path, Path]:
    """Three distinct valid priority models: the shipped one and two constant ones."""
    a = copy_shipped("priority", tmp / "src" / "same.onnx")
    b = constant_model(tmp / "src" / "bulk.onnx", 82, 4, 3)
    c = constant_model(tmp / "src" / "normal.onnx", 82, 4, 2)
    return a, b, c


def _consistent(store: SlotStore, component: str = "priority") -> None:
    """Every slot active.json names is complete: its model's bytes are its info's."""
    st = store.state(component)
    for slot in {st.active, st.previous, st.candidate} - {None}:
        assert slot is not None
        info = store.info(component, slot)
        assert digest(store.model_path(component, slot)) == info.digest, (slot, st)


def test_install_promote_rollback(tmp_path: Path) -> None:
    a, b, c = _models(tmp_path)
    store = SlotStore(tmp_path / "data")
    assert store.active("priority") is None and store.state("priority").state == "shipped"
    assert store.install("priority", a, info_for(a, 1, "1.0.1"), b"envelope-1") == "a"
    assert store.active("priority") is None  # installed, not active
    assert store.state("priority").candidate == "a"
    assert store.manifest("priority", "a") == b"envelope-1"
    assert store.promote("priority") == "a"
    assert store.active("priority") == store.model_path("priority", "a")
    # the next install goes to b, never over the active a
    before = digest(store.model_path("priority", "a"))
    assert store.install("priority", b, info_for(b, 2, "2.0.0")) == "b"
    assert digest(store.model_path("priority", "a")) == before
    store.set_state("priority", "shadow")
    assert store.promote("priority") == "b"
    st = store.state("priority")
    assert (st.active, st.previous, st.state, st.healthy) == ("b", "a", "active", False)
    # a third install replaces the previous slot (a), still never the active b
    assert store.install("priority", c, info_for(c, 3, "3.0.0")) == "a"
    st = store.state("priority")
    assert (st.active, st.previous, st.candidate) == ("b", None, "a")
    store.set_state("priority", "rejected", "shadow: agreement 0.25 < 0.98")
    with pytest.raises(SlotError, match="nothing to promote"):
        store.promote("priority")
    assert store.state("priority").reason.startswith("shadow: agreement")
    # rollback: to the previous slot if there is one, else the shipped model
    assert store.rollback("priority", "operator") is None
    st = store.state("priority")
    assert (st.active, st.state, st.reason) == (None, "rolled-back", "operator")
    assert store.active("priority") is None
    with pytest.raises(SlotError, match="shipped model is active"):
        store.rollback("priority", "again")
    # a file that is not what the manifest names is refused before any slot changes
    with pytest.raises(SlotError, match="not the model the manifest names"):
        store.install("priority", a, info_for(b, 4, "4.0.0"))
    assert store.state("priority").state == "rolled-back"
    _consistent(store)


def test_rollback_goes_to_the_previous_slot(tmp_path: Path) -> None:
    a, b, _ = _models(tmp_path)
    store = SlotStore(tmp_path / "data")
    store.install("priority", a, info_for(a, 1, "1"))
    store.promote("priority")
    store.install("priority", b, info_for(b, 2, "2"))
    store.promote("priority")
    assert store.rollback("priority", "bad") == "a"
    st = store.state("priority")
    assert (st.active, st.previous, st.state) == ("a", None, "rolled-back")
    assert store.info("priority", "a").version == "1"


# -- kill -9 at every step ------------------------------------------------------------

RUNNER = textwrap.dedent("""
    import sys, json
    from pathlib import Path
    from rapidmq_edge.ota.slots import SlotStore, ModelInfo
    data, op, model, info = sys.argv[1:5]
    store = SlotStore(Path(data))
    if op == "install":
        store.install("priority", Path(model), ModelInfo(**json.loads(info)), b"env")
    elif op == "promote":
        store.promote("priority")
    else:  # cycle: install and promote the two models in turn until killed
        models = json.loads(model)
        i = 0
        while True:
            m = models[i % 2]
            store.install("priority", Path(m["path"]), ModelInfo(**m["info"]), b"env")
            store.promote("priority")
            i += 1
""")


def _run(data: Path, op: str, model: Path | str = "", info: ModelInfo | None = None,
         crash_at: str | None = None) -> int:
    env = dict(os.environ)
    env.pop("RMQE_OTA_CRASH_AT", None)
    if crash_at:
        env["RMQE_OTA_CRASH_AT"] = crash_at
    doc = json.dumps(info.__dict__) if info is not None else "{}"
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(data), op, str(model), doc],
                          env=env, cwd=ROOT, timeout=30, capture_output=True)
    return proc.returncode


@pytest.mark.parametrize("point", ["install-copied", "install-released", "install-moved-old",
                                   "install-renamed", "promote-before", "promote-after"])
def test_kill_during_install_or_promote_leaves_a_consistent_active_slot(
        tmp_path: Path, point: str) -> None:
    a, b, c = _models(tmp_path)
    data = tmp_path / "data"
    store = SlotStore(data)
    store.install("priority", a, info_for(a, 1, "1"))
    store.promote("priority")
    store.install("priority", b, info_for(b, 2, "2"))
    store.promote("priority")  # active b, previous a: the next install replaces a
    if point.startswith("install"):
        assert _run(data, "install", c, info_for(c, 3, "3"), crash_at=point) == 137
        st = store.state("priority")
        assert st.active == "b" and st.candidate is None  # the active slot is untouched
        assert digest(store.model_path("priority", "b")) == digest(b)
        assert st.previous == ("a" if point == "install-copied" else None)
        _consistent(store)
        # the interrupted install is simply done again
        assert _run(data, "install", c, info_for(c, 3, "3")) == 0
    else:
        assert _run(data, "install", c, info_for(c, 3, "3")) == 0
        assert _run(data, "promote", crash_at=point) == 137
        st = store.state("priority")
        assert st.active == ("a" if point == "promote-after" else "b")
        _consistent(store)
        if point == "promote-after":
            assert digest(store.model_path("priority", "a")) == digest(c)
            return
    assert _run(data, "promote") == 0
    assert store.state("priority").active == "a"
    assert digest(store.active("priority") or Path()) == digest(c)
    _consistent(store)


def test_sigkill_at_random_moments_of_install_promote_cycles(tmp_path: Path) -> None:
    a, b, _ = _models(tmp_path)
    data = tmp_path / "data"
    store = SlotStore(data)
    models = json.dumps([{"path": str(p), "info": info_for(p, i, str(i)).__dict__}
                         for i, p in enumerate((a, b), 1)])
    rng = random.Random(14)
    seen = set()
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(data), "cycle", models, ""],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            # until the cycle has really begun (a promotion on disk), then a random moment
            deadline = time.monotonic() + 15
            start = store.state("priority").changed if (data / "ota").exists() else 0.0
            while time.monotonic() < deadline and proc.poll() is None:
                if (data / "ota").exists() and store.state("priority").changed > start:
                    break
                time.sleep(0.01)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=5)
            if proc.stderr is not None:
                proc.stderr.close()
        st = store.state("priority")
        seen.add(st.state)
        assert st.active in ("a", "b")
        _consistent(store)
        assert digest(store.active("priority") or Path()) in (digest(a), digest(b))
    assert seen & {"active", "installing", "installed"}, seen


# -- the crash-loop guard -----------------------------------------------------------


def test_crash_loop_rolls_back_after_n_unhealthy_starts(tmp_path: Path) -> None:
    a, b, _ = _models(tmp_path)
    now = [1000.0]
    store = SlotStore(tmp_path / "data", clock=lambda: now[0])
    store.install("priority", a, info_for(a, 1, "1"))
    store.promote("priority")
    store.mark_healthy()  # slot a ran fine
    store.install("priority", b, info_for(b, 2, "2"))
    store.promote("priority")
    for _ in range(3):  # three starts that never became healthy
        assert store.record_start(max_starts=3, window_s=300) == {}
        now[0] += 20
    rolled = store.record_start(max_starts=3, window_s=300)
    assert list(rolled) == ["priority"] and "crash loop: 3 starts within 300 s" in \
        rolled["priority"]
    st = store.state("priority")
    assert (st.active, st.state) == ("a", "rolled-back") and "crash loop" in st.reason
    assert store.record_start(3, 300) == {}  # the previous slot is trusted (it was healthy)


def test_healthy_period_and_old_starts_do_not_count(tmp_path: Path) -> None:
    a, _, _ = _models(tmp_path)
    now = [1000.0]
    store = SlotStore(tmp_path / "data", clock=lambda: now[0])
    store.install("priority", a, info_for(a, 1, "1"))
    store.promote("priority")
    for _ in range(2):
        store.record_start(3, 300)
    assert store.mark_healthy() == ["priority"]
    for _ in range(5):  # healthy: later starts are not counted
        assert store.record_start(3, 300) == {}
    assert store.state("priority").active == "a"
    store.install("priority", a, info_for(a, 2, "2"))
    store.promote("priority")
    for _ in range(8):  # unhealthy starts, but spread wider than the window
        assert store.record_start(3, 300) == {}
        now[0] += 120
    assert store.state("priority").active == "b"


# -- a real gateway process --------------------------------------------------------


def _gateway(tmp: Path) -> GatewayProcess:
    return GatewayProcess(tmp, {"intelligence": {"enabled": True, "priority": "off",
                                                 "anomaly": "off"}})


def _install_active(data: Path, version: str) -> SlotStore:
    """The shipped threat model installed (as ``version``) and promoted in slot a."""
    src = copy_shipped("threat", data.parent / "candidate" / "threat.onnx")
    store = SlotStore(data)
    store.install("threat", src, ModelInfo(7, version, digest(src), src.stat().st_size,
                                           vectors("threat")))
    store.promote("threat")
    return store


def _wait_log(gw: GatewayProcess, text: str, after: int = 0, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = gw.log()[after:]
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{gw.log()[after:]}")


def test_gateway_uses_the_active_slot_and_rolls_back_a_crash_loop(tmp_path: Path) -> None:
    gw = _gateway(tmp_path)
    store = _install_active(gw.data_dir, "7.0.0-ota")
    try:
        for n in range(3):  # three starts killed -9 before their healthy period
            mark = len(gw.log())
            gw.start()
            _wait_log(gw, "threat model 7.0.0-ota+", mark)
            assert len(store.state("threat").starts) == n + 1
            gw.kill()
        mark = len(gw.log())
        gw.start()  # the fourth start rolls back to the shipped model
        log = _wait_log(gw, "threat model 1.0.0+", mark)
        assert "rolled back from slot a to the shipped model: crash loop" in log
        st = store.state("threat")
        assert (st.active, st.state) == (None, "rolled-back") and "crash loop: 3 starts" in \
            st.reason
    finally:
        gw.stop()
    # the rolled-back start counts nothing more: a restart keeps the shipped model
    assert load_active_models(gw.data_dir, ["threat"]).scorers == {}


def test_gateway_rolls_back_a_slot_that_fails_validation_at_start(tmp_path: Path) -> None:
    gw = _gateway(tmp_path)
    store = _install_active(gw.data_dir, "7.0.0-ota")
    path = store.model_path("threat", "a")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # the slot's file damaged on disk
    path.write_bytes(bytes(raw))
    try:
        gw.start()
        log = _wait_log(gw, "threat model 1.0.0+")
        assert "failed validation at start: digest:" in log
        st = store.state("threat")
        assert st.active is None and st.state == "rolled-back" and "digest" in st.reason
    finally:
        gw.stop()


def test_model_cli_list_and_rollback_while_stopped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = tmp_path / "gw.toml"
    config.write_text(f'[gateway]\ndata_dir = "{data}"\n')

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rapidmq_edge", "model", *args,
                               "--config", str(config)], capture_output=True, text=True,
                              timeout=30, cwd=ROOT)

    out = cli("rollback", "threat")
    assert out.returncode == 1 and "shipped model is active" in out.stderr
    store = _install_active(data, "7.0.0-ota")
    rows = {r["component"]: r for r in json.loads(cli("list", "--json").stdout)}
    assert rows["threat"]["source"] == "ota" and rows["threat"]["sequence"] == 7
    assert rows["threat"]["version"].startswith("7.0.0-ota+") and \
        rows["threat"]["previous"] == "shipped"
    assert rows["priority"]["source"] == "shipped" and rows["priority"]["state"] == "shipped"
    # the anomaly detector's classifier runs too: listed, with why it has no slot
    assert rows["anomaly"]["source"] == "shipped" and "over the air" in rows["anomaly"]["reason"]
    out = cli("rollback", "threat")
    assert out.returncode == 0 and "not running" in out.stderr, out.stderr
    st = store.state("threat")
    assert st.active is None and st.reason.startswith("operator")
    text = cli("list").stdout
    assert "rolled-back" in text and "threat: rolled-back: operator" in text
