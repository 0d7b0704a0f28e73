"""Shared handling of damaged SQLite files: recognise the damage, move the file aside."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

#: primary SQLite result codes meaning "the file is damaged": SQLITE_CORRUPT, SQLITE_NOTADB
_CORRUPT_CODES = (11, 26)


def is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """True when ``exc`` says the database file is damaged (not: locked, I/O, full)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _CORRUPT_CODES
    return type(exc) is sqlite3.DatabaseError


def move_aside(path: Path) -> Path:
    """Rename a damaged database and its -wal/-shm/-journal to ``<name>.corrupt-<UTC>``.

    Never deletes anything; returns the new path of the database file.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    path.rename(target)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    return target
