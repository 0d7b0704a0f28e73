"""Durable broker state in SQLite (WAL): persistent sessions, their messages, retained messages.

The store keeps rows of plain values and opaque bytes; what they mean (sessions,
subscriptions, deliveries, retained messages of MQTT) is :mod:`rapidmq_edge.broker.persistence`.
Writes are group-committed: changes made on the event loop accumulate for at most
``commit_delay`` seconds and are written in one transaction by a single writer thread.
``commit_future()`` resolves once everything changed so far is on disk, which is when the
broker may acknowledge a message it made durable (see docs/durability.md). A save
followed by a delete before its batch is written cancels out and never touches the disk.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..telemetry import RepeatedLog
from .disk import DiskSpace, is_disk_full
from .errors import StoreError
from .sqlite_files import is_corrupt, move_aside, open_or_move_aside, prepare

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY, version INTEGER NOT NULL, expiry_interval INTEGER NOT NULL,
    updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL,
    no_local INTEGER NOT NULL, rap INTEGER NOT NULL, rh INTEGER NOT NULL, sub_id INTEGER,
    PRIMARY KEY (client_id, filter));
CREATE TABLE IF NOT EXISTS deliveries (
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    msg_qos INTEGER NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
    props BLOB NOT NULL, expires_at REAL, sub_ids TEXT NOT NULL, share TEXT,
    packet_id INTEGER NOT NULL, released INTEGER NOT NULL, origin TEXT,
    PRIMARY KEY (client_id, seq));
CREATE TABLE IF NOT EXISTS inbound_qos2 (
    client_id TEXT NOT NULL, packet_id INTEGER NOT NULL, PRIMARY KEY (client_id, packet_id));
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL, props BLOB NOT NULL,
    expires_at REAL, origin TEXT);
"""


def _schema(db: sqlite3.Connection) -> None:
    """A store written before retained rows kept their publisher (the erasure of a client's
    data needs it) gains the column (NULL: publisher unknown)."""
    columns = [r[1] for r in db.execute("PRAGMA table_info(retained)")]
    if "origin" not in columns:
        db.execute("ALTER TABLE retained ADD COLUMN origin TEXT")


#: a subscription row after its key (client id, filter): qos, no_local, retain_as_published,
#: retain_handling, subscription identifier
SubscriptionRow = tuple[int, int, int, int, int | None]
#: a delivery row after its key (client id, seq): topic, payload, message qos, granted qos,
#: retain, props, expires_at, sub_ids (JSON), share, packet_id, released, origin
DeliveryRow = tuple[str, bytes, int, int, int, bytes, float | None, str, str | None, int, int,
                    str | None]
#: a retained-message row after its key (topic): payload, qos, props, expires_at, origin
RetainedRow = tuple[bytes, int, bytes, float | None, str | None]


@dataclass(slots=True)
class StoredRows:
    """Everything in the store, as read at start-up (rows with their keys first)."""

    sessions: list[tuple[str, int, int, float]] = field(default_factory=list)
    subscriptions: list[tuple[Any, ...]] = field(default_factory=list)
    deliveries: list[tuple[Any, ...]] = field(default_factory=list)  # in (client, seq) order
    inbound_qos2: list[tuple[str, int]] = field(default_factory=list)
    retained: list[tuple[Any, ...]] = field(default_factory=list)


Op = tuple[str, tuple[Any, ...]]


Waiter = tuple[asyncio.Future[None], bool]


