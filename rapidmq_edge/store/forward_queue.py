"""Durable store-and-forward queue for upstream forwarding (SQLite, WAL, group commit).

``put()`` assigns a sequence id at once and the row is group-committed (:mod:`.queue_writer`:
``commit_future()`` resolves when everything put so far is committed, and only then may the
device get its PUBACK). Only committed rows are handed out by ``fetch()``, so an id
forwarded upstream always names a stored message; rows are deleted only after the
upstream's ``ack()``. Puts are checked against per-class and queue-wide bounds
(:mod:`.queue_bounds`: drop oldest or refuse new).

An in-memory index (per upstream and priority class: ids, sizes, timestamps in compact
arrays, :mod:`.lanes`) is loaded at open; payloads of recent puts stay in a small cache and
everything else is read from SQLite in batches by id. A damaged file is moved aside, never
deleted, and its readable rows are salvaged into a fresh database (:mod:`.salvage`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..telemetry import RepeatedLog
from .disk import DiskSpace
from .errors import QueueError, QueueFull
from .lanes import Entry, Lane
from .queue_bounds import DEFAULT_CLASSES, ClassLimits, Policy, QueueBounds
from .queue_writer import (
    COLUMNS,
    DELETE_DELAY,
    INSERT,
    ROW_OVERHEAD,
    SCHEMA,
    QueueWriter,
    Row,
    add_origin,
)
from .salvage import read_salvageable
from .sqlite_files import connect, move_aside, open_or_move_aside, prepare

__all__ = [
    "DEFAULT_CLASSES", "DELETE_DELAY", "ORIGIN_WHERE", "PRIORITIES", "ClassLimits",
    "ForwardQueue", "Policy", "QueueError", "QueueFull", "QueuedMessage", "Row",
]

log = logging.getLogger(__name__)

PRIORITIES = (0, 1, 2, 3)  # 0 = alarm (drains first, newest first) .. 3 = bulk

_READ_CHUNK = 900  # ids per "WHERE id IN (...)"
_READ_SQL = "SELECT id, topic, payload, qos, props FROM messages WHERE id"
#: id jump after a salvage that could not read the id sequence (ids are never reused)
_ID_GAP_UNKNOWN = 1 << 32
#: ``drops`` reason -> its ``class_drops`` kind when the caller gives none
_KINDS = {"dropped_oldest": "queue_full", "refused": "queue_full", "expired": "ttl_expired"}
#: the rows an erasure of a device removes (parameters: its id, ``/id/``): those it
#: published; of rows stored before the queue kept publishers, those naming it as a level
ORIGIN_WHERE = "origin = ? OR (origin IS NULL AND instr('/' || topic || '/', ?) > 0)"


def _ready_at(lane: Lane, mid: int) -> int:
    """The position of ``mid`` among ``lane``'s ready ids, or -1."""
    i = bisect_left(lane.ids, mid, lane.h)
    return i if i < len(lane.ids) and lane.ids[i] == mid else -1


def _select_origin(path: Path, where: str, params: tuple[str, str]) -> list[tuple[Any, ...]]:
    """(id, upstream, priority) of the stored rows ``where`` selects (own connection)."""
    db = connect(path)
    try:
        return db.execute(f"SELECT id, upstream, priority FROM messages WHERE {where}",
                          params).fetchall()
    finally:
        db.close()


@dataclass(slots=True)
class QueuedMessage:
    """A message handed out by :meth:`ForwardQueue.fetch`; ``id`` is stable across restarts."""

    id: int
    upstream: str
    priority: int
    topic: str
    payload: bytes
    qos: int
    #: the message's properties as the pipeline encoded them (opaque here)
    props: bytes = b""
    created: float = 0.0
    expires_at: float | None = None
    retain: bool = False  # never set upstream; for the uplink client's Outgoing shape


# -- the queue -----------------------------------------------------------------------


