"""Store-and-forward queue benchmark (``rapidmq_edge.store.forward_queue``); prints JSON.

* ``put``: put+commit throughput of 256 B messages with ``commit_delay`` 5 ms, per
  durability mode (``fsync`` = synchronous FULL, ``normal``): ``--producers`` tasks each
  loop put -> ``await commit_future()`` (so ~``--producers`` puts per loop iteration);
  ``commit_ms`` = put-to-commit latency percentiles; ``write_per_msg`` = bytes this process
  wrote (``/proc/self/io`` ``wchar``: WAL + checkpoints, what SQLite asks the OS to write,
  and ``write_bytes``: what reached the block layer) and file growth (db + wal) per message.
* ``drain``: a ``--backlog`` message backlog (256 B, classes 1..3, built with ``normal``
  durability and large batches) is reopened (``open_s``: index load; ``index_rss_mb``) and
  drained with ``fetch(u, 1000)`` + ``ack`` until empty, the acks' deletes being
  group-committed concurrently and awaited at the end (``msg_per_s``).
* ``tinydb``: TinyDB (JSON file) inserts/s of the same messages once it holds
  ``--tinydb-rows`` rows (prefilled in one write, then 100 single inserts timed): the
  reference that shows why a JSON document store is not used.
* ``fsync_4k_ms``: median 4 KiB write+fsync of the file system, to read ``fsync`` vs
  ``normal`` (on a VM with a write-back cache both are CPU-bound).

Usage::

    .venv/bin/python bench/store_queue.py            # ~40 s
    .venv/bin/python bench/store_queue.py --quick    # < 20 s
    .venv/bin/python bench/store_queue.py --dir /mnt/sdcard   # measure a given disk
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapidmq_edge.store.forward_queue import ForwardQueue  # noqa: E402

PAYLOAD = bytes(range(256))
TOPIC = "plant/line1/sensor/temp"


def _io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v)
    return out


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _files(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))] * 1000, 2) if xs else 0.0


async def bench_put(path: Path, durability: str, total: int, producers: int) -> dict[str, Any]:
    q = ForwardQueue(path, durability=durability, commit_delay=0.005)
    lat: list[float] = []
    per = total // producers

    async def producer(n: int) -> None:
        prio = n % 3 + 1
        for _ in range(per):
            t = time.perf_counter()
            q.put("cloud", prio, TOPIC, PAYLOAD)
            fut = q.commit_future()
            if fut is not None:
                await fut
            lat.append(time.perf_counter() - t)

    io0, size0 = _io(), _files(path)
    t0 = time.perf_counter()
    await asyncio.gather(*(producer(n) for n in range(producers)))
    dt = time.perf_counter() - t0
    io1, size1 = _io(), _files(path)
    n = per * producers
    st = q.stats()
    await q.close()
    return {
        "durability": durability, "messages": n, "seconds": round(dt, 3),
        "msg_per_s": round(n / dt), "commits": st["commits"],
        "msgs_per_commit": round(n / max(1, st["commits"]), 1),
        "commit_ms": {"p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "max": _pct(lat, 1.0)},
        "write_per_msg": {
            "wchar_B": round((io1["wchar"] - io0["wchar"]) / n, 1),
            "write_bytes_B": round((io1["write_bytes"] - io0["write_bytes"]) / n, 1),
            "file_growth_B": round((size1 - size0) / n, 1),
        },
    }


async def build_backlog(path: Path, n: int) -> float:
    t0 = time.perf_counter()
    q = ForwardQueue(path, durability="normal", commit_delay=0.05)
    for i in range(0, n, 10_000):
        for k in range(i, min(n, i + 10_000)):
            q.put("cloud", k % 3 + 1, TOPIC, PAYLOAD)
        fut = q.commit_future()
        if fut is not None:
            await fut
    await q.close()
    return time.perf_counter() - t0


async def bench_drain(path: Path, n: int) -> dict[str, Any]:
    build_s = await build_backlog(path, n)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    q = ForwardQueue(path, durability="fsync", commit_delay=0.005)
    open_s = time.perf_counter() - t0
    index_mb = _rss_mb() - rss0
    got = 0
    t0 = time.perf_counter()
    while True:
        batch = q.fetch("cloud", 1000)
        if not batch:
            break
        got += len(batch)
        q.ack("cloud", [m.id for m in batch])
        await asyncio.sleep(0)  # let the writer's completions run
    fut = q.commit_future()
    if fut is not None:
        await fut
    dt = time.perf_counter() - t0
    st = q.stats()
    await q.close()
    return {
        "backlog": n, "drained": got, "build_s": round(build_s, 2),
        "open_s": round(open_s, 2), "index_rss_mb": round(index_mb, 1),
        "seconds": round(dt, 2), "msg_per_s": round(got / dt),
        "commits": st["commits"], "left": st["messages"],
    }


def bench_tinydb(path: Path, rows: int, timed: int = 100) -> dict[str, Any]:
    try:
        from tinydb import TinyDB
    except ImportError:
        return {"error": "tinydb not installed (.venv/bin/pip install tinydb)"}
    db = TinyDB(str(path))
    doc = {"upstream": "cloud", "priority": 2, "topic": TOPIC, "payload": PAYLOAD.hex()}
    db.insert_multiple(dict(doc) for _ in range(rows))  # one write
    t0 = time.perf_counter()
    for _ in range(timed):
        db.insert(dict(doc))
    dt = time.perf_counter() - t0
    db.close()
    return {"rows": rows, "timed_inserts": timed, "inserts_per_s": round(timed / dt),
            "file_MB": round(path.stat().st_size / 1e6, 1),
            "note": "each insert rewrites the whole JSON file: O(rows) per insert, no batching"}


def fsync_ms(path: Path, n: int = 50) -> float:
    """Median time of a 4 KiB write + fsync on this file system (context for 'fsync')."""
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return round(sorted(times)[n // 2] * 1000, 3)


async def main_async(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bench": "store_queue", "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version, "machine": platform.machine(),
        "cpus": os.cpu_count(), "dir": str(work), "fsync_4k_ms": fsync_ms(work / "probe"),
        "put": [],
    }
    for mode in ("fsync", "normal"):
        out["put"].append(await bench_put(work / f"put-{mode}.db", mode, args.puts,
                                          args.producers))
    out["drain"] = await bench_drain(work / "backlog.db", args.backlog)
    out["tinydb"] = bench_tinydb(work / "tiny.json", args.tinydb_rows)
    sq = min(p["msg_per_s"] for p in out["put"])
    tiny = out["tinydb"].get("inserts_per_s")
    if tiny:
        out["tinydb"]["queue_fsync_vs_tinydb"] = round(sq / tiny, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (< 20 s)")
    ap.add_argument("--dir", type=Path, help="where to put the files (default: a temp dir)")
    ap.add_argument("--puts", type=int, help="messages per put run (default 200000)")
    ap.add_argument("--producers", type=int, default=1000)
    ap.add_argument("--backlog", type=int, help="drain backlog size (default 1000000)")
    ap.add_argument("--tinydb-rows", type=int, help="TinyDB rows (default 5000)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    args.puts = args.puts or (20_000 if args.quick else 200_000)
    args.backlog = args.backlog or (100_000 if args.quick else 1_000_000)
    args.tinydb_rows = args.tinydb_rows or 5_000
    work = Path(tempfile.mkdtemp(prefix="store-queue-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        out = asyncio.run(main_async(args, work))
        out["total_s"] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