class SessionStore:
    """Group-committing SQLite store for broker state; methods are called on the loop."""

    def __init__(self, path: Path, durability: str = "fsync", commit_delay: float = 0.005,
                 disk: DiskSpace | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        #: the data directory's disk (its ballast is released when a commit finds it full)
        self.disk = disk
        self._repeats = RepeatedLog(log)
        self.path = path
        self.commit_delay = commit_delay
        self.durability = durability
        #: where a damaged database file was moved to (None: it was fine)
        self.quarantined: Path | None = None
        self._db = self._open()
        self._pending: dict[tuple[Any, ...], Op] = {}
        self._on_disk: set[tuple[str, int]] = set()  # deliveries written (or being written)
        #: (future, patient): a patient one is not failed by a failed commit (see commit_future)
        self._waiters: list[Waiter] = []
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="session-store")
        self._lock = threading.Lock()
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0
        self.failures = 0
        #: count of changes made (not of rows written): a caller that read it before an
        #: action knows afterwards whether the action changed anything here
        self.changes = 0
        self.on_error: Callable[[BaseException], None] | None = None

    # -- start-up ------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        """Open the database; a damaged one is moved aside and an empty one created."""
        return open_or_move_aside(
            self.path, self._prepare, self._quarantine)[0]

    def _prepare(self, db: sqlite3.Connection) -> None:
        prepare(db, self.durability, SCHEMA)
        _schema(db)

    def _quarantine(self, exc: BaseException) -> Path:
        """Move a damaged database (and its WAL/SHM files) aside; never delete it."""
        path = self.path
        target = move_aside(path)
        self.quarantined = target
        log.error(
            "session store %s is damaged (%s); moved it to %s and starting with an empty "
            "store (persistent sessions, queued and retained messages in it are not restored)",
            path, exc, target,
        )
        return target

    def load(self) -> StoredRows:
        """Read every row (call before serving); the keys of stored deliveries are
        remembered (a delete of one not yet written is dropped, see ``delete_delivery``).

        A database found damaged while reading is moved aside (see ``_quarantine``) and
        the gateway starts with an empty store.
        """
        try:
            rows = self._load()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            with self._lock:
                self._quarantine(exc)
                self._db.close()  # after the move (see _open)
                self._db = self._open()
            self._on_disk.clear()
            return StoredRows()
        self._on_disk.update((r[0], r[1]) for r in rows.deliveries)
        return rows

    def _load(self) -> StoredRows:
        db = self._db
        return StoredRows(
            [tuple(r) for r in db.execute(
                "SELECT client_id, version, expiry_interval, updated_at FROM sessions")],
            [tuple(r) for r in db.execute("SELECT * FROM subscriptions")],
            [tuple(r) for r in db.execute("SELECT * FROM deliveries ORDER BY client_id, seq")],
            [tuple(r) for r in db.execute("SELECT client_id, packet_id FROM inbound_qos2")],
            [tuple(r) for r in db.execute(
                "SELECT topic, payload, qos, props, expires_at, origin FROM retained")],
        )

    # -- changes (event loop) ------------------------------------------------------

    def _put(self, key: tuple[Any, ...], op: Op) -> None:
        self._pending[key] = op
        self.changes += 1
        if self._timer is None and not self._busy:
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            self._timer = loop.call_later(self.commit_delay, self._flush)

    def save_session(self, cid: str, version: int, expiry: int, now: float) -> None:
        self._put(("s", cid), ("save_session", (cid, version, expiry, now)))

    def delete_session(self, cid: str) -> None:
        for key in [k for k in self._pending if len(k) > 1 and k[1] == cid]:
            del self._pending[key]
        self._put(("s", cid), ("delete_session", (cid,)))

    def save_subscription(self, cid: str, filt: str, row: SubscriptionRow) -> None:
        self._put(("sub", cid, filt), ("save_sub", (cid, filt, *row)))

    def delete_subscription(self, cid: str, filt: str) -> None:
        self._put(("sub", cid, filt), ("delete_sub", (cid, filt)))

    def save_delivery(self, cid: str, seq: int, row: DeliveryRow) -> None:
        self._put(("d", cid, seq), ("save_delivery", (cid, seq, *row)))

    def delete_delivery(self, cid: str, seq: int) -> None:
        key = ("d", cid, seq)
        op = self._pending.get(key)
        if op is not None and op[0] == "save_delivery" and (cid, seq) not in self._on_disk:
            del self._pending[key]
            return
        self._put(key, ("delete_delivery", (cid, seq)))

    def save_inbound_qos2(self, cid: str, pid: int) -> None:
        self._put(("q2", cid, pid), ("save_q2", (cid, pid)))

    def delete_inbound_qos2(self, cid: str, pid: int) -> None:
        self._put(("q2", cid, pid), ("delete_q2", (cid, pid)))

    def save_retained(self, topic: str, row: RetainedRow) -> None:
        self._put(("r", topic), ("save_retained", (topic, *row)))

    def delete_retained(self, topic: str) -> None:
        self._put(("r", topic), ("delete_retained", (topic,)))

    def commit_future(self, patient: bool = False) -> asyncio.Future[None] | None:
        """A future resolved when everything changed so far is committed; None if nothing is.

        It fails with :class:`StoreError` when that commit fails, unless ``patient``: then it
        waits for the retry that writes the same changes (for an acknowledgement that has no
        way to say no, as MQTT 3.1.1's)."""
        if not self._pending and not self._busy:
            return None
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((fut, patient))
        return fut

    @property
    def pending(self) -> int:
        """Changes not yet handed to the writer."""
        return len(self._pending)

    # -- writing -------------------------------------------------------------------

    def _flush(self) -> None:
        self._timer = None
        if self._busy:
            return
        if not self._pending:  # everything cancelled out: nothing to wait for
            waiters, self._waiters = self._waiters, []
            for w, _ in waiters:
                if not w.done():
                    w.set_result(None)
            return
        loop = self._loop
        assert loop is not None
        ops = list(self._pending.values())
        self._pending = {}
        on_disk = self._on_disk
        for name, args in ops:
            if name == "save_delivery":
                on_disk.add((args[0], args[1]))
            elif name == "delete_delivery":
                on_disk.discard(args)
        waiters, self._waiters = self._waiters, []
        self._busy = True
        fut = loop.run_in_executor(self._writer, self._write, ops)
        fut.add_done_callback(lambda f: self._written(f, ops, waiters))

    def _written(self, f: asyncio.Future[None], ops: list[Op], waiters: list[Waiter]) -> None:
        self._busy = False
        exc = f.exception()
        if exc is None:
            self.commits += 1
            self._repeats.clear("commit", "session store %s: commits succeed again", self.path)
            if not self._pending:
                # Futures taken while this batch was being written with nothing else
                # pending waited for exactly this batch: it is committed now.
                waiters += self._waiters
                self._waiters = []
            for w, _ in waiters:
                if not w.done():
                    w.set_result(None)
        else:
            self.failures += 1
            if self.disk is not None and is_disk_full(exc):
                self.disk.release_ballast()
            self._repeats("commit", logging.ERROR,
                          "session store %s: commit failed (%s); will retry", self.path, exc)
            # Keep the failed changes (older than anything pending now) for the retry.
            merged: dict[tuple[Any, ...], Op] = {}
            for op in ops:
                merged[_key_of(op)] = op
            merged.update(self._pending)
            self._pending = merged
            # the patient wait for the retry of the same changes
            self._waiters[:0] = [(w, p) for w, p in waiters if p]
            for w, p in waiters:
                if not p and not w.done():
                    w.set_exception(StoreError(str(exc)))
                    w.add_done_callback(_retrieved)
            if self.on_error is not None:
                self.on_error(exc)
        if self._pending and self._timer is None and self._loop is not None:
            delay = 0.0 if exc is None else 0.5  # adaptive group commit (see forward_queue)
            self._timer = self._loop.call_later(delay, self._flush)

    def _write(self, ops: list[Op]) -> None:
        db = self._db
        with self._lock:
            db.execute("BEGIN")
            try:
                for name, args in ops:
                    _SQL[name](db, args)
                db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (SQLITE_FULL, IOERR): a second
                # ROLLBACK would raise and hide why the commit failed
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        """Write everything pending, then close the database."""
        for _ in range(100):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._pending and not self._busy:
                break
            fut = self.commit_future()
            self._flush()
            if fut is not None:
                try:
                    await asyncio.wait_for(fut, 10)
                except (StoreError, TimeoutError):
                    break
        self._writer.shutdown(wait=True)
        with self._lock:
            self._db.close()


