"""Group commit of the forward queue: shared commit futures, eager flush of large groups,
deletes riding along with puts, multi-row inserts, and uvloop's timers (real SQLite)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
import uvloop

from rapidmq_edge.store.forward_queue import DELETE_DELAY, ForwardQueue

pytestmark = pytest.mark.timeout(60)


def _stored_ids(path: Path) -> list[int]:
    """Ids committed to the file, read through a separate connection."""
    with sqlite3.connect(path) as db:
        return [r[0] for r in db.execute("SELECT id FROM messages ORDER BY id")]


def test_commit_future_is_shared_per_group(tmp_path: Path) -> None:
    async def main() -> None:
        q = ForwardQueue(tmp_path / "q.db", commit_delay=0.05)
        q.put("u", 2, "t", b"a")
        first = q.commit_future()
        q.put("u", 2, "t", b"b")
        assert first is not None and q.commit_future() is first  # one future per group
        await first
        assert q.commit_future() is None
        q.put("u", 2, "t", b"c")
        third = q.commit_future()
        assert third is not None and third is not first
        await third
        await q.close()

    asyncio.run(main())


def test_acks_are_not_waited_for_and_ride_along_with_puts(tmp_path: Path) -> None:
    path = tmp_path / "q.db"

    async def main() -> None:
        q = ForwardQueue(path, commit_delay=0.001)
        ids = [q.put("u", 2, "t", b"%d" % i) for i in range(3)]
        fut = q.commit_future()
        assert fut is not None
        await fut
        assert [m.id for m in q.fetch("u", 10)] == ids
        q.ack("u", ids[:2])
        assert q.commit_future() is None  # nobody waits for a delete
        assert _stored_ids(path) == ids  # not written on its own at once ...
        t0 = time.monotonic()
        new = q.put("u", 2, "t", b"new")
        fut = q.commit_future()
        assert fut is not None
        await fut
        assert time.monotonic() - t0 < DELETE_DELAY
        assert _stored_ids(path) == [ids[2], new]  # ... but with the next group of puts
        q.ack("u", [ids[2]])
        await asyncio.sleep(DELETE_DELAY + 0.3)
        assert _stored_ids(path) == [new]  # and without puts, after DELETE_DELAY
        await q.close()

    asyncio.run(main())


def test_temporary_tables_stay_in_memory(tmp_path: Path) -> None:
    """Multi-row INSERTs stage rows in a temporary table; on disk it would double the
    bytes written per message (SD-card wear)."""

    async def main() -> None:
        q = ForwardQueue(tmp_path / "q.db")
        assert q._db.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
        await q.close()

    asyncio.run(main())


def test_big_group_in_multi_row_inserts(tmp_path: Path) -> None:
    """One big group (1,500 rows: several multi-row INSERT statements): every row is
    stored intact and in order."""
    path = tmp_path / "q.db"
    n = 1500

    async def main() -> list[int]:
        q = ForwardQueue(path, commit_delay=0.001)
        ids = [q.put("u", i % 4, f"t/{i}", b"p%d" % i, 1, b"c%d" % i)
               for i in range(n)]
        fut = q.commit_future()
        assert fut is not None
        await fut
        assert q.stats()["commits"] == 1
        await q.close()
        return ids

    ids = asyncio.run(main())
    assert _stored_ids(path) == ids

    async def reread() -> None:
        q = ForwardQueue(path)
        got = {m.id: m for m in q.fetch("u", 10_000)}
        assert sorted(got) == ids
        for i, mid in enumerate(ids):
            m = got[mid]
            assert (m.topic, m.payload, m.priority) == (f"t/{i}", b"p%d" % i, i % 4)
            assert m.props == b"c%d" % i
        await q.close()

    asyncio.run(reread())


def test_put_while_a_commit_completes_under_uvloop(tmp_path: Path) -> None:
    """uvloop's call_later(0) returns a plain Handle (no ``when()``): a put between the end
    of a commit and the flush it armed must still be queued (regression)."""

    async def main() -> None:
        q = ForwardQueue(tmp_path / "q.db", commit_delay=0.001)
        q.put("u", 2, "t", b"a")
        first = q.commit_future()
        assert first is not None
        deadline = time.monotonic() + 5
        while not q._busy:  # the first group is being written
            assert time.monotonic() < deadline
            await asyncio.sleep(0.0002)
        q.put("u", 2, "t", b"b")  # arrives during the commit: flushed right after it
        errors: list[BaseException] = []

        def during(_f: object) -> None:  # runs after the commit, before that flush
            try:
                q.put("u", 2, "t", b"c")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        first.add_done_callback(during)
        await first
        await asyncio.sleep(0)
        fut = q.commit_future()
        if fut is not None:
            await asyncio.wait_for(fut, 5)
        assert not errors, errors
        assert [m.payload for m in q.fetch("u", 10)] == [b"a", b"b", b"c"]
        await q.close()

    uvloop.run(main())
