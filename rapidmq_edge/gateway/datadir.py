"""The data directory: one gateway process at a time (an exclusive lock held until exit)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

__all__ = ["DataDirLocked", "lock_data_dir"]


class DataDirLocked(Exception):
    """Another gateway process already uses this data directory."""


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Create ``data_dir`` and hold an exclusive lock on it for the process lifetime."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fh = open(data_dir / "gateway.lock", "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise DataDirLocked(f"{data_dir} is in use by another rapidmq-edge process") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh
