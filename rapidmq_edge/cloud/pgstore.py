"""The consumer state and sink in PostgreSQL (asyncpg): shared by every consumer of a group.

Same tables as :mod:`.state` (PostgreSQL types). Writes are idempotent, keyed by the
gateway's message id (``ON CONFLICT DO NOTHING``); one chunk is one transaction (rows from
``unnest`` arrays: one statement per table). ``cloud_control`` holds every accepted batch
message (signed header + manifest): the audit chain that ``audit verify --db`` checks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..crypto.batch import ChainEntry
from .state import Pending, Restored, Step, digest, read_chain_rows, report_key

__all__ = ["PgStore", "SCHEMA", "read_chain_pg"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, gateway TEXT NOT NULL,
    topic TEXT NOT NULL, payload BYTEA NOT NULL, batch BIGINT NOT NULL,
    encrypted BOOLEAN NOT NULL, device_e2e BOOLEAN NOT NULL,
    received TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    verdict TEXT NOT NULL DEFAULT 'verified', proof TEXT NOT NULL DEFAULT '',
    consumer TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS cloud_control (pos BIGSERIAL PRIMARY KEY,
    digest BYTEA NOT NULL UNIQUE, kind TEXT NOT NULL, gateway TEXT NOT NULL, seq BIGINT,
    payload BYTEA NOT NULL, received TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS cloud_control_chain ON cloud_control (kind, gateway, seq);
CREATE TABLE IF NOT EXISTS cloud_pending (consumer TEXT NOT NULL, id TEXT NOT NULL,
    topic TEXT NOT NULL, payload BYTEA NOT NULL, arrived TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, id));
CREATE INDEX IF NOT EXISTS cloud_pending_id ON cloud_pending (id);
CREATE TABLE IF NOT EXISTS cloud_reports (pos BIGSERIAL PRIMARY KEY, key TEXT UNIQUE,
    kind TEXT NOT NULL, detail TEXT NOT NULL, message_id TEXT, gateway TEXT, batch BIGINT,
    consumer TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS cloud_reports_mid ON cloud_reports (message_id);
CREATE TABLE IF NOT EXISTS cloud_consumers (consumer TEXT PRIMARY KEY,
    beat TIMESTAMPTZ NOT NULL DEFAULT now());
"""

#: how long a skipped ``cloud_control.pos`` is asked for again, and how many at most per read
GAP_WAIT = 30.0
MAX_GAPS = 1_000
_LOCK = 0x726D71  # advisory lock: concurrent CREATE TABLE IF NOT EXISTS can collide


