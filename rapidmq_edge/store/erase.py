"""Deleting rows so that their bytes are gone from the file: ``secure_delete`` (freed
content overwritten with zeros), the deletes in one transaction, then a WAL checkpoint
(TRUNCATE), ``VACUUM`` (the file rebuilt without free pages) and a second checkpoint, so
neither the database nor its ``-wal`` file keeps a copy. For a store that is not open in
another process (the gateway is stopped)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["scrub"]


def scrub(path: Path, deletes: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
    """Run ``deletes`` (SQL, parameters) on ``path`` and compact it; rows deleted by each.

    Statements on tables the file does not have count 0 (an older or unused store)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA secure_delete=ON")
        counts: list[int] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in deletes:
                try:
                    counts.append(db.execute(sql, tuple(params)).rowcount)
                except sqlite3.OperationalError as exc:
                    if "no such table" not in str(exc) and "no such column" not in str(exc):
                        raise
                    counts.append(0)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return counts
    finally:
        db.close()