class ForwardQueue(QueueBounds, QueueWriter):
    """Durable, bounded, prioritised per-upstream queue; all methods run on the event loop."""

    def __init__(
        self,
        path: Path,
        durability: str = "fsync",
        commit_delay: float = 0.005,
        classes: Mapping[int, ClassLimits] | None = None,
        max_bytes: int = 0,
        now: Callable[[], float] = time.time,
        cache_bytes: int = 8 << 20,
        disk: DiskSpace | None = None,
    ) -> None:
        if durability not in ("fsync", "normal"):
            raise ValueError(f"durability must be 'fsync' or 'normal', got {durability!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.durability = durability
        self.commit_delay = commit_delay
        self.classes = {**DEFAULT_CLASSES, **(classes or {})}
        self.max_bytes = max_bytes
        self.now = now
        self.cache_bytes = cache_bytes
        #: where a damaged database file was moved to (None: it was fine)
        self.quarantined: Path | None = None
        self.drops = {"dropped_oldest": 0, "refused": 0, "expired": 0, "corrupt": 0,
                      "not_stored": 0, "too_large": 0, "disk_full": 0}
        #: the same drops by (metric reason, priority class; -1 unknown): ``queue_full``,
        #: ``expired_by_age``, ``too_large``, ``disk_full``, ``ttl_expired``, ``corrupt``,
        #: ``not_stored`` (the ``/metrics`` series; counted off the hot path)
        self.class_drops: dict[tuple[str, int], int] = {}
        #: the data directory's disk: below its reserve new messages are refused
        self.disk = disk
        self.commits = 0
        self.commit_failures = 0
        self._lanes: dict[tuple[str, int], Lane] = {}
        self._total_bytes = 0
        self._lock = threading.Lock()
        self._db = self._open()
        self._reader = connect(path)
        self._reader.execute("PRAGMA cache_size=-8000")  # KiB
        self._next_id, self._durable_id = self._load()
        # writing
        self._ins: dict[int, Row] = {}  # puts not yet handed to the writer
        self._dels: set[int] = set()  # deletes not yet handed to the writer
        self._writing: dict[int, Row] = {}  # rows of the batch being written
        self._state: dict[str, bytes | None] = {}  # stage() not yet written
        self._state_writing: dict[str, bytes | None] = {}
        self._cache: OrderedDict[int, Row] = OrderedDict()  # committed rows, newest last
        self._cached = 0
        self._pending_bytes = 0
        # one shared future per batch: the pending one, and the one in the writer
        self._pending_fut: asyncio.Future[None] | None = None
        self._busy_fut: asyncio.Future[None] | None = None
        self._busy = False
        self._written_at = 0.0  # time.monotonic() when the last commit ended
        self._timer: asyncio.Handle | None = None  # the armed flush (uvloop: call_later(0)
        self._timer_due = 0.0  # returns a plain Handle, so its due time is kept here)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="forward-queue")
        self._data_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._full = False
        self._repeats = RepeatedLog(log)
        self._flush_started = 0.0
        self._commit_max = 0.0
        #: called in the writer thread inside each commit's transaction with the rows being
        #: inserted (pipeline/protect.py logs batch-chain records atomically with them)
        self.write_hook: Callable[[sqlite3.Connection, list[Row]], None] | None = None
        self.commit_observer: Callable[[float], None] | None = None

    @property
    def next_id(self) -> int:
        """The id the next successful :meth:`put` will return."""
        return self._next_id

    # -- opening, loading, salvage ---------------------------------------------------

    def _prepare(self, db: sqlite3.Connection) -> None:
        prepare(db, self.durability, SCHEMA)
        add_origin(db)
        # multi-row INSERTs stage their rows in a temporary table: keep it off the disk
        db.execute("PRAGMA temp_store=MEMORY")
        # the index is loaded from the table: make sure all of it can be read
        db.execute("SELECT count(*), max(id) FROM messages").fetchone()

    def _open(self) -> sqlite3.Connection:
        """Open (or create) the database; a damaged one is quarantined and salvaged."""
        db, damaged = open_or_move_aside(self.path, self._prepare, self._quarantine)
        if damaged is not None:
            try:
                self._salvage(damaged, db)
            except BaseException:
                db.close()
                raise
        return db

    def _quarantine(self, exc: BaseException) -> Path:
        """Move the damaged file (and its -wal/-shm) aside; never delete it."""
        path = self.path
        target = move_aside(path)
        self.quarantined = target
        log.error("forward queue %s is damaged (%s); moved it to %s, salvaging readable rows",
                  path, exc, target)
        return target

    def _salvage(self, src: Path, db: sqlite3.Connection) -> None:
        """Copy every readable row of the damaged ``src`` into ``db`` (row by row)."""
        found = read_salvageable(src, COLUMNS, PRIORITIES)
        if found.rows or found.state:
            with self._lock:
                db.execute("BEGIN")
                db.executemany(INSERT, found.rows)
                db.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                               found.state)
                db.execute("COMMIT")
        copied, bad, seq, top = len(found.rows), found.bad, found.seq, found.top
        next_seq = max(seq, top) if seq is not None else top + _ID_GAP_UNKNOWN
        db.execute("DELETE FROM sqlite_sequence WHERE name = 'messages'")
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', ?)", (next_seq,))
        self.drops["corrupt"] += bad
        if bad:
            self.class_drops[("corrupt", -1)] = self.class_drops.get(("corrupt", -1), 0) + bad
        log.error(
            "forward queue: salvaged %d message(s) from %s into %s; %d unreadable row(s) "
            "dropped, rows in damaged pages are lost (count unknown)",
            copied, src, self.path, bad,
        )

    def _load(self) -> tuple[int, int]:
        """Build the in-memory index from the table; return (next id, last committed id)."""
        top = 0
        lanes = self._lanes
        for mid, up, prio, size, created, exp in self._db.execute(
            "SELECT id, upstream, priority, size, created, expires_at FROM messages ORDER BY id"
        ):
            lane = lanes.get((up, prio))
            if lane is None:
                lane = lanes[(up, prio)] = Lane()
            lane.append(mid, size, created, exp or 0.0)
            self._total_bytes += size
            top = mid
        row = self._db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        seq = int(row[0]) if row else 0
        return max(seq, top) + 1, top

    # -- producing -------------------------------------------------------------------

    def _lane(self, upstream: str, priority: int) -> Lane:
        lane = self._lanes.get((upstream, priority))
        if lane is None:
            lane = self._lanes[(upstream, priority)] = Lane()
        return lane

    def put(
        self, upstream: str, priority: int, topic: str, payload: bytes, qos: int = 1,
        props: bytes = b"", ttl: float | None = None, origin: str | None = None,
    ) -> int:
        """Queue a message for ``upstream``; return its id. Raises QueueFull when refused.

        ``props`` are the message's encoded properties, stored and handed back as they are;
        ``origin`` is its publisher's client id (what an erasure of that device removes).
        """
        if priority not in self.classes:
            raise ValueError(f"unknown priority class {priority}")
        size = len(topic.encode()) + len(payload) + len(props)
        disk = self.disk
        if disk is not None and disk.low(self._pending_bytes + size) and (
                priority or disk.low(self._pending_bytes + size - disk.reserve // 2)):
            # alarms (class 0) may use half of the reserve; nothing else enters it
            self._count_drop("disk_full", priority)
            raise QueueFull(disk.why())
        now = self.now()
        lane = self._lane(upstream, priority)
        limits = self.classes[priority]
        self._check_class(upstream, priority, lane, limits, size, now)
        if self.max_bytes and self._total_bytes + size > self.max_bytes:
            self._make_room(priority, size)
        mid = self._next_id
        self._next_id += 1
        expires = now + ttl if ttl is not None else None
        self._ins[mid] = (mid, upstream, priority, topic, bytes(payload), qos, props, now,
                          expires, size, origin)
        lane.append(mid, size, now, expires or 0.0)
        self._total_bytes += size
        self._pending_bytes += size
        self._schedule()
        return mid

    def _count_drop(self, reason: str, prio: int, kind: str | None = None) -> None:
        """Count a drop under ``reason`` (``drops``) and ``(kind or reason, prio)``."""
        if reason in self.drops:
            self.drops[reason] += 1
        key = (kind or _KINDS.get(reason, reason), prio)
        self.class_drops[key] = self.class_drops.get(key, 0) + 1

    def _forget(self, mid: int, size: int, reason: str, prio: int = -1,
                kind: str | None = None) -> None:
        """Delete a message that left the index (dropped or acked); count ``reason``."""
        self._total_bytes -= size
        if reason:
            self._count_drop(reason, prio, kind)
        if self._ins.pop(mid, None) is not None:
            self._pending_bytes -= size  # never written: nothing to delete
            return
        if self._cache.pop(mid, None) is not None:
            self._cached -= size + ROW_OVERHEAD
        self._dels.add(mid)
        self._schedule_deletes()

    # -- consuming -------------------------------------------------------------------

    def fetch(self, upstream: str, limit: int) -> list[QueuedMessage]:
        """Up to ``limit`` committed messages for ``upstream`` not yet handed out, in drain
        order (class 0 newest first, then classes 1..3 oldest first)."""
        now = self.now()
        picked: list[tuple[int, int, Entry]] = []  # id, priority, entry
        for prio in PRIORITIES:
            if len(picked) >= limit:
                break
            lane = self._lanes.get((upstream, prio))
            if lane is None or not lane.ready:
                continue
            lim = self.classes[prio]
            if lim.max_age and lim.policy == "drop_oldest":
                self._trim_age(upstream, prio, lane, now - lim.max_age)
            self._take(upstream, prio, lane, limit - len(picked), now, picked)
        return self._read(upstream, picked)

    def _take(
        self, up: str, prio: int, lane: Lane, n: int, now: float,
        out: list[tuple[int, int, Entry]],
    ) -> None:
        ids, durable = lane.ids, self._durable_id
        end = bisect_right(ids, durable, lane.h)  # committed ready ids are ids[h:end]
        if prio == 0:  # alarms: newest first
            i = end
            while i > lane.h and n > 0:
                i -= 1
                mid, e = lane.entry(i)
                if self._expired(lane, mid, e, now, prio):
                    continue
                lane.inflight[mid] = e
                out.append((mid, prio, e))
                n -= 1
            lane.cut(i, end)
        else:
            i = lane.h
            while i < end and n > 0:
                mid, e = lane.entry(i)
                i += 1
                if self._expired(lane, mid, e, now, prio):
                    continue
                lane.inflight[mid] = e
                out.append((mid, prio, e))
                n -= 1
            lane.cut(lane.h, i)

    def _expired(self, lane: Lane, mid: int, e: Entry, now: float, prio: int = -1) -> bool:
        if e[2] and e[2] <= now:
            lane.msgs -= 1
            lane.bytes -= e[0]
            self._forget(mid, e[0], "expired", prio)
            return True
        return False

    def _read(self, up: str, picked: list[tuple[int, int, Entry]]) -> list[QueuedMessage]:
        """Payloads of ``picked`` (cache first, then SQLite by id) as QueuedMessages."""
        out: list[QueuedMessage | None] = []
        missing: list[int] = []  # positions in ``out`` still to read from SQLite
        cache = self._cache
        uncached = 0
        for mid, prio, e in picked:
            row = cache.pop(mid, None)
            if row is None:
                missing.append(len(out))
                out.append(None)
            else:
                uncached += e[0] + ROW_OVERHEAD
                out.append(QueuedMessage(
                    mid, up, prio, row[3], row[4], row[5], row[6], e[1],
                    e[2] or None,
                ))
        self._cached -= uncached
        if not missing:
            return out  # type: ignore[return-value]  # no None left
        rows = self._select([picked[i][0] for i in missing])
        for i in missing:
            mid, prio, e = picked[i]
            row = rows.get(mid)
            if row is None or not (
                isinstance(row[1], str) and isinstance(row[2], bytes) and row[3] in (0, 1, 2)
                and isinstance(row[4], bytes)
            ):
                lane = self._lanes[(up, prio)]
                del lane.inflight[mid]
                lane.msgs -= 1
                lane.bytes -= e[0]
                self._forget(mid, e[0], "corrupt", prio)
                log.error("forward queue %s: message %d is unreadable, dropped", self.path, mid)
                continue
            out[i] = QueuedMessage(
                mid, up, prio, row[1], row[2], row[3], row[4], e[1], e[2] or None,
            )
        return [m for m in out if m is not None]

    def _select(self, ids: list[int]) -> dict[int, tuple[Any, ...]]:
        """Rows ``(id, topic, payload, qos, props)`` of ``ids`` that can be read."""
        rows: dict[int, tuple[Any, ...]] = {}
        for k in range(0, len(ids), _READ_CHUNK):
            chunk = ids[k:k + _READ_CHUNK]
            sql = f"{_READ_SQL} IN ({','.join('?' * len(chunk))})"
            try:
                for r in self._reader.execute(sql, chunk):
                    rows[r[0]] = r
            except sqlite3.DatabaseError as exc:
                log.error("forward queue %s: reading messages failed (%s)", self.path, exc)
                for mid in chunk:
                    try:
                        r = self._reader.execute(f"{_READ_SQL} = ?", (mid,)).fetchone()
                    except sqlite3.DatabaseError:
                        r = None
                    if r is not None:
                        rows[mid] = r
        return rows

    def ack(self, upstream: str, ids: Iterable[int]) -> None:
        """The upstream acknowledged ``ids``: delete them (group-committed)."""
        lanes = [
            lane for p in PRIORITIES
            if (lane := self._lanes.get((upstream, p))) is not None and lane.inflight
        ]
        ins, cache, dels = self._ins, self._cache, self._dels
        freed = uncached = 0
        for mid in ids:
            for lane in lanes:
                e = lane.inflight.pop(mid, None)
                if e is not None:
                    size = e[0]
                    lane.msgs -= 1
                    lane.bytes -= size
                    freed += size
                    if ins.pop(mid, None) is not None:  # never written: nothing to delete
                        self._pending_bytes -= size
                    else:
                        if cache.pop(mid, None) is not None:
                            uncached += size + ROW_OVERHEAD
                        dels.add(mid)
                    break
        self._total_bytes -= freed
        self._cached -= uncached
        if dels:
            self._schedule_deletes()

    def drop(self, upstream: str, ids: Iterable[int], reason: str) -> None:
        """Delete in-flight ``ids`` that can never be delivered; count them as ``reason``
        (a key of ``drops``, e.g. ``too_large``)."""
        if reason not in self.drops:
            raise ValueError(f"unknown drop reason {reason!r}")
        want = set(ids)
        for prio in PRIORITIES:
            lane = self._lanes.get((upstream, prio))
            if lane is None or not lane.inflight:
                continue
            for mid in sorted(want & lane.inflight.keys()):
                size = lane.inflight.pop(mid)[0]
                lane.msgs -= 1
                lane.bytes -= size
                self._forget(mid, size, reason, prio)

    def requeue(self, upstream: str, ids: Iterable[int]) -> None:
        """Hand in-flight ``ids`` out again (the uplink dropped before their PUBACK)."""
        want = set(ids)
        for prio in PRIORITIES:
            lane = self._lanes.get((upstream, prio))
            if lane is None or not lane.inflight:
                continue
            back = [(m, lane.inflight.pop(m)) for m in want & lane.inflight.keys()]
            if back:
                lane.merge(back)
                self._wake([upstream])

    def has_data(self, upstream: str) -> bool:
        """True when ``fetch(upstream, ...)`` may return something now."""
        for prio in PRIORITIES:
            lane = self._lanes.get((upstream, prio))
            if lane is not None and lane.ready and lane.ids[lane.h] <= self._durable_id:
                return True
        return False

    async def wait_for_data(self, upstream: str) -> None:
        """Return once committed messages for ``upstream`` are ready to fetch."""
        while not self.has_data(upstream):
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            fut: asyncio.Future[None] = loop.create_future()
            waiters = [w for w in self._data_waiters.get(upstream, ()) if not w.done()]
            self._data_waiters[upstream] = [*waiters, fut]
            await fut

    def in_flight(self, upstream: str) -> list[int]:
        """Ids handed out for ``upstream`` and not yet acked or requeued."""
        return sorted(m for (u, _), lane in self._lanes.items() if u == upstream
                      for m in lane.inflight)

    # -- erasure ---------------------------------------------------------------------

    async def erase_origin(self, origin: str) -> int:
        """Take every queued message ``origin`` published out of the queue (rows stored
        before the queue kept publishers: those on a topic with the id as a level); their
        rows are deleted with the next commit. How many (in flight ones included: a late
        ack of one finds nothing)."""
        found = await self._origin_ids(origin)
        n = 0
        for mid, (up, prio) in sorted(found.items()):
            lane = self._lanes.get((up, prio))
            if lane is None:
                continue
            e = lane.inflight.pop(mid, None)
            if e is not None:
                size = e[0]
                lane.msgs -= 1
                lane.bytes -= size
            else:
                i = _ready_at(lane, mid)
                if i < 0:
                    continue  # acked or dropped meanwhile
                size = lane.sizes[i]
                lane.remove_range(mid, mid)
            self._forget(mid, size, "")
            n += 1
        return n

    async def count_origin(self, origin: str) -> int:
        """How many queued messages ``origin`` published (as ``erase_origin`` sees them)."""
        found = await self._origin_ids(origin)
        return sum(1 for mid, key in found.items() if (lane := self._lanes.get(key))
                   is not None and (mid in lane.inflight or _ready_at(lane, mid) >= 0))

    async def _origin_ids(self, origin: str) -> dict[int, tuple[str, int]]:
        """id -> (upstream, class) of rows ``origin`` published: stored (read in a thread)
        and not yet committed (the cache holds only committed rows: not scanned)."""
        level = f"/{origin}/"

        def mine(r: Row) -> bool:
            return r[10] == origin or (r[10] is None and level in f"/{r[3]}/")

        found = {r[0]: (r[1], r[2]) for rows in (self._writing, self._ins)
                 for r in rows.values() if mine(r)}
        loop = asyncio.get_running_loop()
        stored = await loop.run_in_executor(None, _select_origin, self.path, ORIGIN_WHERE,
                                            (origin, level))
        found.update({mid: (up, prio) for mid, up, prio in stored})
        return found

    # -- counters, closing -----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per upstream and class: messages, bytes, in flight, oldest age (s); drops by
        reason; commits, commit failures, bytes not yet committed."""
        now = self.now()
        ups: dict[str, dict[int, dict[str, Any]]] = {}
        for (up, prio), lane in sorted(self._lanes.items()):
            oldest = lane.oldest_created()
            ups.setdefault(up, {})[prio] = {
                "messages": lane.msgs, "bytes": lane.bytes, "in_flight": len(lane.inflight),
                "oldest_age": round(now - oldest, 3) if oldest is not None else 0.0,
            }
        return {
            "upstreams": ups,
            "messages": sum(lane.msgs for lane in self._lanes.values()),
            "bytes": self._total_bytes,
            "drops": dict(self.drops),
            "commits": self.commits,
            "commit_failures": self.commit_failures,
            "pending_bytes": self._pending_bytes,
            "quarantined": str(self.quarantined) if self.quarantined else None,
        }

    async def close(self) -> None:
        """Commit everything pending, stop the writer and close the database."""
        for _ in range(100):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._ins and not self._dels and not self._state and not self._busy:
                break
            self._flush()
            fut = self._busy_fut
            if fut is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(fut), 10)
                except (QueueError, TimeoutError):
                    break
        self._writer.shutdown(wait=True)
        self._reader.close()
        with self._lock:
            self._db.close()
