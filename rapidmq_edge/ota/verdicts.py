"""Operator verdicts on incidents, durable on the gateway until uploaded.

``<data_dir>/ota/ota.sqlite`` (the OTA database; WAL, ``synchronous=FULL``), two tables:
``feedback_incidents`` (the incidents the gateway announced: id, stream, kind, opened and
closed time; the newest ``keep`` are kept) and ``feedback_verdicts`` (one per incident: the
latest verdict, its note, who gave it, when, and whether the feedback channel has it:
``sent``). Thread-safe (one connection under a lock): the HTTP handler and the uploader
call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .feedback import VERDICTS
from .sequences import DB_NAME

__all__ = ["MAX_NOTE", "VerdictStore"]

#: characters of a verdict's note
MAX_NOTE = 2000


class VerdictStore:
    """See the module docstring."""

    def __init__(self, path: Path, keep: int = 100_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS feedback_incidents (incident TEXT PRIMARY KEY, "
            "stream TEXT, kind TEXT, opened_at REAL, closed_at REAL, doc TEXT NOT NULL, "
            "saved_at REAL NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS feedback_verdicts (incident TEXT PRIMARY KEY, "
            "verdict TEXT NOT NULL, note TEXT NOT NULL, by TEXT NOT NULL, at REAL NOT NULL, "
            "doc TEXT NOT NULL, sent INTEGER NOT NULL DEFAULT 0)")

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> VerdictStore:
        """The store in ``<data_dir>/ota/ota.sqlite``."""
        return cls(Path(data_dir) / "ota" / DB_NAME)

    def remember(self, incidents: Iterable[dict[str, Any]]) -> int:
        """Keep announced incidents (newer data for an id replaces the older)."""
        rows = [(d["incident"], d.get("stream"), d.get("kind"), d.get("opened_at"),
                 d.get("closed_at"), json.dumps(d, separators=(",", ":")), time.time())
                for d in incidents]
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO feedback_incidents VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows)
                self._db.execute(
                    "DELETE FROM feedback_incidents WHERE rowid NOT IN (SELECT rowid FROM "
                    "feedback_incidents ORDER BY saved_at DESC LIMIT ?)", (self.keep,))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back (disk full)
                    self._db.execute("ROLLBACK")
                raise
        return len(rows)

    def incident(self, incident: str) -> dict[str, Any] | None:
        """A remembered incident, or None."""
        with self._lock:
            row = self._db.execute("SELECT doc FROM feedback_incidents WHERE incident = ?",
                                   (incident,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def record(self, incident: dict[str, Any], verdict: str, note: str = "",
               by: str = "") -> dict[str, Any]:
        """Store the verdict on ``incident`` (what is known of it) durably; it replaces an
        earlier one and is uploaded again. Returns the stored verdict document."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        if len(note) > MAX_NOTE:
            raise ValueError(f"note longer than {MAX_NOTE} characters")
        doc = {**incident, "verdict": verdict, "note": note, "by": by,
               "at": round(time.time(), 3)}
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO feedback_verdicts VALUES (?, ?, ?, ?, ?, ?, 0)",
                (doc["incident"], verdict, note, by, doc["at"],
                 json.dumps(doc, separators=(",", ":"))))
        return doc

    def pending(self, limit: int = 500) -> list[dict[str, Any]]:
        """Verdicts not uploaded yet (oldest first)."""
        with self._lock:
            rows = self._db.execute("SELECT doc FROM feedback_verdicts WHERE sent = 0 "
                                    "ORDER BY at LIMIT ?", (limit,)).fetchall()
        return [dict(json.loads(r[0])) for r in rows]

    def mark_sent(self, verdicts: Iterable[dict[str, Any]]) -> None:
        """These verdicts are upstream (unless one was replaced since: then it stays due)."""
        with self._lock:
            self._db.executemany(
                "UPDATE feedback_verdicts SET sent = 1 WHERE incident = ? AND at = ?",
                [(v["incident"], v["at"]) for v in verdicts])

    def verdicts(self) -> list[dict[str, Any]]:
        """Every stored verdict with its ``sent`` flag."""
        with self._lock:
            rows = self._db.execute("SELECT doc, sent FROM feedback_verdicts "
                                    "ORDER BY at").fetchall()
        return [{**json.loads(d), "sent": bool(s)} for d, s in rows]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
