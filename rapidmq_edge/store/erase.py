"""Deleting rows so that their bytes are gone from the file: ``secure_delete`` (freed
content overwritten with zeros), the deletes in one transaction, then a WAL checkpoint
(TRUNCATE), ``VACUUM`` (the file rebuilt without free pages) and a second checkpoint, so
neither the database nor its ``-wal`` file keeps a copy.

:func:`scrub` opens the file itself (a store the gateway does not hold open, or a stopped
gateway's); :func:`scrub_live` does the same on a running store's own connection, in its
writer thread between two of its group commits, and says how long it held the writer (the
pause of that store's write path)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["LiveStore", "Scrubbed", "scrub", "scrub_live"]

#: checkpoint attempts while a reader of the store holds the WAL (then it is left to the
#: store's next checkpoint and reported)
_CHECKPOINT_TRIES = 50


class LiveStore(Protocol):
    """What :func:`scrub_live` uses of a running store (``SessionStore``, ``ForwardQueue``):
    its connection, the lock its writer holds while writing, its one writer thread."""

    _db: sqlite3.Connection
    _lock: threading.Lock
    _writer: ThreadPoolExecutor


def scrub(path: Path, deletes: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
    """Run ``deletes`` (SQL, parameters) on ``path`` and compact it; rows deleted by each.

    Statements on tables the file does not have count 0 (an older or unused store)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA secure_delete=ON")
        counts = _delete(db, deletes)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return counts
    finally:
        db.close()


def _delete(db: sqlite3.Connection, deletes: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
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
        if db.in_transaction:  # SQLite may have rolled back (disk full)
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return counts


def _truncate_wal(db: sqlite3.Connection) -> bool:
    """Checkpoint and empty the WAL; False when a reader kept it (tried a while)."""
    for _ in range(_CHECKPOINT_TRIES):
        busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy is None or not busy[0]:
            return True
        time.sleep(0.002)
    return False


@dataclass(slots=True)
class Scrubbed:
    """What :func:`scrub_live` did."""

    counts: list[int]  # rows deleted by each statement
    held: float  # seconds the store's writer was held (its commits waited as long)
    wal_emptied: bool  # False: a reader kept the WAL (emptied at its next checkpoint)
    vacuumed: bool  # False: the file was larger than ``vacuum_max_bytes``
    size: int  # bytes of the database file before


def _scrub_held(store: LiveStore, deletes: Sequence[tuple[str, Sequence[Any]]],
                path: Path, vacuum_max_bytes: int | None) -> Scrubbed:
    """In the store's writer thread: the deletes and the compaction, the writer held."""
    with store._lock:
        held = time.perf_counter()
        db = store._db
        before = db.execute("PRAGMA secure_delete").fetchone()[0]
        db.execute("PRAGMA secure_delete=ON")
        try:
            counts = _delete(db, deletes)
            clean = _truncate_wal(db)
            size = path.stat().st_size
            vacuum = vacuum_max_bytes is None or size <= vacuum_max_bytes
            if vacuum:
                db.execute("VACUUM")
                clean = _truncate_wal(db) and clean
        finally:
            db.execute(f"PRAGMA secure_delete={int(before)}")
        return Scrubbed(counts, time.perf_counter() - held, clean, vacuum, size)


async def scrub_live(store: LiveStore, path: Path,
                     deletes: Sequence[tuple[str, Sequence[Any]]],
                     vacuum_max_bytes: int | None = None) -> Scrubbed:
    """:func:`scrub` on a running store (its file ``path``), off the event loop, in its one
    writer thread: its group commits wait meanwhile, as long as :attr:`Scrubbed.held`.

    The deletes run with ``secure_delete`` (their content, overflow pages included, is
    zeroed in place) and the WAL is checkpointed empty: the bytes are gone from the files
    without a ``VACUUM``. ``VACUUM`` (which rewrites the file: the pause grows with its
    size) also gives the free pages back when the file is at most ``vacuum_max_bytes``
    (None: always)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(store._writer, _scrub_held, store, deletes, path,
                                      vacuum_max_bytes)