def _retrieved(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # a failure nobody awaited is known here: asyncio need not warn


def _key_of(op: Op) -> tuple[Any, ...]:
    name, a = op
    if name in ("save_session", "delete_session"):
        return ("s", a[0])
    if name in ("save_sub", "delete_sub"):
        return ("sub", a[0], a[1])
    if name in ("save_delivery", "delete_delivery"):
        return ("d", a[0], a[1])
    if name in ("save_q2", "delete_q2"):
        return ("q2", a[0], a[1])
    return ("r", a[0])


def _delete_session(db: sqlite3.Connection, a: tuple[Any, ...]) -> None:
    for table in ("sessions", "subscriptions", "deliveries", "inbound_qos2"):
        db.execute(f"DELETE FROM {table} WHERE client_id = ?", a)


_SQL: dict[str, Callable[[sqlite3.Connection, tuple[Any, ...]], Any]] = {
    "save_session": lambda db, a: db.execute(
        "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)", a),
    "delete_session": _delete_session,
    "save_sub": lambda db, a: db.execute(
        "INSERT OR REPLACE INTO subscriptions VALUES (?, ?, ?, ?, ?, ?, ?)", a),
    "delete_sub": lambda db, a: db.execute(
        "DELETE FROM subscriptions WHERE client_id = ? AND filter = ?", a),
    "save_delivery": lambda db, a: db.execute(
        "INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", a),
    "delete_delivery": lambda db, a: db.execute(
        "DELETE FROM deliveries WHERE client_id = ? AND seq = ?", a),
    "save_q2": lambda db, a: db.execute("INSERT OR REPLACE INTO inbound_qos2 VALUES (?, ?)", a),
    "delete_q2": lambda db, a: db.execute(
        "DELETE FROM inbound_qos2 WHERE client_id = ? AND packet_id = ?", a),
    "save_retained": lambda db, a: db.execute(
        "INSERT OR REPLACE INTO retained (topic, payload, qos, props, expires_at, origin) "
        "VALUES (?, ?, ?, ?, ?, ?)", a),
    "delete_retained": lambda db, a: db.execute("DELETE FROM retained WHERE topic = ?", a),
}
