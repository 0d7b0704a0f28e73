"""The gateway's local, append-only batch chain: a SQLite file (the "immutable message log").

:class:`BatchLog` wraps the sans-I/O :class:`~rapidmq_edge.crypto.batch.BatchBuilder`:

* every added message's leaf hash is committed to ``pending`` before ``add`` returns, so a
  ``kill -9`` loses no leaf: on reopen the open batch is rebuilt from ``pending``;
* sealing signs the batch, then in **one transaction** appends it to ``batches`` and deletes the
  leaves it covers. A batch is therefore either wholly present or absent (SQLite atomic commit;
  WAL journal) — a torn last batch cannot exist, and the chain resumes from the last committed
  root. Publish a batch upstream only after :meth:`BatchLog.seal` returned it (committed first).

Schema::

    batches(pos INTEGER PRIMARY KEY, seq INTEGER, signed BLOB, leaves BLOB)   -- leaves: n*32 B
    pending(id INTEGER PRIMARY KEY, message_id TEXT, leaf BLOB)
    meta(k TEXT PRIMARY KEY, v TEXT)                                          -- gateway_id
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .batch import (
    GENESIS_ROOT,
    BatchBuilder,
    ChainEntry,
    SignedBatch,
    message_leaf,
    parse_signed_header,
)
from .errors import BatchError, MalformedError
from .keys import GatewayIdentity

__all__ = ["BatchLog", "read_chain"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    pos INTEGER PRIMARY KEY, seq INTEGER NOT NULL, signed BLOB NOT NULL, leaves BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, leaf BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.executescript(_SCHEMA)
    return db


def read_chain(path: Path) -> Iterator[ChainEntry]:
    """Stored batches in log order (read-only; for ``audit verify``)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no batch chain at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for pos, signed, leaves in db.execute(
            "SELECT pos, signed, leaves FROM batches ORDER BY pos"
        ):
            yield ChainEntry(int(pos), bytes(signed), bytes(leaves))
    finally:
        db.close()


class BatchLog:
    """Durable batch builder + chain store for one gateway (single writer)."""

    def __init__(
        self,
        path: Path,
        identity: GatewayIdentity,
        gateway_id: str,
        *,
        batch_size: int = 256,
        clock: Callable[[], float] = time.time,
        synchronous: str = "NORMAL",
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.path = Path(path)
        self.batch_size = batch_size
        self._clock = clock
        self._db = _connect(self.path, synchronous)
        row = self._db.execute("SELECT v FROM meta WHERE k='gateway_id'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('gateway_id', ?)", (gateway_id,))
        elif row[0] != gateway_id:
            raise BatchError(f"{path} is the chain of gateway {row[0]!r}, not {gateway_id!r}")
        next_seq, prev_root, next_pos = 0, GENESIS_ROOT, 0
        last = self._db.execute(
            "SELECT pos, signed FROM batches ORDER BY pos DESC LIMIT 1"
        ).fetchone()
        if last is not None:
            try:
                head = parse_signed_header(bytes(last[1]))[0]
            except MalformedError as exc:
                raise BatchError(f"{path}: last batch unreadable ({exc})") from None
            next_seq, prev_root, next_pos = head.seq + 1, head.root, int(last[0]) + 1
        self._next_pos = next_pos
        self.builder = BatchBuilder(
            identity, gateway_id, next_seq=next_seq, prev_root=prev_root, clock=clock
        )
        self._pending_ids: list[int] = []
        for pid, mid, leaf in self._db.execute(
            "SELECT id, message_id, leaf FROM pending ORDER BY id"
        ):
            self.builder.add_leaf(mid, bytes(leaf))
            self._pending_ids.append(int(pid))
        self.pending_since: float | None = clock() if self._pending_ids else None

    @property
    def pending(self) -> int:
        """Messages added but not yet in a sealed batch."""
        return len(self.builder)

    @property
    def next_seq(self) -> int:
        """Sequence number the next batch will get."""
        return self.builder.next_seq

    @property
    def head_root(self) -> bytes:
        """Root of the last sealed batch (32 zero bytes before the first)."""
        return self.builder.prev_root

    def add(self, message_id: str, topic: str, payload: bytes) -> SignedBatch | None:
        """Log one forwarded message; seals and returns a batch when ``batch_size`` is reached."""
        out = self.add_many([(message_id, topic, payload)])
        return out[0] if out else None

    def add_many(self, items: Iterable[tuple[str, str, bytes]]) -> list[SignedBatch]:
        """Log messages in one transaction; returns the batches sealed meanwhile."""
        sealed: list[SignedBatch] = []
        rows = [(mid, message_leaf(mid, topic, payload)) for mid, topic, payload in items]
        i = 0
        while i < len(rows):
            take = rows[i : i + self.batch_size - len(self.builder)]
            i += len(take)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for mid, leaf in take:
                    cur = self._db.execute(
                        "INSERT INTO pending (message_id, leaf) VALUES (?, ?)", (mid, leaf)
                    )
                    self._pending_ids.append(int(cur.lastrowid or 0))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back (disk full)
                    self._db.execute("ROLLBACK")
                self._pending_ids = self._pending_ids[: len(self.builder)]
                raise
            for mid, leaf in take:
                self.builder.add_leaf(mid, leaf)
            if self.pending_since is None:
                self.pending_since = self._clock()
            if len(self.builder) >= self.batch_size:
                batch = self.seal()
                if batch is not None:
                    sealed.append(batch)
        return sealed

    def seal_due(self, max_age: float) -> SignedBatch | None:
        """Seal the open batch if its first message is ``max_age`` seconds old (timer use)."""
        if self.pending_since is not None and self._clock() - self.pending_since >= max_age:
            return self.seal()
        return None

    def seal(self) -> SignedBatch | None:
        """Sign and durably append the open batch (None if empty)."""
        prev = (self.builder.next_seq, self.builder.prev_root)
        batch = self.builder.seal()
        if batch is None:
            return None
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO batches (pos, seq, signed, leaves) VALUES (?, ?, ?, ?)",
                (self._next_pos, batch.header.seq, batch.signed, b"".join(batch.leaves)),
            )
            if self._pending_ids:
                self._db.execute("DELETE FROM pending WHERE id <= ?", (self._pending_ids[-1],))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            # put the leaves back so nothing is lost; the batch was not stored
            self.builder.next_seq, self.builder.prev_root = prev
            last = len(batch.leaves) - 1
            for i, leaf in enumerate(batch.leaves):
                self.builder.add_leaf(
                    batch.header.first_id if i < last else batch.header.last_id, leaf
                )
            raise
        self._next_pos += 1
        self._pending_ids = []
        self.pending_since = None
        return batch

    def entries(self) -> Iterator[ChainEntry]:
        """Stored batches in log order."""
        for pos, signed, leaves in self._db.execute(
            "SELECT pos, signed, leaves FROM batches ORDER BY pos"
        ).fetchall():
            yield ChainEntry(int(pos), bytes(signed), bytes(leaves))

    def close(self) -> None:
        """Close the database (pending leaves stay for the next open)."""
        self._db.close()

    def __enter__(self) -> BatchLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
