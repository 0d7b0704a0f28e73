"""A running gateway follows its users file (``user add/remove`` need no restart) and
re-reads it on SIGHUP instead of dying of it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rapidmq_edge.security.users import add_user, remove_user
from rapidmq_edge.security.users_live import LiveUsers

from .gateway_proc import GatewayProcess
from .mqtt_helpers import RawClient, unique, wait_until
from .test_forward_queue import Clock

pytestmark = pytest.mark.timeout(60)


def test_changes_are_seen_at_most_once_a_second(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "users.toml"
    add_user(path, "alice", "pw-a")
    clock = Clock()
    live = LiveUsers(path, every=1.0, clock=clock)
    add_user(path, "bob", "pw-b")
    assert "bob" not in live.current()  # looked at less than a second ago
    clock.t += 1.0
    assert "bob" in live.current() and "alice" in live.current()
    remove_user(path, "alice")
    assert "alice" in live.current()
    assert "alice" not in live.current(force=True)  # SIGHUP: at once
    db = live.current()
    assert live.current(force=True) is db  # unchanged file: not read again
    caplog.set_level(logging.INFO, "rapidmq_edge.security.users_live")
    path.write_text("[users\n")  # edited by hand, broken
    for _ in range(3):
        clock.t += 1.0
        assert live.current() is db  # the users read before stay in force
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "keeping the 1 user(s)" in errors[0].getMessage()
    path.unlink()
    add_user(path, "carol", "pw-c")
    assert live.current(force=True).names() == ["carol"]


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rapidmq_edge", *args], input=b"pw-new\n",
                   check=True, capture_output=True, timeout=30)


def _code(port: int, user: str, password: str) -> int:
    with RawClient(port) as raw:
        return raw.connect(unique("live"), username=user, password=password)[1]


def test_running_gateway_follows_user_add_remove_and_sighup(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    add_user(users, "alice", "pw-a")
    gw = GatewayProcess(tmp_path, {"auth": {"allow_anonymous": False,
                                            "users_file": str(users)}}).start()
    try:
        assert _code(gw.port, "alice", "pw-a") == 0
        assert _code(gw.port, "bob", "pw-new") == 4  # 3.1.1: bad user name or password
        _cli("user", "add", "bob", "--users-file", str(users), "--password-stdin")
        assert wait_until(lambda: _code(gw.port, "bob", "pw-new") == 0, timeout=5)
        _cli("user", "remove", "alice", "--users-file", str(users))
        assert wait_until(lambda: _code(gw.port, "alice", "pw-a") == 4, timeout=5)
        assert gw.proc is not None
        users.write_text("[users\n")  # broken by hand: SIGHUP keeps what was read
        os.kill(gw.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: "keeping the 1 user(s)" in gw.log(), timeout=5)
        assert gw.proc.poll() is None  # SIGHUP's default action would have ended it
        assert _code(gw.port, "bob", "pw-new") == 0
        add_user(users.with_name("fixed.toml"), "dave", "pw-d")
        users.with_name("fixed.toml").replace(users)
        os.kill(gw.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: "1 user(s) in force" in gw.log(), timeout=5)
        assert _code(gw.port, "dave", "pw-d") == 0 and _code(gw.port, "bob", "pw-new") == 4
    finally:
        gw.stop()
