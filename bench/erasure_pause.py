"""The write-path pause of an erasure on a running gateway, by store size
(``store/erase.py`` ``scrub_live``, as ``gateway/erasure_live.py`` runs it).

A real ``ForwardQueue`` (``durability = "fsync"``) holds ``--rows`` queued messages of
``--payload`` bytes from 1,000 devices; one device's rows are erased (``erase_origin``,
then the deletes with secure_delete and a WAL checkpoint, with and without ``VACUUM``, in
the queue's writer thread) while a publisher keeps putting one message every 2 ms and
awaiting its commit (what a device's PUBACK waits for). Printed per size and mode: the
file size, how long the writer was held, and the publisher's longest commit wait during
the erasure next to its longest wait over the same number of commits just before it (the
reference), plus ``erase_origin``'s wall time (its SELECT runs in a thread).

    .venv/bin/python bench/erasure_pause.py [--rows 10000 100000] [--payload 100]

prints one JSON document (milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from rapidmq_edge.store.erase import scrub_live
from rapidmq_edge.store.forward_queue import ORIGIN_WHERE, ForwardQueue


async def _fill(q: ForwardQueue, rows: int, payload: bytes) -> None:
    for i in range(rows):
        q.put("cloud", 2, f"sensors/dev{i % 1000}/t", payload, origin=f"dev{i % 1000}")
        if i % 5000 == 4999:
            fut = q.commit_future()
            if fut is not None:
                await fut
    fut = q.commit_future()
    if fut is not None:
        await fut


async def _publisher(q: ForwardQueue, stop: asyncio.Event, waits: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        q.put("cloud", 2, "sensors/steady/t", b"s", origin="steady")
        fut = q.commit_future()
        if fut is not None:
            await fut
        waits.append(time.perf_counter() - t)
        await asyncio.sleep(0.002)


async def measure(path: Path, rows: int, payload: int, vacuum: bool) -> dict[str, object]:
    q = ForwardQueue(path, durability="fsync")
    try:
        await _fill(q, rows, b"p" * payload)
        size = sum(p.stat().st_size for p in path.parent.iterdir())
        before: list[float] = []
        stop = asyncio.Event()
        pub = asyncio.create_task(_publisher(q, stop, before))
        await asyncio.sleep(1.0)
        stop.set()
        await pub
        during: list[float] = []
        stop = asyncio.Event()
        pub = asyncio.create_task(_publisher(q, stop, during))
        await asyncio.sleep(0.05)
        t = time.perf_counter()
        erased = await q.erase_origin("dev7")
        loop_ms = (time.perf_counter() - t) * 1000
        done = await scrub_live(
            q, path, [("DELETE FROM messages WHERE " + ORIGIN_WHERE, ("dev7", "/dev7/"))],
            None if vacuum else 0)
        await asyncio.sleep(0.05)
        stop.set()
        await pub
        ref = sorted(before)[-len(during):] if len(before) >= len(during) else before
        return {
            "rows": rows, "vacuum": done.vacuumed, "files_mb": round(size / 1e6, 2),
            "erased_rows": erased, "deleted_rows": done.counts[0],
            "wal_emptied": done.wal_emptied, "writer_held_ms": round(done.held * 1000, 1),
            "erase_origin_ms": round(loop_ms, 1),
            "commit_wait_max_ms": {"during_erasure": round(max(during) * 1000, 1),
                                   "before_reference": round(max(ref) * 1000, 1)},
        }
    finally:
        await q.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--payload", type=int, default=100)
    a = ap.parse_args()
    load = os.getloadavg()
    out = []
    for rows in a.rows:
        for vacuum in (False, True):
            with tempfile.TemporaryDirectory() as d:
                out.append(asyncio.run(measure(Path(d) / "forward.db", rows, a.payload,
                                               vacuum)))
    print(json.dumps({"bench": "erasure_pause", "payload": a.payload, "sizes": out,
                      "load_average": {"before": [round(x, 2) for x in load],
                                       "after": [round(x, 2) for x in os.getloadavg()]}},
                     indent=2))


if __name__ == "__main__":
    main()
