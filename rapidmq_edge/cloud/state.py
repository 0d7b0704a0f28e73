"""The consumer's durable state: what makes an upstream acknowledgement safe.

One :class:`Step` per chunk of received messages is committed in **one transaction** before
the chunk is acknowledged upstream: verified rows (the sink), reports, accepted batch and
session headers (the audit chain, shared with the other consumers of a group), messages that
wait for their batch header (``pending``, per consumer) and the ones that stopped waiting.

:class:`SqliteStore` keeps it in a SQLite file — the ``.sqlite`` sink itself, or a
``<out>.state.sqlite`` beside a JSON Lines sink (the JSONL line is flushed and fsynced before
the state commit; a crash between the two replays the message, and the sink's id check drops
the copy). :mod:`.pgstore` keeps it in PostgreSQL.

Tables (SQLite types; PostgreSQL in :mod:`.pgstore`)::

    messages(id PK, gateway, topic, payload, batch, encrypted, device_e2e, received,
             verdict, proof)
    cloud_control(pos PK, digest UNIQUE, kind, gateway, seq, payload, received)
    cloud_pending(consumer, id, topic, payload, arrived, PK(consumer, id))
    cloud_reports(pos PK, key UNIQUE, kind, detail, message_id, gateway, batch, consumer, at)
    cloud_consumers(consumer PK, beat)
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..crypto.batch import ChainEntry
from ..crypto.batch_message import decode_batch_message
from .sinks import JsonlSink
from .verify import Report, Verified

__all__ = ["Pending", "Restored", "SqliteStore", "Step", "Store", "read_chain_rows",
           "report_key"]

Pending = tuple[str, str, bytes]  # message id, topic, payload
Control = tuple[str, bytes, str, int | None]  # kind, payload, gateway, batch seq


@dataclass
class Step:
    """Everything one chunk changes, committed at once."""

    verified: list[Verified] = field(default_factory=list)
    reports: list[Report] = field(default_factory=list)
    control: list[Control] = field(default_factory=list)
    stage: list[Pending] = field(default_factory=list)
    unstage: list[str] = field(default_factory=list)


@dataclass
class Restored:
    """What a (re)started consumer feeds its verifier before receiving anything."""

    control: list[tuple[str, bytes]]
    pending: list[Pending]
    cursor: int


class Store(Protocol):
    """Durable state of one consumer (shared by the consumers of a group where it can)."""

    shared: bool  # other consumers see this state (batch headers need not reach everyone)

    async def restore(self, consumer: str, horizon: float) -> Restored: ...
    async def written(self, ids: Sequence[str]) -> set[str]: ...
    async def unaccounted(self, ids: Sequence[str]) -> list[str]: ...
    async def control_since(self, cursor: int) -> tuple[list[tuple[str, bytes]], int]: ...
    async def old_sessions(self, horizon: float, after: int,
                           limit: int) -> list[tuple[int, bytes]]: ...
    async def commit(self, consumer: str, step: Step) -> int: ...
    async def adopt(self, consumer: str, lease: float) -> list[Pending]: ...
    async def close(self) -> None: ...


def report_key(r: Report) -> str | None:
    """Dedup key of a report (several consumers see the same batch gap), None if anonymous."""
    if r.message_id is None and r.gateway_id is None and r.batch is None:
        return None
    return f"{r.kind}|{r.gateway_id}|{r.batch}|{r.message_id}"


def digest(payload: bytes) -> bytes:
    """Identity of a stored batch / session header."""
    return hashlib.sha256(payload).digest()


def read_chain_rows(rows: Iterable[tuple[int, bytes]]) -> list[ChainEntry]:
    """Stored batch messages (position, payload) as audit-chain entries (signed + leaves)."""
    out = []
    for pos, payload in rows:
        signed, _ids, leaves = decode_batch_message(bytes(payload))
        out.append(ChainEntry(int(pos), signed, leaves))
    return out


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, gateway TEXT NOT NULL,
    topic TEXT NOT NULL, payload BLOB NOT NULL, batch INTEGER NOT NULL,
    encrypted INTEGER NOT NULL, device_e2e INTEGER NOT NULL, received REAL NOT NULL,
    verdict TEXT NOT NULL DEFAULT 'verified', proof TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS cloud_control (pos INTEGER PRIMARY KEY AUTOINCREMENT,
    digest BLOB NOT NULL UNIQUE, kind TEXT NOT NULL, gateway TEXT NOT NULL, seq INTEGER,
    payload BLOB NOT NULL, received REAL NOT NULL);
CREATE INDEX IF NOT EXISTS cloud_control_chain ON cloud_control (kind, gateway, seq);
CREATE TABLE IF NOT EXISTS cloud_pending (consumer TEXT NOT NULL, id TEXT NOT NULL,
    topic TEXT NOT NULL, payload BLOB NOT NULL, arrived REAL NOT NULL,
    PRIMARY KEY (consumer, id));
CREATE INDEX IF NOT EXISTS cloud_pending_id ON cloud_pending (id);
CREATE TABLE IF NOT EXISTS cloud_reports (pos INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT UNIQUE,
    kind TEXT NOT NULL, detail TEXT NOT NULL, message_id TEXT, gateway TEXT, batch INTEGER,
    consumer TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS cloud_reports_mid ON cloud_reports (message_id);
CREATE TABLE IF NOT EXISTS cloud_consumers (consumer TEXT PRIMARY KEY, beat REAL NOT NULL);
"""


