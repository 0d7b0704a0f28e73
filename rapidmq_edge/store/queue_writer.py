"""The forward queue's writer: table layout and group commit (one writer thread).

``put()`` rows accumulate for at most ``commit_delay`` seconds and one writer thread writes
them in one transaction, together with what ``stage()`` set in the small ``state`` table
(durable state of the message path, such as open summary windows). ``commit_future()``
resolves when everything put so far is committed; a failed commit fails that future and
takes the failed rows out of the index (nothing that was not stored is counted or
acknowledged). Deletes (acks, drops) ride along with the next group of puts, or wait at
most ``DELETE_DELAY``; nothing waits for them, and one lost in a crash only means the same
id is sent again. Each group is a few multi-row statements, so the writer thread needs the
GIL (held by a busy event loop) only a few times per commit.

:class:`QueueWriter` is mixed into :class:`~.forward_queue.ForwardQueue`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

from ..telemetry import RepeatedLog
from .disk import DiskSpace, is_disk_full
from .errors import QueueError
from .lanes import Lane

__all__ = ["COLUMNS", "DELETE_DELAY", "INSERT", "QueueWriter", "Row", "SCHEMA", "add_origin"]

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, upstream TEXT NOT NULL, priority INTEGER NOT NULL,
    topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, props BLOB NOT NULL,
    created REAL NOT NULL, expires_at REAL, size INTEGER NOT NULL, origin TEXT);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
#: the columns a salvage copies (a damaged file may predate ``origin``: it is not copied)
COLUMNS = "id, upstream, priority, topic, payload, qos, props, created, expires_at, size"
INSERT = f"INSERT INTO messages ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: a put's row: the salvaged columns and its publisher's client id (``origin``)
_ROW_INSERT = f"INSERT INTO messages ({COLUMNS}, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_CHUNK = 1024  # rows per multi-row INSERT (11 variables each; SQLite allows 32766)
#: longest wait of acks' and drops' deletes for a batch of puts to ride along with (s)
DELETE_DELAY = 0.1
#: ids per delete transaction while commits fail for lack of space (each needs WAL room)
_SMALL_DELETE = 512

# row: id, upstream, priority, topic, payload, qos, props blob, created, expires_at, size,
# origin (the publisher's client id; None: the gateway's own or unknown)
Row = tuple[int, str, int, str, bytes, int, bytes, float, float | None, int, str | None]


def add_origin(db: sqlite3.Connection) -> None:
    """A queue written before rows kept their publisher (the erasure of a device's queued
    messages needs it) gains the column: its rows have origin NULL (publisher unknown)."""
    columns = [r[1] for r in db.execute("PRAGMA table_info(messages)")]
    if "origin" not in columns:
        db.execute("ALTER TABLE messages ADD COLUMN origin TEXT")

#: what a cached row costs in Python objects beyond its topic, payload and properties
#: (the row tuple, its id and time, the OrderedDict slot: ~350 bytes measured with
#: tracemalloc), so ``cache_bytes`` bounds the memory the cache really holds
ROW_OVERHEAD = 360


class QueueWriter:
    """Group commit of puts and deletes (mixed into ``ForwardQueue``, whose ``__init__``
    sets the attributes declared here)."""

    path: Path
    commit_delay: float
    cache_bytes: int
    drops: dict[str, int]
    commits: int
    commit_failures: int
    write_hook: Callable[[sqlite3.Connection, list[Row]], None] | None
    disk: DiskSpace | None
    _db: sqlite3.Connection
    _lock: threading.Lock
    _lanes: dict[tuple[str, int], Lane]
    _total_bytes: int
    _durable_id: int
    _ins: dict[int, Row]  # puts not yet handed to the writer
    _dels: set[int]  # deletes not yet handed to the writer
    _writing: dict[int, Row]  # rows of the batch being written
    _state: dict[str, bytes | None]  # stage() not yet handed to the writer
    _state_writing: dict[str, bytes | None]
    _cache: OrderedDict[int, Row]  # committed rows, newest last
    _cached: int
    _pending_bytes: int
    _pending_fut: asyncio.Future[None] | None
    _busy_fut: asyncio.Future[None] | None
    _busy: bool
    _written_at: float
    _timer: asyncio.Handle | None
    _timer_due: float
    _loop: asyncio.AbstractEventLoop | None
    _writer: ThreadPoolExecutor
    _data_waiters: dict[str, list[asyncio.Future[None]]]
    _full: bool  # the last commit failed for lack of space: deletes go in small transactions
    _repeats: RepeatedLog
    _flush_started: float  # time.monotonic() when the commit being written was handed over
    _commit_max: float  # the longest commit since commit_latency() was last asked
    #: called on the loop with each commit's duration (s): the /metrics histogram
    commit_observer: Callable[[float], None] | None

    if TYPE_CHECKING:  # provided by ForwardQueue
        def _count_drop(self, reason: str, prio: int, kind: str | None = None) -> None: ...

    def _wake(self, upstreams: Iterable[str]) -> None:
        """Resolve the ``wait_for_data`` futures of ``upstreams``."""
        for up in upstreams:
            _resolve(self._data_waiters.pop(up, []), None)

    def _schedule(self) -> None:
        """Arm the group commit for a put: at most ``commit_delay`` from now."""
        if self._busy:
            return  # _written flushes what arrived meanwhile
        if self._timer is not None:
            if self._timer_due <= self._time() + self.commit_delay:
                return
            self._timer.cancel()  # a lazy delete-only commit was armed: sooner now
        self._arm(self.commit_delay)

    def _time(self) -> float:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        return loop.time()

    def _arm(self, delay: float) -> None:
        """(Re)arm the flush timer ``delay`` seconds from now."""
        self._timer_due = self._time() + delay
        assert self._loop is not None
        self._timer = self._loop.call_later(delay, self._flush)

    def commit_arrived(self, since: float) -> None:
        """Commit the puts so far as if they had been put at ``since`` (``time.monotonic()``
        of the first one's arrival), for rows that waited before their put (the intelligence
        runtime's micro-batch): had they been put on arrival, they would have joined the
        group commit armed then (at most ``commit_delay`` after ``since``), or, if a commit
        was in flight since then, the one right after it. Without this, a writer that went
        idle during the wait would start the full ``commit_delay`` again at the put."""
        if self._busy or not (self._ins or self._state):
            return  # _written writes what arrived meanwhile at once
        now = time.monotonic()
        if self._written_at > since:
            delay = 0.0  # they would have arrived during that commit: written right after it
        else:
            delay = min(max(self.commit_delay - (now - since), 0.0), self.commit_delay)
        if self._timer is not None:
            if self._timer_due <= self._time() + delay:
                return
            self._timer.cancel()
        self._arm(delay)

    def stage(self, key: str, value: bytes | None) -> None:
        """Set ``key`` in the ``state`` table (None: delete it) with the next group commit,
        atomically with the puts made around it; :meth:`commit_future` covers it."""
        self._state[key] = value
        self._schedule()

    def load_state(self, prefix: str) -> dict[str, bytes]:
        """The committed ``state`` entries whose key starts with ``prefix``."""
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM state WHERE substr(key, 1, ?) = ?",
                                    (len(prefix), prefix)).fetchall()
        return {k: bytes(v) for k, v in rows}

    def _schedule_deletes(self) -> None:
        """Arm a commit for deletes alone (acks, drops): they wait up to ``DELETE_DELAY``
        to ride along with the next batch of puts (nobody waits for them; a crash before
        they are committed only means a redelivery of the same id)."""
        if self._timer is None and not self._busy:
            self._arm(max(self.commit_delay, DELETE_DELAY))

    def commit_future(self) -> asyncio.Future[None] | None:
        """A future resolved when everything put so far is committed, failed with
        QueueError if that commit fails; None if no put is pending or being written.

        The future is shared by every caller waiting for the same batch (one per group
        commit, not one per message): await it through ``asyncio.shield`` where the
        awaiting task may be cancelled. Deletes (acks, drops) are committed with the
        next batch and are not waited for.
        """
        if self._ins or self._state:
            fut = self._pending_fut
            if fut is None or fut.done():
                fut = self._pending_fut = self._new_future()
            return fut
        if self._busy and (self._writing or self._state_writing):
            return self._busy_fut
        return None

    def _new_future(self) -> asyncio.Future[None]:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        return loop.create_future()

    def _flush(self) -> None:
        self._timer = None
        if self._busy:
            return
        if not self._ins and not self._state:
            fut, self._pending_fut = self._pending_fut, None
            _resolve(fut, None)  # what it waited for was dropped before being written
            if not self._dels:
                return
        rows = list(self._ins.values())
        dels = sorted(self._dels)
        state = self._state_writing = self._state
        self._writing, self._ins, self._dels, self._state = self._ins, {}, set(), {}
        fut = self._pending_fut
        self._busy_fut = fut if fut is not None and not fut.done() else self._new_future()
        self._pending_fut = None
        self._busy = True
        self._flush_started = time.monotonic()
        loop = self._loop
        assert loop is not None
        # a drain that emptied the queue: give the WAL's space back (a checkpoint that
        # truncates it; a few ms, only then)
        checkpoint = bool(dels) and not self._total_bytes
        done = loop.run_in_executor(self._writer, self._write, rows, dels, state, checkpoint)
        done.add_done_callback(lambda f: self._written(f, rows, dels, state))

    def _write(self, rows: list[Row], dels: list[int],
               state: dict[str, bytes | None] | None = None, checkpoint: bool = False) -> None:
        """One transaction (in the writer thread). Few statements, each doing much: the
        thread needs the GIL between statements, which a busy event loop holds.

        When it fails for lack of space, its deletes are committed alone, in transactions
        of at most ``_SMALL_DELETE`` ids, so a drain makes progress while inserts cannot
        (the error then carries ``deletes_done``). ``checkpoint``: then truncate the WAL."""
        db = self._db
        with self._lock:
            try:
                self._transaction(db, rows, dels, state)
            except sqlite3.Error as exc:
                if dels and is_disk_full(exc):
                    self._delete_in_small_transactions(db, dels)
                    exc.deletes_done = True  # type: ignore[attr-defined]
                raise
            if checkpoint:
                _checkpoint(db, "TRUNCATE")

    def _delete_in_small_transactions(self, db: sqlite3.Connection, dels: list[int]) -> None:
        for k in range(0, len(dels), _SMALL_DELETE):
            db.execute("BEGIN")
            try:
                db.executemany("DELETE FROM messages WHERE id BETWEEN ? AND ?",
                               _runs(dels[k:k + _SMALL_DELETE]))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        _checkpoint(db, "RESTART")  # the WAL starts over in the blocks it already has

    def _transaction(self, db: sqlite3.Connection, rows: list[Row], dels: list[int],
                     state: dict[str, bytes | None] | None) -> None:
        """Deletes, inserts (and their write hook) and state changes: one transaction."""
        db.execute("BEGIN")
        try:
            if dels:  # acked ids come in runs: one range delete per run
                db.executemany("DELETE FROM messages WHERE id BETWEEN ? AND ?", _runs(dels))
            k = 0
            while k < len(rows):
                n = min(len(rows) - k, _INSERT_CHUNK)
                n = 1 << (n.bit_length() - 1)  # power of two: few distinct statements
                db.execute(_insert_sql(n), list(chain.from_iterable(rows[k:k + n])))
                k += n
            if rows and self.write_hook is not None:
                self.write_hook(db, rows)
            if state:
                db.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                               [(k, v) for k, v in state.items() if v is not None])
                db.executemany("DELETE FROM state WHERE key = ?",
                               [(k,) for k, v in state.items() if v is None])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _written(self, f: asyncio.Future[None], rows: list[Row], dels: list[int],
                 state: dict[str, bytes | None] | None = None) -> None:
        self._busy = False
        self._state_writing = {}
        self._written_at = time.monotonic()
        took = self._written_at - self._flush_started
        self._commit_max = max(self._commit_max, took)
        if self.commit_observer is not None:
            self.commit_observer(took)
        writing, self._writing = self._writing, {}
        waiters, self._busy_fut = self._busy_fut, None
        exc = f.exception()
        disk = self.disk
        if disk is not None:
            disk.refresh()
        if exc is None:
            self.commits += 1
            if self._full:
                self._full = False
                self._repeats.clear("commit", "forward queue %s: commits succeed again",
                                    self.path)
            for mid, row in writing.items():
                self._pending_bytes -= row[9]
                if mid not in self._dels:  # not dropped while being written
                    self._cache[mid] = row
                    self._cached += row[9] + ROW_OVERHEAD
            while self._cached > self.cache_bytes and self._cache:
                self._cached -= self._cache.popitem(last=False)[1][9] + ROW_OVERHEAD
            if rows:
                self._durable_id = max(self._durable_id, rows[-1][0])
            _resolve(waiters, None)
            if self._data_waiters:
                self._wake({r[1] for r in rows} & self._data_waiters.keys())
        else:
            self.commit_failures += 1
            self._unput(writing, rows)
            if not getattr(exc, "deletes_done", False):
                self._dels.update(dels)  # acks and drops are retried
            for k, v in (state or {}).items():  # so is state not set again since
                self._state.setdefault(k, v)
            if is_disk_full(exc):
                self._full = True
                if disk is not None:
                    disk.release_ballast()
            self._repeats("commit", logging.ERROR,
                          "forward queue %s: commit failed (%s); %d message(s) not stored",
                          self.path, exc, len(writing))
            _resolve(waiters, QueueError(f"commit failed: {exc}"))
        if self._timer is not None or self._loop is None:
            return
        if exc is not None:
            if self._ins or self._dels or self._state:  # pause before retrying
                self._arm(self.commit_delay if self._ins else 0.5)
        elif self._ins or self._state:
            # Adaptive group commit: what arrived during this commit has waited long
            # enough; write it at once.
            self._arm(0.0)
        elif self._dels:
            self._schedule_deletes()

    def commit_latency(self) -> float:
        """The longest commit (s) since the last call, a commit still being written
        counted up to now (a stuck disk shows while it is stuck)."""
        longest = self._commit_max
        if self._busy:
            longest = max(longest, time.monotonic() - self._flush_started)
        self._commit_max = 0.0
        return longest

    def _unput(self, writing: dict[int, Row], rows: list[Row]) -> None:
        """Take rows whose insert failed out of the index: they were never stored."""
        if not rows:
            return
        self._pending_bytes -= sum(r[9] for r in rows)
        lo, hi = rows[0][0], rows[-1][0]
        for lane in self._lanes.values():
            for mid in lane.remove_range(lo, hi):
                self._total_bytes -= writing[mid][9]
                self._count_drop("not_stored", writing[mid][2])


def _checkpoint(db: sqlite3.Connection, mode: str) -> None:
    """Move the WAL into the database; ``TRUNCATE`` gives its blocks back to the
    filesystem, ``RESTART`` reuses them from the start (best effort: a busy reader or a
    full disk leaves it for the next time)."""
    try:
        db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
    except sqlite3.Error as exc:
        log.debug("WAL checkpoint skipped: %s", exc)


def _retrieved(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # a failure nobody awaited is known here: asyncio need not warn


def _resolve(
    waiters: list[asyncio.Future[None]] | asyncio.Future[None] | None, exc: BaseException | None
) -> None:
    if waiters is None:
        return
    for w in [waiters] if isinstance(waiters, asyncio.Future) else waiters:
        if not w.done():
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(exc)
                w.add_done_callback(_retrieved)


@lru_cache(maxsize=16)
def _insert_sql(n: int) -> str:
    """``INSERT`` of ``n`` rows in one statement."""
    return _ROW_INSERT + ", (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" * (n - 1)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ``ids`` as ``(first, last)`` runs of consecutive integers."""
    out: list[tuple[int, int]] = []
    if not ids:
        return out
    lo = prev = ids[0]
    for i in ids[1:]:
        if i != prev + 1:
            out.append((lo, prev))
            lo = i
        prev = i
    out.append((lo, prev))
    return out