class PgStore:
    """One asyncpg connection; ``shared``: the group's consumers see each other's headers."""

    shared = True

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        #: positions below the cursor not seen yet (pos -> when first missed): see
        #: :meth:`control_since`
        self._gaps: dict[int, float] = {}

    @classmethod
    async def connect(cls, dsn: str) -> PgStore:
        """Connect and create the tables if needed."""
        import asyncpg

        conn = await asyncpg.connect(dsn)
        async with conn.transaction():
            await conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK})")
            await conn.execute(SCHEMA)
        return cls(conn)

    async def restore(self, consumer: str, horizon: float) -> Restored:
        async with self.conn.transaction(isolation="repeatable_read"):  # one snapshot
            control = [(r[0], bytes(r[1])) for r in await self.conn.fetch(
                "SELECT kind, payload FROM cloud_control WHERE received >= "
                "now() - make_interval(secs => $1) OR pos IN (SELECT DISTINCT ON (gateway) "
                "pos FROM cloud_control WHERE kind = 'session' ORDER BY gateway, pos DESC) "
                "ORDER BY pos", horizon)]
            pending = [(r[0], r[1], bytes(r[2])) for r in await self.conn.fetch(
                "SELECT id, topic, payload FROM cloud_pending WHERE consumer = $1 "
                "ORDER BY arrived", consumer)]
            cursor = int(await self.conn.fetchval(
                "SELECT COALESCE(MAX(pos), 0) FROM cloud_control"))
            seen = {r[0] for r in await self.conn.fetch(
                "SELECT pos FROM cloud_control WHERE pos > $1", cursor - MAX_GAPS)}
        now = time.monotonic()  # positions taken by transactions still open: gaps
        self._gaps = {p: now for p in range(max(1, cursor - MAX_GAPS + 1), cursor + 1)
                      if p not in seen}
        await self._beat(consumer)
        return Restored(control, pending, cursor)

    async def old_sessions(self, horizon: float, after: int,
                           limit: int) -> list[tuple[int, bytes]]:
        return [(int(r[0]), bytes(r[1])) for r in await self.conn.fetch(
            "SELECT pos, payload FROM cloud_control WHERE kind = 'session' AND received < "
            "now() - make_interval(secs => $1) AND pos > $2 ORDER BY pos LIMIT $3",
            horizon, after, limit)]

    async def _beat(self, consumer: str) -> None:
        await self.conn.execute(
            "INSERT INTO cloud_consumers VALUES ($1, now()) "
            "ON CONFLICT (consumer) DO UPDATE SET beat = now()", consumer)

    async def written(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        rows = await self.conn.fetch("SELECT id FROM messages WHERE id = ANY($1::text[])",
                                     list(ids))
        return {r[0] for r in rows}

    async def unaccounted(self, ids: Sequence[str]) -> list[str]:
        rows = await self.conn.fetch(
            "SELECT x FROM unnest($1::text[]) AS x WHERE NOT EXISTS "
            "(SELECT 1 FROM messages m WHERE m.id = x) AND NOT EXISTS "
            "(SELECT 1 FROM cloud_pending p WHERE p.id = x) AND NOT EXISTS "
            "(SELECT 1 FROM cloud_reports r WHERE r.message_id = x)", list(ids))
        return [r[0] for r in rows]

    async def control_since(self, cursor: int) -> tuple[list[tuple[str, bytes]], int]:
        """Headers stored after ``cursor``, and the new cursor. ``pos`` is a sequence taken at
        INSERT and seen at COMMIT: with several consumers committing, pos 41 can become
        visible after pos 42 was read. Every pos skipped over is kept as a gap and asked for
        again (for :data:`GAP_WAIT` s: a rolled back or conflicting insert never fills it)."""
        gaps = self._gaps
        rows = await self.conn.fetch(
            "SELECT pos, kind, payload FROM cloud_control WHERE pos > $1 "
            "OR pos = ANY($2::bigint[]) ORDER BY pos", cursor, list(gaps))
        now = time.monotonic()
        out = []
        for pos, kind, payload in rows:
            if gaps.pop(pos, None) is None and pos > cursor:
                for missed in range(max(cursor + 1, pos - MAX_GAPS), pos):
                    gaps[missed] = now
                cursor = pos
            out.append((kind, bytes(payload)))
        for pos in [p for p, t in gaps.items() if now - t > GAP_WAIT]:
            del gaps[pos]
        return out, cursor

    async def commit(self, consumer: str, step: Step) -> int:
        c = self.conn
        n = 0
        async with c.transaction():
            if step.verified:
                v = step.verified
                status = await c.execute(
                    "INSERT INTO messages (id, gateway, topic, payload, batch, encrypted, "
                    "device_e2e, verdict, proof, consumer) SELECT i, g, t, p, b, e, d, "
                    "'verified', pr, $8 FROM unnest($1::text[], $2::text[], $3::text[], "
                    "$4::bytea[], $5::bigint[], $6::bool[], $7::bool[], $9::text[]) "
                    "AS x(i, g, t, p, b, e, d, pr) ON CONFLICT (id) DO NOTHING",
                    [x.message_id for x in v], [x.gateway_id for x in v], [x.topic for x in v],
                    [x.payload for x in v], [x.batch for x in v], [x.encrypted for x in v],
                    [x.device_e2e for x in v], consumer, [x.proof for x in v])
                n = int(status.rsplit(" ", 1)[-1])
            if step.reports:
                r = step.reports
                await c.execute(
                    "INSERT INTO cloud_reports (key, kind, detail, message_id, gateway, batch, "
                    "consumer) SELECT * , $7 FROM unnest($1::text[], $2::text[], $3::text[], "
                    "$4::text[], $5::text[], $6::bigint[]) ON CONFLICT (key) DO NOTHING",
                    [report_key(x) for x in r], [x.kind for x in r], [x.detail for x in r],
                    [x.message_id for x in r], [x.gateway_id for x in r], [x.batch for x in r],
                    consumer)
            if step.control:
                k = step.control
                await c.execute(
                    "INSERT INTO cloud_control (digest, kind, gateway, seq, payload) "
                    "SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bigint[], "
                    "$5::bytea[]) ON CONFLICT (digest) DO NOTHING",
                    [digest(x[1]) for x in k], [x[0] for x in k], [x[2] for x in k],
                    [x[3] for x in k], [x[1] for x in k])
            if step.stage:
                s = step.stage
                await c.execute(
                    "INSERT INTO cloud_pending (consumer, id, topic, payload) SELECT $1, * "
                    "FROM unnest($2::text[], $3::text[], $4::bytea[]) "
                    "ON CONFLICT DO NOTHING",
                    consumer, [x[0] for x in s], [x[1] for x in s], [x[2] for x in s])
            if step.unstage:
                await c.execute(
                    "DELETE FROM cloud_pending WHERE consumer = $1 AND id = ANY($2::text[])",
                    consumer, step.unstage)
            await self._beat(consumer)
        return n

    async def adopt(self, consumer: str, lease: float) -> list[Pending]:
        async with self.conn.transaction():
            await self._beat(consumer)
            stale = [r[0] for r in await self.conn.fetch(
                "DELETE FROM cloud_consumers WHERE beat < now() - make_interval(secs => $1) "
                "AND consumer <> $2 RETURNING consumer", lease, consumer)]
            if not stale:
                return []
            rows = await self.conn.fetch(
                "DELETE FROM cloud_pending WHERE consumer = ANY($1::text[]) "
                "RETURNING id, topic, payload", stale)
            out = [(r[0], r[1], bytes(r[2])) for r in rows]
            await self.conn.execute(
                "INSERT INTO cloud_pending (consumer, id, topic, payload) SELECT $1, * "
                "FROM unnest($2::text[], $3::text[], $4::bytea[]) ON CONFLICT DO NOTHING",
                consumer, [x[0] for x in out], [x[1] for x in out], [x[2] for x in out])
        return out

    async def close(self) -> None:
        await self.conn.close()


async def read_chain_pg(dsn: str, gateway_id: str) -> list[ChainEntry]:
    """The stored batches of one gateway in seq order (for ``audit verify --db``)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT seq, payload FROM cloud_control WHERE kind = 'batch' AND gateway = $1 "
            "ORDER BY seq", gateway_id)
    finally:
        await conn.close()
    return read_chain_rows((int(r[0]), bytes(r[1])) for r in rows)
