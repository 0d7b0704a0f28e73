"""Salvage of a damaged forward-queue file: read every row that can still be read.

The queue moves a damaged file aside (never deletes it) and copies what this module reads
into a fresh database; rows in damaged b-tree pages are skipped by probing for the next
readable id.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Salvaged", "read_salvageable"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Salvaged:
    """What could be read: valid rows, invalid ones skipped, the id sequence, the top id."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    bad: int = 0
    seq: int | None = None  # sqlite_sequence of the table; None when unreadable
    top: int = 0
    state: list[tuple[str, bytes]] = field(default_factory=list)  # the ``state`` table


def read_salvageable(src: Path, columns: str, priorities: tuple[int, ...]) -> Salvaged:
    """Every readable, well-formed row of table ``messages`` in ``src`` (opened read-only)."""
    out = Salvaged()
    try:
        old = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        log.error("forward queue: cannot open %s for salvage (%s)", src, exc)
        return out
    try:
        try:
            row = old.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
            out.seq = int(row[0]) if row else 0
        except (sqlite3.Error, ValueError, TypeError):
            out.seq = None
        try:  # small (open summary windows): all of it or nothing
            out.state = [(k, v) for k, v in old.execute("SELECT key, value FROM state")
                         if isinstance(k, str) and isinstance(v, bytes)]
        except sqlite3.Error as exc:
            log.error("forward queue: the state table of %s is unreadable (%s)", src, exc)
        last = resumed = 0
        while True:
            try:
                for r in old.execute(
                    f"SELECT {columns} FROM messages WHERE id > ? ORDER BY id", (last,)
                ):
                    last = r[0] if isinstance(r[0], int) else last + 1
                    if _valid_row(r, priorities):
                        out.rows.append(r)
                        out.top = max(out.top, r[0])
                    else:
                        out.bad += 1
                break
            except sqlite3.Error:
                nxt = _next_readable(old, max(last, resumed), out.seq)
                if nxt is None:
                    break
                last = resumed = nxt
    finally:
        old.close()
    return out


def _valid_row(r: tuple[Any, ...], priorities: tuple[int, ...]) -> bool:
    return (
        len(r) == 10 and isinstance(r[0], int) and isinstance(r[1], str)
        and r[2] in priorities and isinstance(r[3], str) and isinstance(r[4], bytes)
        and r[5] in (0, 1, 2) and isinstance(r[6], bytes) and isinstance(r[7], float)
        and (r[8] is None or isinstance(r[8], float)) and isinstance(r[9], int)
    )


def _next_readable(db: sqlite3.Connection, last: int, seq: int | None) -> int | None:
    """Find a start id past ``last`` from which the table can be read again (skipping a
    damaged b-tree page); None when nothing further is readable."""

    def ok(start: int) -> bool:
        try:
            db.execute("SELECT id FROM messages WHERE id > ? ORDER BY id LIMIT 1",
                       (start,)).fetchone()
            return True
        except sqlite3.Error:
            return False

    step, bound = 1, max(seq or 0, last) + (1 << 20)
    while not ok(last + step):
        if last + step > bound:
            return None
        step *= 2
    lo, hi = last + step // 2, last + step  # ok(hi); find the smallest ok start
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
