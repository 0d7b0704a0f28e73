"""The data directory's disk: the headroom the stores keep so they can always drain.

A SQLite delete needs free space too (WAL frames, and the checkpoint that moves them into
the database), so a queue that filled the disk to the last page can no longer delete what
the upstream acknowledged, and then refuses everything forever. Two guards prevent that:

* the **reserve**: below ``reserve`` free bytes (at most a quarter of the filesystem, so
  a small one still holds messages) the forward queue refuses new messages
  (:meth:`DiskSpace.low`; MQTT 5 PUBACK 0x97, 3.1.1 withheld), so acknowledged deletes,
  checkpoints and the session store always have room;
* the **ballast**: a file of ``ballast`` bytes (``<data_dir>/disk-ballast``) that the
  gateway deletes the moment a commit fails for lack of space anyway (another process
  filled the disk). The space it frees is for the drain: new messages stay refused until
  the ballast could be written again (``reserve + 2 * ballast`` free).

Free space is read with ``os.statvfs`` (about 2 µs) after every commit and by
:meth:`DiskSpace.run` every second, never per message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BALLAST_FILE", "DiskSpace", "is_disk_full"]

log = logging.getLogger(__name__)

BALLAST_FILE = "disk-ballast"
#: SQLITE_FULL: "insertion failed because database is full"
_SQLITE_FULL = 13


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (a failed SQLite commit, a write) means the disk is full."""
    if isinstance(exc, OSError):
        return exc.errno in (28, 122)  # ENOSPC, EDQUOT
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == _SQLITE_FULL
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


class DiskSpace:
    """Free space of ``data_dir``'s filesystem, the reserve and the ballast file."""

    def __init__(self, data_dir: Path, reserve: int = 0, ballast: int = 0,
                 statvfs: Callable[[Path], Any] = os.statvfs) -> None:
        self.data_dir = data_dir
        self.configured_reserve = reserve
        self.reserve = reserve  # effective: at most a quarter of the filesystem
        self.ballast = ballast
        self.ballast_path = data_dir / BALLAST_FILE
        self._statvfs = statvfs
        self.free = 0
        self.total = 0
        self.refreshed = 0.0  # time.monotonic() of the last statvfs
        self.ballast_releases = 0
        self.released = False  # the ballast was used: refuse until it is back
        self.refresh()
        if not ballast and self.ballast_path.exists():  # configured off: give it back
            self.ballast_path.unlink(missing_ok=True)

    def refresh(self) -> int:
        """Read the free space now (what unprivileged processes may use); return it."""
        try:
            st = self._statvfs(self.data_dir)
            self.free, self.total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            self.reserve = min(self.configured_reserve, self.total // 4)
        except OSError:
            pass  # keep the last reading
        self.refreshed = time.monotonic()
        return self.free

    def low(self, pending: int = 0) -> bool:
        """True when ``pending`` more bytes would take free space below the reserve, or
        while the ballast is spent."""
        return self.released or (bool(self.reserve) and self.free - pending < self.reserve)

    def why(self) -> str:
        """Why :meth:`low` refuses, for the refusal's message."""
        if self.released:
            return (f"disk: full (the ballast was used to drain); {self.free} B free, new "
                    f"messages again once {self.reserve + 2 * self.ballast} B are free")
        return f"disk: {self.free} B free, {self.reserve} B kept in reserve to drain the queue"

    @property
    def has_ballast(self) -> bool:
        """True while the ballast file is in place."""
        return self.ballast_path.exists()

    def release_ballast(self) -> bool:
        """Delete the ballast (a commit failed for lack of space); True if it was there."""
        try:
            self.ballast_path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:  # pragma: no cover - e.g. a read-only remount
            log.error("cannot delete the disk ballast %s: %s", self.ballast_path, exc)
            return False
        self.ballast_releases += 1
        self.released = True
        self.refresh()
        log.warning("disk full: deleted the %d-byte ballast %s to make room for deletes; "
                    "it is written again once %d bytes are free", self.ballast,
                    self.ballast_path, self.reserve + 2 * self.ballast)
        return True

    def restore_ballast(self) -> bool:
        """Write the ballast if it is missing and the space is back; True if written."""
        if not self.ballast or self.has_ballast:
            return False
        if self.free < self.reserve + 2 * self.ballast:
            return False
        tmp = self.ballast_path.with_name(BALLAST_FILE + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.ballast)
            finally:
                os.close(fd)
            os.replace(tmp, self.ballast_path)
            self.released = False
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("disk ballast %s not written: %s", self.ballast_path, exc)
            return False
        self.refresh()
        return True

    async def run(self, every: float = 1.0) -> None:
        """Refresh the free space and restore the ballast every ``every`` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            self.refresh()
            if self.ballast and not self.has_ballast and self.free >= (
                    self.reserve + 2 * self.ballast):
                await loop.run_in_executor(None, self.restore_ballast)
            await asyncio.sleep(every)

    def snapshot(self) -> dict[str, Any]:
        """Disk free / total, the reserve, the ballast and whether new messages are refused."""
        return {
            "free_bytes": self.free,
            "total_bytes": self.total,
            "reserve_bytes": self.reserve,
            "ballast_bytes": self.ballast if self.has_ballast else 0,
            "ballast_releases": self.ballast_releases,
            "below_reserve": self.low(),
        }