class SqliteStore:
    """State in SQLite; messages in its ``messages`` table, or in ``jsonl`` when given."""

    def __init__(self, path: Path, jsonl: JsonlSink | None = None) -> None:
        self.path = path
        self.jsonl = jsonl
        self.shared = jsonl is None  # consumers of a group may share the .sqlite file
        self.db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # acknowledged upstream after COMMIT
        self.db.executescript(_SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(messages)")}
        for col, decl in (("verdict", "TEXT NOT NULL DEFAULT 'verified'"),
                          ("proof", "TEXT NOT NULL DEFAULT ''")):
            if col not in cols:  # a sink file of an older version
                self.db.execute(f"ALTER TABLE messages ADD COLUMN {col} {decl}")

    async def restore(self, consumer: str, horizon: float) -> Restored:
        since = time.time() - horizon
        control = [(str(k), bytes(p)) for k, p in self.db.execute(
            "SELECT kind, payload FROM cloud_control WHERE received >= ? OR pos IN "
            "(SELECT MAX(pos) FROM cloud_control WHERE kind = 'session' GROUP BY gateway) "
            "ORDER BY pos", (since,))]
        pending = [(str(i), str(t), bytes(p)) for i, t, p in self.db.execute(
            "SELECT id, topic, payload FROM cloud_pending WHERE consumer = ? ORDER BY arrived",
            (consumer,))]
        cursor = self.db.execute("SELECT COALESCE(MAX(pos), 0) FROM cloud_control").fetchone()[0]
        self.db.execute("INSERT OR REPLACE INTO cloud_consumers VALUES (?, ?)",
                        (consumer, time.time()))
        return Restored(control, pending, int(cursor))

    async def written(self, ids: Sequence[str]) -> set[str]:
        if self.jsonl is not None:
            return {i for i in ids if i in self.jsonl.ids}
        return self._present("SELECT id FROM messages WHERE id IN ({})", ids)

    def _present(self, sql: str, ids: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(ids), 500):
            part = list(ids[i:i + 500])
            out.update(r[0] for r in self.db.execute(
                sql.format(",".join("?" * len(part))), part))
        return out

    async def unaccounted(self, ids: Sequence[str]) -> list[str]:
        known = await self.written(ids)
        known |= self._present("SELECT id FROM cloud_pending WHERE id IN ({})", ids)
        known |= self._present(
            "SELECT message_id FROM cloud_reports WHERE message_id IN ({})", ids)
        return [i for i in ids if i not in known]

    async def old_sessions(self, horizon: float, after: int,
                           limit: int) -> list[tuple[int, bytes]]:
        return [(int(pos), bytes(p)) for pos, p in self.db.execute(
            "SELECT pos, payload FROM cloud_control WHERE kind = 'session' AND received < ? "
            "AND pos > ? ORDER BY pos LIMIT ?", (time.time() - horizon, after, limit))]

    async def control_since(self, cursor: int) -> tuple[list[tuple[str, bytes]], int]:
        rows = self.db.execute(
            "SELECT pos, kind, payload FROM cloud_control WHERE pos > ? ORDER BY pos",
            (cursor,)).fetchall()
        return [(str(k), bytes(p)) for _, k, p in rows], (int(rows[-1][0]) if rows else cursor)

    async def commit(self, consumer: str, step: Step) -> int:
        now = time.time()
        if self.jsonl is not None and step.verified:
            self.jsonl.write(step.verified)
            os.fsync(self.jsonl._f.fileno())
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            n = 0
            if self.jsonl is None and step.verified:
                before = db.total_changes
                db.executemany(
                    "INSERT OR IGNORE INTO messages (id, gateway, topic, payload, batch, "
                    "encrypted, device_e2e, received, verdict, proof) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'verified', ?)",
                    [(v.message_id, v.gateway_id, v.topic, v.payload, v.batch,
                      int(v.encrypted), int(v.device_e2e), now, v.proof)
                     for v in step.verified])
                n = db.total_changes - before
            db.executemany(
                "INSERT OR IGNORE INTO cloud_reports (key, kind, detail, message_id, gateway, "
                "batch, consumer, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(report_key(r), r.kind, r.detail, r.message_id, r.gateway_id, r.batch,
                  consumer, now) for r in step.reports])
            db.executemany(
                "INSERT OR IGNORE INTO cloud_control (digest, kind, gateway, seq, payload, "
                "received) VALUES (?, ?, ?, ?, ?, ?)",
                [(digest(p), k, g, s, p, now) for k, p, g, s in step.control])
            db.executemany("INSERT OR IGNORE INTO cloud_pending VALUES (?, ?, ?, ?, ?)",
                           [(consumer, m, t, p, now) for m, t, p in step.stage])
            db.executemany("DELETE FROM cloud_pending WHERE consumer = ? AND id = ?",
                           [(consumer, m) for m in step.unstage])
            db.execute("INSERT OR REPLACE INTO cloud_consumers VALUES (?, ?)", (consumer, now))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return n

    async def adopt(self, consumer: str, lease: float) -> list[Pending]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR REPLACE INTO cloud_consumers VALUES (?, ?)",
                       (consumer, time.time()))
            stale = [r[0] for r in db.execute(
                "SELECT consumer FROM cloud_consumers WHERE beat < ? AND consumer != ?",
                (time.time() - lease, consumer))]
            rows: list[Pending] = []
            for c in stale:
                rows += [(str(i), str(t), bytes(p)) for i, t, p in db.execute(
                    "SELECT id, topic, payload FROM cloud_pending WHERE consumer = ?", (c,))]
                db.execute("UPDATE OR IGNORE cloud_pending SET consumer = ? WHERE consumer = ?",
                           (consumer, c))
                db.execute("DELETE FROM cloud_pending WHERE consumer = ?", (c,))
                db.execute("DELETE FROM cloud_consumers WHERE consumer = ?", (c,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return rows

    async def close(self) -> None:
        self.db.close()
        if self.jsonl is not None:
            self.jsonl.close()
