"""The pieces of full-disk handling in process: the reserve and ballast bookkeeping, the
rate-limited log of a repeating problem, and a status file written on a full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rapidmq_edge.ops import status as status_mod
from rapidmq_edge.store.disk import BALLAST_FILE, DiskSpace, is_disk_full
from rapidmq_edge.telemetry import RepeatedLog


def _fs(free: int, total: int = 100 << 20) -> Any:
    return lambda _p: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096,
                                      f_blocks=total // 4096)


def test_reserve_refuses_below_it_and_counts_pending_bytes(tmp_path: Path) -> None:
    disk = DiskSpace(tmp_path, reserve=8 << 20, statvfs=_fs(9 << 20))
    assert not disk.low() and not disk.low(512 << 10)
    assert disk.low((1 << 20) + 4096)  # what is put but not yet committed counts
    assert "kept in reserve" in disk.why()
    assert DiskSpace(tmp_path, reserve=0, statvfs=_fs(0)).low() is False  # 0 = off


def test_ballast_is_written_released_once_and_restored_when_space_is_back(
        tmp_path: Path) -> None:
    free = [64 << 20]
    disk = DiskSpace(tmp_path, reserve=1 << 20, ballast=256 << 10,
                     statvfs=lambda p: _fs(free[0])(p))
    assert disk.restore_ballast() and (tmp_path / BALLAST_FILE).stat().st_size == 256 << 10
    assert not disk.low()
    free[0] = 0
    disk.refresh()
    assert disk.release_ballast() and not (tmp_path / BALLAST_FILE).exists()
    assert not disk.release_ballast()  # only once
    free[0] = 32 << 20  # plenty again, but the ballast is spent: still refusing
    disk.refresh()
    assert disk.low() and "ballast" in disk.why()
    assert disk.restore_ballast() and not disk.low()
    assert disk.snapshot()["ballast_releases"] == 1


def test_ballast_not_written_without_room(tmp_path: Path) -> None:
    disk = DiskSpace(tmp_path, reserve=1 << 20, ballast=1 << 20, statvfs=_fs(2 << 20))
    assert not disk.restore_ballast() and not (tmp_path / BALLAST_FILE).exists()


def test_disk_full_errors_are_recognised() -> None:
    import sqlite3

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    assert is_disk_full(full)
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_repeated_log_writes_once_then_a_count_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rep = RepeatedLog(logging.getLogger("t.repeat"), every=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "t.repeat"):
        for i in range(1000):  # 0.5 s apart for 500 s
            now[0] = i * 0.5
            rep("commit", logging.ERROR, "commit failed (%s)", "disk full")
        rep.clear("commit", "commits succeed again")
        rep.clear("commit", "logged only once")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "commit failed (disk full)"
    assert len(lines) == 1 + 8 + 1  # first, one per minute, the recovery
    assert "120 times in the last 60 s" in lines[1]
    assert lines[-1].startswith("commits succeed again (after 1000 occurrence(s)")


def test_status_on_a_full_disk_is_rewritten_in_place(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "status.json"
    status_mod.write_status(path, {"n": 1, "pad": "x" * 100})
    size = path.stat().st_size
    assert size % 4096 == 0  # padded: a rewrite in place needs no new block
    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if self.suffix == ".tmp":
            real(self, b"")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    status_mod.write_status(path, {"n": 2})
    assert json.loads(path.read_text()) == {"n": 2} and path.stat().st_size == size
    assert not (tmp_path / "status.tmp").exists()  # no 0-byte temp file left behind
    with pytest.raises(OSError):
        status_mod.write_status(path, {"n": 3, "big": "y" * 2 * size})
    assert json.loads(path.read_text()) == {"n": 2}  # the last good one stays
    assert os.path.getsize(path) == size
