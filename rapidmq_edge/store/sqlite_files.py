"""What both stores do with their SQLite files: open them in WAL mode at a durability level,
check them, recognise damage and move a damaged file aside (never delete it)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
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


def connect(path: Path) -> sqlite3.Connection:
    """A connection usable from the store's writer thread (transactions are explicit)."""
    return sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)


#: the WAL is cut back to this size when a checkpoint resets it (bytes; SQLite keeps the
#: largest size it ever reached otherwise)
WAL_SIZE_LIMIT = 4 << 20


def prepare(db: sqlite3.Connection, durability: str, schema: str) -> None:
    """Open a store's database the way docs/durability.md describes, check it and create
    its tables; raises DatabaseError when the file is damaged.

    * ``journal_mode=WAL``: readers never block the writer; a commit appends to the WAL.
    * ``synchronous=FULL`` (``fsync``: every commit is on disk before it is acknowledged)
      or ``NORMAL`` (``normal``: a power cut may lose the last commits, a crash does not).
    * ``secure_delete=FAST``: a delete does not overwrite the freed pages (Debian builds
      SQLite with ``secure_delete`` on, which writes every deleted page again: a drain of
      10 MB wrote 10 MB of WAL, and on a full disk no delete could commit).
    * ``journal_size_limit``: :data:`WAL_SIZE_LIMIT`, so a burst does not keep its WAL size.
    """
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=" + ("FULL" if durability == "fsync" else "NORMAL"))
    db.execute("PRAGMA secure_delete=FAST")
    db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    problems = [r[0] for r in db.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise sqlite3.DatabaseError("; ".join(map(str, problems)).replace("\n", "; "))
    db.executescript(schema)


def open_or_move_aside(
    path: Path, prepare_db: Callable[[sqlite3.Connection], None],
    moved: Callable[[BaseException], Path],
) -> tuple[sqlite3.Connection, Path | None]:
    """Open ``path`` and ``prepare_db`` it. A damaged file is moved aside by ``moved(exc)``
    (which says where it went, and logs) and an empty database is prepared in its place.
    Returns the connection and where the damaged file went (None: it was fine)."""
    db = connect(path)
    try:
        prepare_db(db)
        return db, None
    except sqlite3.DatabaseError as exc:
        if not is_corrupt(exc):
            db.close()
            raise
        target = moved(exc)
    db.close()  # only after the move: SQLite deletes a WAL it cannot use when closing
    db = connect(path)
    try:
        prepare_db(db)
    except BaseException:
        db.close()
        raise
    return db, target
