"""``rapidmq-edge status`` tells the truth: running or not from the data directory's lock
(never from the age of a file alone), and an exit code scripts and health checks can use
(0 running, 1 running but its status is stale, 3 not running)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rapidmq_edge.ops.status import assess, lock_holder, render

from .gateway_proc import GatewayProcess


def _status(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rapidmq_edge", "status", "--data-dir", str(data_dir), *extra],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def _wait_status_file(gw: GatewayProcess) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (gw.data_dir / "status.json").exists():
        time.sleep(0.05)


def test_running_then_stopped(gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory()
    _wait_status_file(gw)
    assert gw.proc is not None
    res = _status(gw.data_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"running (pid {gw.proc.pid}); figures from " in res.stdout  # the snapshot's age
    doc = json.loads(_status(gw.data_dir, "--json").stdout)
    assert doc["check"]["state"] == "running" and doc["check"]["pid"] == gw.proc.pid
    assert doc["disk"]["free_bytes"] > 0 and doc["process"]["rss_bytes"] > 0
    gw.stop()
    res = _status(gw.data_dir)  # at once, not ~20 s later
    assert res.returncode == 3, res.stdout
    assert "NOT RUNNING (no process holds the data directory lock)" in res.stdout
    assert json.loads(_status(gw.data_dir, "--json").stdout)["check"]["state"] == "not running"


def test_a_held_lock_with_an_old_status_is_stale(tmp_path: Path) -> None:
    """The lock is held (a gateway that cannot write its status: a full disk) but the
    file is old: exit 1 and say so."""
    (tmp_path / "status.json").write_text(json.dumps(
        {"gateway": "gw", "pid": os.getpid(), "written_at": time.time() - 120, "interval": 5,
         "broker": {}}))
    with open(tmp_path / "gateway.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert lock_holder(tmp_path) == os.getpid()
        res = _status(tmp_path)
    assert res.returncode == 1, res.stdout
    assert f"RUNNING (pid {os.getpid()}), but its status was last written 2 min ago" \
        in res.stdout
    assert lock_holder(tmp_path) is None  # released with the file


def test_no_data_dir_is_not_running(tmp_path: Path) -> None:
    res = _status(tmp_path / "nothing-here")
    assert res.returncode == 3 and "NOT RUNNING" in res.stdout


def test_lock_holder_reads_proc_locks_without_taking_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "gateway.lock"
    lock.write_text("")
    st = lock.stat()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    table = tmp_path / "locks"
    table.write_text(
        f"1: POSIX  ADVISORY  READ 11 {dev}:{st.st_ino} 128 128\n"
        f"2: FLOCK  ADVISORY  WRITE 4242 {dev}:{st.st_ino + 1} 0 EOF\n"
        f"3: FLOCK  ADVISORY  WRITE 4243 {dev}:{st.st_ino} 0 EOF\n")
    assert lock_holder(tmp_path, table) == 4243
    table.write_text(f"2: FLOCK  ADVISORY  WRITE 4242 {dev}:{st.st_ino + 1} 0 EOF\n")
    assert lock_holder(tmp_path, table) is None


def test_assess_states() -> None:
    now = 1000.0
    fresh = {"pid": 7, "written_at": 999.0, "interval": 5}
    assert assess(7, fresh, now).state == "running" and assess(7, fresh, now).exit_code == 0
    assert assess(None, fresh, now).state == "not running"
    assert assess(None, fresh, now).exit_code == 3
    assert assess(7, None, now).state == "stale"
    other = assess(8, fresh, now)
    assert other.state == "stale" and "pid 7" in other.why and other.exit_code == 1
    assert assess(7, {**fresh, "written_at": 900.0}, now).state == "stale"


def test_render_says_when_an_upstream_last_acknowledged() -> None:
    up = {"current_url": "mqtt://u:1883", "connected": True, "last_heartbeat": None,
          "last_puback": None, "queued": 0, "oldest_age": 0, "inflight": 0, "acked": 0}
    doc = {"gateway": "gw", "written_at": 1000.0, "broker": {},
           "forwarding": {"queued": 0, "queued_bytes": 0, "drops": {}, "upstreams": {"c": up}}}
    assert "no heartbeat yet; last PUBACK never\n" in render(doc, now=1001.0)
    up["last_puback"] = 990.0
    assert "; last PUBACK 11 s ago\n" in render(doc, now=1001.0)
