"""Where verified messages go: a JSONL file or a SQLite database (ids deduplicated in both)."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from pathlib import Path
from typing import IO, Protocol

from .verify import Verified

__all__ = ["JsonlSink", "Sink", "SqliteSink", "open_sink", "record"]


def record(v: Verified) -> dict[str, object]:
    """JSON form: text payloads as ``payload``, others base64 in ``payload_b64``."""
    out: dict[str, object] = {
        "id": v.message_id, "gateway": v.gateway_id, "topic": v.topic, "batch": v.batch,
        "encrypted": v.encrypted, "device_e2e": v.device_e2e,
    }
    try:
        out["payload"] = v.payload.decode("utf-8")
    except UnicodeDecodeError:
        out["payload_b64"] = base64.b64encode(v.payload).decode()
    return out


class Sink(Protocol):
    """Durable output of verified messages."""

    def has(self, message_id: str) -> bool: ...
    def write(self, items: list[Verified]) -> int: ...
    def close(self) -> None: ...


class JsonlSink:
    """Append-only JSON Lines; ids already in the file are loaded at open (restart dedup)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: set[str] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.ids.add(str(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    continue
        self._f: IO[str] = open(path, "a")  # noqa: SIM115 - closed in close()

    def has(self, message_id: str) -> bool:
        return message_id in self.ids

    def write(self, items: list[Verified]) -> int:
        n = 0
        for v in items:
            if v.message_id in self.ids:
                continue
            self.ids.add(v.message_id)
            self._f.write(json.dumps(record(v), separators=(",", ":")) + "\n")
            n += 1
        self._f.flush()
        return n

    def close(self) -> None:
        self._f.close()


class SqliteSink:
    """``messages(id PRIMARY KEY, ...)``; several consumers of one group may share the file."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, gateway TEXT NOT NULL, "
            "topic TEXT NOT NULL, payload BLOB NOT NULL, batch INTEGER NOT NULL, "
            "encrypted INTEGER NOT NULL, device_e2e INTEGER NOT NULL, received REAL NOT NULL)"
        )

    def has(self, message_id: str) -> bool:
        return self.db.execute(
            "SELECT 1 FROM messages WHERE id = ?", (message_id,)).fetchone() is not None

    def write(self, items: list[Verified]) -> int:
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        before = self.db.total_changes
        self.db.executemany(
            "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(v.message_id, v.gateway_id, v.topic, v.payload, v.batch, int(v.encrypted),
              int(v.device_e2e), now) for v in items],
        )
        n = self.db.total_changes - before
        self.db.execute("COMMIT")
        return n

    def close(self) -> None:
        self.db.close()


def open_sink(path: Path) -> Sink:
    """``.sqlite``/``.db`` -> :class:`SqliteSink`, anything else JSON Lines."""
    if path.suffix in (".sqlite", ".sqlite3", ".db"):
        return SqliteSink(path)
    return JsonlSink(path)
